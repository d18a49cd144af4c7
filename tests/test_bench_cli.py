"""The analytic benchmark and the CLI: small runs, records, errors."""

import json

import pytest
import torch

from tiltgen.cli.main import main
from tiltgen.errors import TiltgenError
from tiltgen.eval.analytic_bench import BenchSettings, resolve_method, run_analytic_bench
from tiltgen.eval.analytic_cases import CASES, get_case
from tiltgen.eval.metrics import energy_distance, energy_floor

KEYS = {"case", "family", "method", "steps", "n", "energy_distance", "energy_floor", "reward_mean", "reward_exact",
        "nll", "model_evals", "reward_evals", "reward_grad_evals", "wall_ratio"}


def test_energy_distance_separates_and_floor_is_small():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    assert abs(energy_distance(a, b)) < 0.02
    assert energy_distance(a, b + 1.0) > 0.5
    floor = energy_floor(lambda n: torch.randn(n, 2, generator=g), 500)
    assert 0 < floor < 0.02
    # steady: two floors from independent pairs agree within the RMS's sampling error (~1/sqrt(40))
    again = energy_floor(lambda n: torch.randn(n, 2, generator=g), 500)
    assert abs(again - floor) < 0.6 * floor
    with pytest.raises(TiltgenError, match="at least 10 pairs"):
        energy_floor(lambda n: torch.randn(n, 2), 100, pairs=3)


def test_cases_cover_the_issue_grid():
    assert {c.dim for c in CASES.values()} >= {2, 8}
    for name in ("ring2d-linear-b2", "ring2d-linear-b0.5", "aniso8d-quadratic-b2", "aniso8d-quadratic-b0.5"):
        assert get_case(name).name == name


def test_small_bench_exact_reaches_target_and_tweedie_overshoots():
    settings = BenchSettings(n=600, steps=20)
    result = run_analytic_bench(["ring2d-linear-b0.5"], ["vp", "flow"], ["exact", "tweedie"], settings, progress=False)
    by = {(r["family"], r["method"]): r for r in result.records}
    assert set(by) == {(f, m) for f in ("vp", "flow") for m in ("unguided", "exact", "tweedie")}
    for family in ("vp", "flow"):
        exact, tweedie, unguided = by[family, "exact"], by[family, "tweedie"], by[family, "unguided"]
        assert KEYS <= set(exact)
        assert exact["energy_distance"] <= 2 * exact["energy_floor"]
        assert unguided["energy_distance"] > 100 * exact["energy_floor"]
        assert tweedie["reward_mean"] > tweedie["reward_exact"] + 0.5  # the plug-in's overshoot
        assert tweedie["reward_grad_evals"] == tweedie["model_evals"] == 2 * 20 - 1
        assert unguided["reward_evals"] == 0 and unguided["wall_ratio"] == 1.0


def test_cli_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png, out_md = tmp_path / "r.json", tmp_path / "p.png", tmp_path / "t.md"
    code = main(["bench", "analytic", "--quick", "--cases", "ring2d-linear-b2", "--families", "flow",
                 "--methods", "unguided,exact", "--n", "300", "--steps", "10", "--json", str(out_json),
                 "--plot", str(out_png), "--markdown", str(out_md), "--no-progress"])
    assert code == 0
    records = json.loads(out_json.read_text())
    assert [r["method"] for r in records] == ["unguided", "exact"] and KEYS <= set(records[0])
    assert out_png.stat().st_size > 10_000
    table = out_md.read_text().splitlines()
    assert len(table) == 4 and table[3].startswith("| ring2d-linear-b2 | flow | exact |")
    assert "energy_dist" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--methods", "magic"], "unknown method 'magic'"),
    (["--cases", "moon"], "unknown case 'moon'"),
    (["--families", "edm"], "unknown family 'edm'"),
    (["--sampler", "rk4"], "unknown sampler 'rk4'"),
    (["--n", "1"], "n must be >= 2"),
    (["--n", "0"], "n must be >= 2"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--train-data", "0"], "train_data must be >= 2"),
    (["--train-pool", "0"], "train_pool must be >= 1"),
    (["--train-steps", "0"], "train_steps must be >= 1"),
    (["--timing-repeats", "0"], "timing_repeats must be >= 1"),
    (["--smc-steps", "0"], "smc_steps must be >= 1"),
])
def test_cli_bad_input_is_a_clear_error(argv, message, capsys):
    code = main(["bench", "analytic", "--quick", "--no-progress", "--cases", "ring2d-linear-b2", "--n", "50",
                 "--steps", "2"] + argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_unknown_method_lists_choices():
    with pytest.raises(TiltgenError, match="choose from: .*exact"):
        resolve_method("nope")


@pytest.mark.slow
def test_full_bench_exact_within_floor_everywhere():
    """The issue's must-show: exact guidance <= 1.5 x energy_floor on every case and family (n=4000)."""
    result = run_analytic_bench(methods=["unguided", "exact", "tweedie"], settings=BenchSettings(), progress=False)
    for r in result.records:
        if r["method"] == "exact":
            assert r["energy_distance"] <= 1.5 * r["energy_floor"], r

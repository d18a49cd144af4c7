"""``tiltgen demo``: every row runs and is reported; the issue's claims hold on the held-out demo
prompts (the claim test is marked slow: it samples 32 images per prompt and row)."""

import json

import pytest

from tiltgen.cli.main import main as cli
from tiltgen.eval.world_demo import DEFAULT_ROWS, parse_rows
from tiltgen.errors import TiltgenError
from tiltgen.world.prompts import DEMO_PROMPTS

RECORD_KEYS = {"model", "prompt", "method", "n", "proxy", "gold", "fidelity", "diversity", "binary", "base_gold_std",
               "model_evals", "wall_ratio", "wall_ratio_unreliable", "histograms", "moved"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli(["demo", "--n", "2", "--out", str(out), "--timing-repeats", "1", "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_demo_writes_every_row_for_every_prompt(demo):
    out, results = demo
    assert (out / "grid.png").stat().st_size > 10_000 and (out / "results.md").is_file()
    records = results["records"]
    rows = {(r["model"], r["method"]) for r in records}
    assert rows == set(parse_rows(None))
    assert {r["prompt"] for r in records} == set(DEMO_PROMPTS)
    for r in records:
        assert RECORD_KEYS <= set(r), set(RECORD_KEYS) - set(r)
        assert r["wall_ratio"] > 0 and r["model_evals"] > 0
    md = (out / "results.md").read_text()
    assert "within-prompt" in md and "Attribute histograms that moved" in md
    # the training-free row reports the variant it used (the flow folder recommends linear)
    assert {r["variant"] for r in records if r["method"] == "trainingfree"} == {"linear"}
    assert "flow trainingfree uses the `linear` variant and data variance" in md
    assert {len(r["data_var"]) for r in records if r["method"] == "trainingfree"} == {4}  # one per latent channel
    for r in (r for r in records if r["method"] == "unguided"):  # the exact tilt, estimated from these images
        assert 1.0 <= r["proxy_exact_tilt_ess"] <= r["n"] + 1e-9
        assert (r["fidelity_exact_tilt_estimate"] is None) == (r["prompt"] == "")  # "" specifies nothing
    assert "fidelity under the exact tilt" in md
    # learned rows guide at (and report) the scale their network was calibrated to
    from tiltgen.eval.world_demo import GUIDANCE
    from tiltgen.tilt.learned import load_guidance
    from tiltgen.builtin import builtin_path

    for r in (r for r in records if r["method"].startswith("learned")):
        assert r["scale"] == load_guidance(builtin_path(GUIDANCE[(r["model"], r["method"])])).scale
        if r["scale"] != 1.0:
            assert f"{r['model']} {r['method']} guides at scale {r['scale']:.3g}" in md
    best = [r for r in records if r["method"] == "bestofn"]
    assert all(r["best_of"] >= 2 for r in best)
    unguided = {(r["model"], r["prompt"]): r for r in records if r["method"] == "unguided"}
    for r in best:  # best-of-N keeps the unguided sample among its candidates
        assert r["proxy"] >= unguided[(r["model"], r["prompt"])]["proxy"] - 1e-6


def test_exact_tilt_estimates_are_self_normalised_importance_means():
    import math

    import torch

    from tiltgen.eval.world_report import exact_tilt_estimates

    beta = 0.1
    base = {"_proxy": torch.tensor([0.0, 0.0, beta * math.log(3.0)]), "_gold": torch.tensor([1.0, 2.0, 3.0]),
            "_fidelity": [1.0, None, 0.0]}
    est = exact_tilt_estimates(base, beta)  # weights 1/5, 1/5, 3/5
    assert est["gold_exact_tilt_estimate"] == pytest.approx(0.2 * 1 + 0.2 * 2 + 0.6 * 3)
    assert est["fidelity_exact_tilt_estimate"] == pytest.approx(0.2 / 0.8)  # renormalised over scored images
    assert est["proxy_exact_tilt_ess"] == pytest.approx(1 / (0.04 + 0.04 + 0.36))
    assert exact_tilt_estimates({**base, "_fidelity": [None] * 3}, beta)["fidelity_exact_tilt_estimate"] is None


def test_row_parsing_and_bad_input(tmp_path, capsys):
    assert parse_rows("diffusion:learned,flow:trainingfree") == [("diffusion", "learned"), ("flow", "trainingfree")]
    assert len(parse_rows(None)) == len(DEFAULT_ROWS)
    with pytest.raises(TiltgenError, match="unknown demo row"):
        parse_rows("flow:learned")
    assert cli(["demo", "--prompt", "a purple zebra", "--out", str(tmp_path / "d")]) == 2
    assert "'zebra'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_twisted_binary_row_runs_particles_and_reports_them(tmp_path, capsys):
    out = tmp_path / "d"
    assert cli(["demo", "--prompt", "a red shape and a blue shape", "--n", "1", "--particles", "2",
                "--rows", "diffusion:unguided,diffusion:twisted-binary,diffusion:smc-binary", "--timing-repeats", "1",
                "--no-progress",
                "--out", str(out)]) == 0
    records = {r["method"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    twisted = records["twisted-binary"]
    assert twisted["particles"] == 2 and twisted["smc"] == "twisted" and twisted["scale"] > 0
    # each image costs its whole population: N trajectories of the unguided row's length
    assert twisted["model_evals"] == pytest.approx(2 * records["unguided"]["model_evals"], rel=0.1)
    plain = records["smc-binary"]
    assert plain["particles"] == 2 and plain["smc"] == "plain" and "scale" not in plain and plain["beta"] == twisted["beta"]  # one target
    md = (out / "results.md").read_text()
    assert "twisted SMC with 2 particles" in md and "smc-binary is SMC with 2 particles" in md
    assert cli(["demo", "--particles", "0", "--out", str(tmp_path / "e")]) == 2
    assert "--particles must be >= 1" in capsys.readouterr().err


def test_bank_row_pays_for_its_bank_and_reports_it(tmp_path, capsys):
    """flow:trainingfree-bank draws --bank unguided images per prompt inside the row: its network
    evaluations per image are (1 + bank / n) times the unguided row's, and the record says so."""
    out = tmp_path / "d"
    assert cli(["demo", "--prompt", "a red shape", "--n", "2", "--bank", "4", "--rows",
                "flow:unguided,flow:trainingfree,flow:trainingfree-bank", "--timing-repeats", "1", "--no-progress",
                "--out", str(out)]) == 0
    records = {r["method"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    banked, plain = records["trainingfree-bank"], records["trainingfree"]
    assert banked["bank"] == 4 and banked["variant"] == plain["variant"]
    assert banked["model_evals"] == pytest.approx(3 * records["unguided"]["model_evals"])
    assert plain["model_evals"] == pytest.approx(records["unguided"]["model_evals"])
    assert banked["proxy"] != plain["proxy"]  # the bank changed the guidance
    assert cli(["demo", "--bank", "1", "--out", str(tmp_path / "e")]) == 2
    assert "--bank needs at least 2" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_claims_on_held_out_under_specified_prompts(tmp_path):
    """Learned (diffusion, one-step) and training-free (flow) guidance: proxy gain >= 0.75 and gold
    gain >= 0.5 base within-prompt standard deviations, fidelity down by at most 0.05."""
    assert cli(["demo", "--n", "32", "--out", str(tmp_path), "--no-progress",
                "--rows", "diffusion:learned,onestep:learned,flow:trainingfree"]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    for row in summary:
        if row["method"] == "unguided":
            continue
        assert row["proxy_gain_std"] >= 0.75, row
        assert row["gold_gain_std"] >= 0.5, row
        assert row["fidelity_change"] >= -0.05, row


def test_timing_repeats_sample_equal_prompt_blocks_with_the_same_images():
    """With prompts that split evenly, each timed repeat samples one block of them (same work), so
    the repeats cost one pass; the images, counts and seeds are those of full repeats."""
    import torch

    from tiltgen.eval.world_demo import DemoSettings, prompt_blocks, run_model_rows
    from tiltgen.rewards import get_reward

    four = ["a red shape", "two shapes", "", "a shape on a white background"]
    assert prompt_blocks(DemoSettings(prompts=four, timing_repeats=2)) == [four[:2], four[2:]]
    assert prompt_blocks(DemoSettings(prompts=four, timing_repeats=4)) == [[p] for p in four]
    assert prompt_blocks(DemoSettings(prompts=four[:3], timing_repeats=2)) == [four[:3]]  # uneven: full repeats
    assert prompt_blocks(DemoSettings(prompts=four, timing_repeats=1)) == [four]
    from tiltgen.eval.world_report import _block_text

    assert "one block of 2 of the 4 prompts" in _block_text(DemoSettings(prompts=four, timing_repeats=2))
    assert _block_text(DemoSettings(prompts=four[:3], timing_repeats=2)) == ""  # full repeats: nothing to say
    rewards = {"target": get_reward("world-proxy"), "binary": get_reward("world-binary")}
    rows = {}
    for repeats in (1, 2):
        settings = DemoSettings(prompts=four[:2], n=2, timing_repeats=repeats, best_of=2)
        rows[repeats] = {r.method: r for r in run_model_rows("onestep", ["unguided", "learned", "bestofn"], settings,
                                                             rewards)}
    for method in ("unguided", "learned", "bestofn"):
        one, two = rows[1][method], rows[2][method]
        assert two.images.shape == (4, 3, 32, 32)
        torch.testing.assert_close(two.images, one.images, atol=1e-5, rtol=0)
        assert two.model_evals == pytest.approx(one.model_evals)
        assert len(two.walls) == (4 if method == "unguided" else 2) and min(two.walls) > 0


def test_a_row_can_use_a_guidance_network_of_ones_own(tmp_path, capsys):
    """--guidance MODEL:METHOD=FOLDER swaps a row's network; the record names it, and results.md says
    which demo prompts a network was trained on instead of claiming that none were."""
    import shutil

    from tiltgen.builtin import builtin_path

    own = tmp_path / "net"
    shutil.copytree(builtin_path("builtin:guidance-onestep-proxy"), own)
    record = json.loads((own / "guidance.json").read_text())
    record["calibration"]["scale"] = 2.0  # as if calibrated differently: the row must guide at 2, not 8
    (own / "guidance.json").write_text(json.dumps(record))
    seen = "a small blue shape"  # one of the network's training prompts
    assert seen in (own / "prompts.txt").read_text().splitlines()
    args = ["demo", "--n", "1", "--rows", "onestep:unguided,onestep:learned", "--timing-repeats", "1", "--no-progress"]
    assert cli(args + ["--prompt", "a purple cross", "--prompt", seen, "--guidance", f"onestep:learned={own}",
                       "--out", str(tmp_path / "d")]) == 0
    records = json.loads((tmp_path / "d" / "results.json").read_text())["records"]
    learned = [r for r in records if r["method"] == "learned"]
    assert {r["guidance"] for r in learned} == {str(own)} and {r["scale"] for r in learned} == {2.0}
    md = (tmp_path / "d" / "results.md").read_text()
    assert f"`{own}` was trained on '{seen}'." in md and "never saw" not in md
    assert cli(args + ["--prompt", "a purple cross", "--out", str(tmp_path / "e")]) == 0  # the shipped network
    records = json.loads((tmp_path / "e" / "results.json").read_text())["records"]
    assert {r["guidance"] for r in records if r["method"] == "learned"} == {"builtin:guidance-onestep-proxy"}
    assert "The guidance networks never saw these prompts." in (tmp_path / "e" / "results.md").read_text()

    bad = {"onestep:learned=builtin:guidance-diffusion-proxy": "world-diffusion",  # trained for another model
           "flow:trainingfree=x": "uses no guidance network",
           "onestep:learned": "MODEL:METHOD=FOLDER",
           "onestep:cfg=x": "unknown demo row",
           f"onestep:learned={tmp_path / 'missing'}": "missing"}
    for item, message in bad.items():
        assert cli(args + ["--prompt", "a purple cross", "--guidance", item, "--out", str(tmp_path / "f")]) == 2, item
        assert message in capsys.readouterr().err, item

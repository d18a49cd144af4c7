"""Calibrating a learned guidance network's scale against the exact tilt (closed forms, the
analytic case, resume, the CLI on a built-in network)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tiltgen.builtin import builtin_path
from tiltgen.cli.main import main
from tiltgen.errors import TiltgenError
from tiltgen.eval.analytic_cases import CASES, FAMILIES
from tiltgen.tilt.learned import (CalibrationConfig, TrainConfig, calibrate_scale, choose_scale, load_guidance,
                                  tilted_means, train_guidance)
from tiltgen.tilt.learned import calibrate as calibrate_module

RING = CASES["ring2d-linear-b2"]


def test_tilted_means_match_the_gaussian_closed_form():
    """r ~ N(0, 1) tilted by exp(r / beta) is N(1 / beta, 1); the weights' ESS / N is exp(-1 / beta^2)."""
    beta = 2.0
    r = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prompt = torch.arange(r.numel()) % 2
    base, tilted, ess = tilted_means(r, prompt, beta)
    assert torch.allclose(base, torch.zeros(2, dtype=torch.float64), atol=0.01)
    assert torch.allclose(tilted, torch.full((2,), 1 / beta, dtype=torch.float64), atol=0.02)
    assert torch.allclose(ess / 200_000, torch.full((2,), math.exp(-1 / beta**2), dtype=torch.float64), atol=0.01)


def test_choose_scale_interpolates_and_falls_back_to_the_best_grid_point():
    # target between the grid points 2 and 4, halfway in reward: halfway in log-scale
    assert choose_scale([1, 2, 4], [0.2, 0.4, 0.8], base=0.0, target=0.6) == pytest.approx(2 * math.sqrt(2))
    # scale 1 already overshoots: linear between no guidance (0) and 1
    assert choose_scale([1, 2], [0.4, 0.8], base=0.0, target=0.2) == pytest.approx(0.5)
    # never reached: the grid point with the highest reward, not the largest scale
    assert choose_scale([1, 2, 4], [0.1, 0.3, 0.2], base=0.0, target=1.0) == 2


def test_keep_scale_steps_down_to_the_largest_scale_that_keeps_the_second_reward():
    means = {0.0: 0.80, 1.0: 0.79, 2.0: 0.77, 4.0: 0.74, 8.0: 0.70}
    scale, record = calibrate_module.keep_scale(8.0, means, max_drop=0.05)
    assert scale == 2.0 and record["met"] and record["chosen_by_reward"] == 8.0 and record["base"] == 0.80
    assert calibrate_module.keep_scale(8.0, means, max_drop=0.2)[0] == 8.0  # nothing to step down
    assert calibrate_module.keep_scale(1.0, means, max_drop=0.2)[0] == 1.0  # never above the reward's choice
    # the reward chose between grid points: that scale itself counts when it keeps the second reward
    assert calibrate_module.keep_scale(2.8, {**means, 2.8: 0.76}, max_drop=0.05)[0] == 2.8
    scale, record = calibrate_module.keep_scale(8.0, means, max_drop=0.0)
    assert scale == 1.0 and not record["met"]  # none keeps it: the smallest scale tried, flagged


def test_bad_calibration_settings_are_refused():
    for bad in (dict(n=1), dict(max_conditions=0), dict(scales=()), dict(scales=(2.0, 1.0)), dict(scales=(0.0, 1.0)),
                dict(scales=(1.0, math.inf))):
        with pytest.raises(TiltgenError):
            CalibrationConfig(**bad)


def _ring_guidance(steps: int):
    family = FAMILIES["flow"]
    model = RING.base.model(family.schedule, family.prediction)
    config = TrainConfig(beta=2.0, steps=steps, batch_size=512, n_data=600, pool_size=6000, time_levels=12,
                         data_steps=12, data_dtype="float64", checkpoint_every=1000, seed=3)
    result = train_guidance(model, family.schedule, RING.reward, config, shape=(2,), progress=False)
    return model, family.schedule, result.guidance


def _calibrate(model, schedule, guidance, state_path=None, scales=(1.0, 2.0, 4.0, 8.0), **keep):
    return calibrate_scale(model, schedule, RING.reward, guidance, beta=2.0, conditions=[None], shape=(2,),
                           sampler="heun", steps=12, config=CalibrationConfig(n=2000, scales=scales),
                           dtype=torch.float64, state_path=state_path, progress=False, **keep)


def test_calibration_targets_the_exact_tilt_and_scales_up_a_weak_network(tmp_path, monkeypatch):
    exact = float(RING.tilt().tilted.expected_reward(RING.reward))
    model, schedule, good = _ring_guidance(steps=300)
    record = _calibrate(model, schedule, good)
    # the self-normalised target is the exact tilted mean reward (2000 samples, ESS ~ 1000)
    assert record["target_reward"] == pytest.approx(exact, abs=0.1)
    assert 0.5 <= record["scale"] <= 2.0, record  # a well-trained network needs little correction
    assert record["share"] == pytest.approx(1.0, abs=0.25) and good.scale == 1.0  # the estimator is left as it was
    _, _, weak = _ring_guidance(steps=4)  # barely trained: a shrunk log h
    state = tmp_path / "state.json"
    record = _calibrate(model, schedule, weak, state_path=state)
    assert record["scale"] > 2.0 and record["share"] > record["share_at_scale_1"], record
    assert record["model_evals"] > 0 and record["reward_evals"] == 2000 * (1 + len(record["tried"]) +
                                                                            (record["scale"] not in (1, 2, 4, 8)))

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished pass was sampled again")

    monkeypatch.setattr(calibrate_module, "generate_data", no_sampling)
    again = _calibrate(model, schedule, weak, state_path=state)  # every pass is in the state file
    assert again["scale"] == record["scale"] and again["reward"] == record["reward"]
    with pytest.raises(AssertionError):  # other settings: the state file does not apply
        _calibrate(model, schedule, weak, state_path=state, scales=(1.0, 3.0))
    monkeypatch.undo()

    def closeness(x0, cond=None):  # a second reward the tilt along x lowers: stay near the y axis
        return -x0[:, 0].abs()

    kept = _calibrate(model, schedule, weak, keep=closeness, max_drop=0.5)
    means = {t["scale"]: t["mean"] for t in kept["keep"]["tried"]}
    assert kept["keep"]["chosen_by_reward"] == record["scale"] and kept["scale"] <= record["scale"]
    assert kept["keep"]["base"] - means[kept["scale"]] <= 0.5 < kept["keep"]["base"] - means[max(means)]
    with pytest.raises(TiltgenError, match="max_drop"):
        _calibrate(model, schedule, weak, keep=closeness, max_drop=-1.0)


@pytest.fixture()
def onestep_guidance(tmp_path):
    folder = tmp_path / "g"
    shutil.copytree(builtin_path("builtin:guidance-onestep-proxy"), folder)
    record = json.loads((folder / "guidance.json").read_text())
    record.pop("calibration", None)
    (folder / "guidance.json").write_text(json.dumps(record))
    return folder


def test_cli_records_the_scale_and_sampling_uses_it(onestep_guidance, tmp_path, capsys):
    args = ["calibrate-guidance", "--guidance", str(onestep_guidance), "--model", "builtin:world-onestep",
            "--reward", "world-proxy", "--n", "4", "--max-prompts", "2", "--scales", "1,2", "--no-progress"]
    assert main(args) == 0
    record = json.loads((onestep_guidance / "guidance.json").read_text())["calibration"]
    assert set(record) >= {"scale", "base_reward", "target_reward", "reward", "share", "tried", "ess", "conditions"}
    assert len(record["conditions"]) == 2 and not (onestep_guidance / ".calibration-state.json").exists()
    assert load_guidance(onestep_guidance).scale == pytest.approx(record["scale"])
    assert load_guidance(onestep_guidance, scale=1.0).scale == 1.0
    for scale, expected in ((None, record["scale"]), ("1", 1.0)):
        out = tmp_path / f"s{scale}"
        sample = ["sample", "--model", "builtin:world-onestep", "--prompt", "a red shape", "--n", "1", "--method",
                  "learned", "--guidance", str(onestep_guidance), "--out", str(out)]
        assert main(sample + ([] if scale is None else ["--scale", scale])) == 0
        assert json.loads((out / "sample.json").read_text())["scale"] == pytest.approx(expected)
    capsys.readouterr()


def test_cli_keeps_a_second_reward(onestep_guidance, capsys):
    args = ["calibrate-guidance", "--guidance", str(onestep_guidance), "--model", "builtin:world-onestep",
            "--reward", "world-proxy", "--n", "4", "--max-prompts", "2", "--scales", "1,2", "--no-progress",
            "--keep", "world-fidelity", "--max-drop", "0"]
    assert main(args) == 0
    record = json.loads((onestep_guidance / "guidance.json").read_text())["calibration"]
    keep = record["keep"]
    assert keep["reward"] == "world-fidelity" and keep["max_drop"] == 0 and [t["scale"] for t in keep["tried"]][:2] == [1, 2]
    means = {t["scale"]: t["mean"] for t in keep["tried"]}
    assert record["scale"] in means and (keep["base"] - means[record["scale"]] <= 0 or not keep["met"])
    out = capsys.readouterr()
    assert "world-fidelity: unguided" in out.out
    assert keep["met"] or "no scale tried keeps world-fidelity" in out.err


def test_cli_refuses_another_reward_resolution_or_a_network_without_held_out_prompts(onestep_guidance, capsys):
    base = ["calibrate-guidance", "--guidance", str(onestep_guidance), "--model", "builtin:world-onestep",
            "--n", "2", "--max-prompts", "1", "--no-progress"]
    assert main(base + ["--reward", "world-gold"]) == 2
    err = capsys.readouterr().err
    assert "world-proxy" in err and "world-gold" in err
    assert main(base + ["--reward", "world-proxy", "--height", "64", "--width", "64"]) == 2
    assert "training resolution" in capsys.readouterr().err
    record = json.loads((onestep_guidance / "guidance.json").read_text())
    record["held_out_conditions"] = None
    (onestep_guidance / "guidance.json").write_text(json.dumps(record))
    assert main(base + ["--reward", "world-proxy"]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(base + ["--reward", "world-proxy", "--scales", "1,x"]) == 2
    assert "--scales" in capsys.readouterr().err

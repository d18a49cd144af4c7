"""`tiltgen demo`, `tiltgen sample` and `tiltgen train-guidance` on the shipped built-in models."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from tiltgen.builtin.data import DEMO_PROMPTS  # noqa: E402
from tiltgen.cli.main import main  # noqa: E402
from tiltgen.eval.world_demo import parse_rows  # noqa: E402

PROMPT = DEMO_PROMPTS[0]
REQUIRED = {"model", "method", "prompt_set", "gold", "proxy", "fidelity", "diversity", "model_evals", "wall_ratio"}


def test_demo_writes_grid_table_and_records(tmp_path, capsys):
    """The README's main job, as shipped (4 prompts x 8 seeds, beta 0.02), and the issue's claims."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--timing-repeats", "1"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["method"]) for r in records] == [(m, k) for m, k in parse_rows(None)]
    for r in records:
        assert REQUIRED <= set(r) and r["prompt_set"] == "demo"
        assert 0 <= r["fidelity"] <= 1 and r["diversity"] > 0 and r["wall_ratio"] > 0
    by = {(r["model"], r["method"]): r for r in records}
    assert by[("shapes-diffusion", "unguided")]["model_evals"] == 100  # 50 steps x CFG
    assert by[("shapes-onestep", "unguided")]["model_evals"] == 1
    assert by[("shapes-diffusion", "unguided")]["wall_ratio"] == 1.0
    # learned guidance (and training-free guidance on the flow) raise the target proxy *and* the
    # held-out gold reward over the same model's unguided samples, keeping fidelity within 0.05
    for model, method in (("shapes-diffusion", "learned"), ("shapes-onestep", "learned"),
                          ("shapes-flow", "trainingfree")):
        guided, base = by[(model, method)], by[(model, "unguided")]
        assert guided["proxy"] > base["proxy"] and guided["gold"] > base["gold"], (model, method)
        assert guided["fidelity"] >= base["fidelity"] - 0.05, (model, method)
    assert (out / "grid.png").stat().st_size > 10_000
    text = (out / "results.md").read_text()
    assert "One-step generator with learned guidance" in text and "| shapes-flow | trainingfree |" in text
    assert f"demo written to {out}" in capsys.readouterr().out


def test_base_models_follow_held_out_prompts(tmp_path):
    """Attribute-classifier agreement >= 0.8 per attribute on the 140 held-out combinations."""
    out = tmp_path / "heldout"
    assert main(["demo", "--prompt-set", "heldout", "--n", "1", "--rows",
                 "diffusion:unguided,flow:unguided,onestep:unguided", "--timing-repeats", "1", "--no-progress",
                 "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 3 and all(r["n_images"] == 140 and r["prompt_set"] == "heldout" for r in records)
    assert all(r["diversity"] is None for r in records)  # one image per prompt: no within-prompt distance
    assert "NaN" not in (out / "results.json").read_text()
    for r in records:
        assert min(r["fidelity_per_attribute"].values()) >= 0.8, (r["model"], r["fidelity_per_attribute"])


def test_demo_rows_and_errors(tmp_path, capsys):
    assert parse_rows("diffusion:learned, flow:unguided") == [("shapes-diffusion", "learned"),
                                                              ("shapes-flow", "unguided")]
    assert main(["demo", "--rows", "diffusion:magic", "--out", str(tmp_path / "x")]) == 2
    assert "unknown demo row 'diffusion:magic'" in capsys.readouterr().err
    assert main(["demo", "--rows", "diffusion:learned", "--beta", "0.3", "--n", "1", "--no-progress",
                 "--out", str(tmp_path / "y")]) == 2
    assert "trained at beta=" in capsys.readouterr().err
    assert main(["demo", "--prompt", "a pink dog", "--out", str(tmp_path / "z")]) == 2
    assert "unknown word 'pink'" in capsys.readouterr().err


@pytest.mark.parametrize("model,method,extra", [
    ("builtin:shapes-diffusion", "unguided", ["--steps", "3"]),
    ("builtin:shapes-diffusion", "tweedie", ["--steps", "3"]),
    ("builtin:shapes-flow", "trainingfree", ["--steps", "3"]),
    ("builtin:shapes-onestep", "learned", ["--guidance", "builtin:guidance-onestep-proxy"]),
    ("builtin:shapes-diffusion", "learned", ["--guidance", "builtin:guidance-diffusion-proxy", "--steps", "3"]),
])
def test_sample_builtin_writes_images_and_a_reproducible_record(tmp_path, model, method, extra):
    out = tmp_path / "out"
    argv = ["sample", "--model", model, "--prompt", PROMPT, "--prompt", DEMO_PROMPTS[1], "--n", "2", "--seed", "5",
            "--reward", "world-proxy", "--eval-reward", "world-gold", "--method", method, "--beta", "0.02",
            "--out", str(out)] + extra
    assert main(argv) == 0
    record = json.loads((out / "sample.json").read_text())
    assert record["model"] == model and record["method"] == method and record["beta"] == 0.02
    assert [s["seed"] for s in record["samples"]] == [5, 6, 7, 8]
    assert [s["prompt"] for s in record["samples"]] == [PROMPT, PROMPT, DEMO_PROMPTS[1], DEMO_PROMPTS[1]]
    assert all((out / s["file"]).is_file() and "eval:world-gold" in s["terms"] for s in record["samples"])
    assert record["steps"] == (1 if "onestep" in model else 3) and len(record["times"]) == record["steps"] + 1
    # the same command again gives the same images
    assert main(argv[:-len(extra) - 2] + ["--out", str(tmp_path / "again")] + extra) == 0
    again = json.loads((tmp_path / "again" / "sample.json").read_text())
    assert [s["reward"] for s in again["samples"]] == pytest.approx([s["reward"] for s in record["samples"]],
                                                                   rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["--model", "builtin:nope", "--prompt", PROMPT], "unknown built-in 'builtin:nope'"),
    (["--model", "no/such/folder", "--prompt", PROMPT, "--cache-dir", "/nonexistent-cache"], "no/such/folder"),
    (["--model", "builtin:shapes-diffusion", "--prompt", PROMPT, "--reward", "nope"], "unknown reward 'nope'"),
    (["--model", "builtin:shapes-diffusion", "--prompt", ""], "empty caption"),
    (["--model", "builtin:shapes-diffusion"], "give at least one --prompt"),
    (["--model", "builtin:shapes-diffusion", "--prompt", "a small red circle on the left and a large blue square "
      "on the right on a gray background"], "one shape per image"),
    (["--model", "builtin:shapes-diffusion", "--prompt", PROMPT, "--method", "learned", "--guidance",
      "builtin:nothing"], "unknown built-in 'builtin:nothing'"),
    (["--model", "builtin:shapes-diffusion", "--prompt", PROMPT, "--method", "tweedie"], "needs --reward"),
    (["--model", "builtin:shapes-diffusion", "--prompt", PROMPT, "--height", "64"], "draw 16x16 images"),
    (["--model", "builtin:shapes-diffusion", "--prompt", PROMPT, "--method", "learned", "--guidance",
      "builtin:guidance-diffusion-proxy", "--beta", "0.3"], "trained at beta=0.02"),
])
def test_sample_builtin_errors_are_clean(tmp_path, capsys, argv, message):
    assert main(["sample", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sample_unknown_method_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--model", "builtin:shapes-diffusion", "--prompt", PROMPT, "--method", "magic",
              "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err


def test_train_guidance_on_a_builtin_model_then_sample(tmp_path):
    guidance = tmp_path / "g"
    assert main(["train-guidance", "--model", "builtin:shapes-onestep", "--reward", "world-proxy", "--beta", "0.05",
                 "--prompt", PROMPT, "--noise-tilt", "--coords", "--eta", "0", "--data-steps", "1", "--n-data", "16",
                 "--pool-size", "64", "--steps", "3", "--batch-size", "16", "--no-progress",
                 "--out", str(guidance)]) == 0
    record = json.loads((guidance / "guidance.json").read_text())
    assert record["train"]["noise_tilt"] and record["train_reward_evals"] == 16 and record["net"]["coords"]
    assert main(["sample", "--model", "builtin:shapes-onestep", "--prompt", PROMPT, "--method", "learned",
                 "--guidance", str(guidance), "--out", str(tmp_path / "s")]) == 0

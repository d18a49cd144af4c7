"""`tiltgen sample` on a tiny saved pipeline, offline."""

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

pytest.importorskip("diffusers")

import diffusers_tiny as tiny  # noqa: E402

from tiltgen.cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd")
    tiny.tiny_sd("euler-trailing").save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["unguided", "tweedie", "trainingfree"])
def test_sample_writes_images_and_record(sd_dir, tmp_path, method, capsys):
    out = tmp_path / "out"
    rc = main(["sample", "--model", str(sd_dir), "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
               "--reward", "brightness:1,saturation:0.5", "--method", method, "--beta", "0.05", "--steps", "2",
               "--cfg", "1", "--height", "16", "--width", "16", "--seed", "3", "--eval-reward", "jpeg",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    record = json.loads((out / "sample.json").read_text())
    assert record["method"] == method and record["family"] == "sd" and len(record["samples"]) == 4
    assert [s["seed"] for s in record["samples"]] == [3, 4, 1_000_003, 1_000_004]  # seed + 1e6 * prompt + sample
    assert all(isinstance(s["reward"], float) for s in record["samples"])
    assert set(record["samples"][0]["terms"]) == {"brightness", "saturation", "eval:jpeg"}
    assert all((out / s["file"]).is_file() for s in record["samples"])
    captured = capsys.readouterr()
    assert "4 images in" in captured.out
    assert record["data_var"] == (1.0 if method == "trainingfree" else None)  # the one it used (no folder value)
    if method == "unguided":  # it samples the base model: the manifest must not claim a tilt
        assert "--beta is ignored with --method unguided" in captured.err and record["beta"] is None
    else:
        assert "ignored" not in captured.err and record["beta"] == 0.05


def test_sample_errors_are_clean(tmp_path, sd_dir, capsys):
    assert main(["sample", "--model", "org/not-here", "--prompt", "x", "--out", str(tmp_path / "o"),
                 "--cache-dir", str(tmp_path / "hub")]) == 2
    err = capsys.readouterr().err
    assert "'org/not-here' is not in the local Hugging Face cache" in err and str(tmp_path / "hub") in err
    assert main(["sample", "--model", str(sd_dir), "--prompt", "x", "--method", "tweedie", "--out",
                 str(tmp_path / "o")]) == 2
    assert "needs --reward" in capsys.readouterr().err
    assert main(["sample", "--model", str(sd_dir), "--prompt", "x", "--method", "learned", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--guidance PATH" in capsys.readouterr().err
    # checked before any model loads: the model named here does not even exist
    assert main(["sample", "--model", "org/not-here", "--prompt", "x", "--out", "/proc/tiltgen-x"]) == 2
    assert "cannot write to the output folder /proc/tiltgen-x" in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert main(["sample", "--model", "org/not-here", "--prompts-file", str(blank), "--out", str(tmp_path / "o")]) == 2
    assert f"prompts file {blank} holds no prompt" in capsys.readouterr().err


def test_train_guidance_then_sample_learned(tmp_path, capsys):
    """The SDXL-Turbo recipe on a tiny pipeline, all from the CLI: train a prompt-conditional
    noise-tilt net on the one-step sampler's own (noise, reward) pairs, then sample 1 step with it.
    A network of x_t states (no --noise-tilt) is refused for one step: its x0 shift would edit the output."""
    tiny.tiny_sdxl().save_pretrained(tmp_path / "sdxlt")
    train = ["train-guidance", "--model", str(tmp_path / "sdxlt"), "--reward", "brightness", "--beta", "0.05",
             "--prompt", "a cat", "--prompt", "a dog", "--cfg", "0", "--height", "16", "--width", "16",
             "--data-steps", "1", "--noise-tilt", "--steps", "3", "--batch-size", "8", "--n-data", "2",
             "--pool-size", "8", "--eta", "0", "--no-progress", "--out", str(tmp_path / "g")]
    assert main(train) == 0
    record = json.loads((tmp_path / "g" / "guidance.json").read_text())
    assert record["steps"] == 3 and record["train_reward_evals"] == 4  # 2 prompts x 2 samples
    assert record["train"]["noise_tilt"]
    states = [a if a != "--noise-tilt" else "--trajectory" for a in train[:-1]] + [str(tmp_path / "g-states")]
    assert main(states) == 0
    refused = ["sample", "--model", str(tmp_path / "sdxlt"), "--prompt", "a cat", "--method", "learned",
               "--guidance", str(tmp_path / "g-states"), "--steps", "1", "--cfg", "0", "--height", "16",
               "--width", "16", "--reward", "brightness", "--out", str(tmp_path / "refused")]
    assert main(refused) == 2
    assert "shifts x0 (it was trained without noise_tilt)" in capsys.readouterr().err
    calibrate = ["calibrate-guidance", "--guidance", str(tmp_path / "g-states"), "--model", str(tmp_path / "sdxlt"),
                 "--reward", "brightness", "--prompt", "a cat", "--n", "2", "--cfg", "0", "--height", "16",
                 "--width", "16", "--no-progress"]
    assert main(calibrate) == 2  # nor is there a one-step scale to calibrate for it
    assert "no one-step scale to calibrate" in capsys.readouterr().err
    argv = ["sample", "--model", str(tmp_path / "sdxlt"), "--prompt", "a cat", "--method", "learned", "--guidance",
            str(tmp_path / "g"), "--steps", "1", "--cfg", "0", "--height", "16", "--width", "16",
            "--reward", "brightness", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert record["method"] == "learned" and record["steps"] == 1 and record["cfg"] == 0.0


def _sample_particles(sd_dir, out, *extra):
    argv = ["sample", "--model", str(sd_dir), "--prompt", "a cat", "--prompt", "a dog", "--n", "3", "--reward",
            "brightness", "--steps", "3", "--cfg", "1", "--height", "16", "--width", "16", "--seed", "5",
            "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_best_of_n_keeps_the_best_candidate_whatever_the_batch(sd_dir, tmp_path):
    """Candidate 0 of each image is its unguided sample: best-of-4 never scores below it, and the
    images do not depend on the batch size (each depends only on its seed)."""
    unguided = _sample_particles(sd_dir, tmp_path / "u")
    best = _sample_particles(sd_dir, tmp_path / "b", "--method", "bestofn", "--particles", "4")
    again = _sample_particles(sd_dir, tmp_path / "b1", "--method", "bestofn", "--particles", "4", "--batch-size", "1")
    assert [r["seed"] for r in best] == [r["seed"] for r in unguided]
    assert all(b["reward"] >= u["reward"] - 1e-6 for b, u in zip(best, unguided))
    assert sum(b["reward"] > u["reward"] + 1e-6 for b, u in zip(best, unguided)) >= 3
    assert [r["reward"] for r in again] == pytest.approx([r["reward"] for r in best], abs=1e-6)
    assert all(r["particles"] == 4 and 0 <= r["bestofn:candidate"] < 4 for r in best)


def test_smc_runs_one_population_per_image(sd_dir, tmp_path):
    rows = _sample_particles(sd_dir, tmp_path / "s", "--method", "smc", "--particles", "3", "--beta", "0.05")
    again = _sample_particles(sd_dir, tmp_path / "s1", "--method", "smc", "--particles", "3", "--beta", "0.05",
                              "--batch-size", "1")
    assert [r["reward"] for r in again] == pytest.approx([r["reward"] for r in rows], abs=1e-6)
    assert all(r["method"] == "smc" and r["beta"] == 0.05 and math.isfinite(r["smc:log_z"]) for r in rows)
    assert all(0 < r["smc:min_ess_frac"] <= 1 for r in rows)
    record = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert record["sampler"] == "ddpm" and record["particles"] == 3 and "smc:log_z" in record["mean_terms"]
    drifted = _sample_particles(sd_dir, tmp_path / "d", "--method", "smc", "--particles", "3", "--beta", "0.05",
                                "--drift", "trainingfree")
    record = json.loads((tmp_path / "d" / "sample.json").read_text())
    assert record["drift"] == "trainingfree" and record["variant"] == "bounded" and record["data_var"] == 1.0
    assert [r["reward"] for r in drifted] != pytest.approx([r["reward"] for r in rows], abs=1e-6)  # it proposed


def test_particle_options_are_checked(sd_dir, tmp_path, capsys):
    base = ["sample", "--model", str(sd_dir), "--prompt", "a cat", "--reward", "brightness", "--out", str(tmp_path / "x")]
    cases = [(["--method", "smc"], "--method smc needs --particles N"),
             (["--method", "tweedie", "--particles", "2"], "--particles is for --method smc or --method bestofn"),
             (["--method", "smc", "--particles", "0"], "--particles must be an integer >= 1"),
             (["--method", "smc", "--particles", "2", "--handoff"], "--handoff hands a learned twist"),
             (["--method", "bestofn", "--particles", "2", "--guidance", "g"], "keeps the best of N unguided samples"),
             (["--method", "smc", "--particles", "2", "--scale", "2"], "plain --method smc proposes with the base"),
             (["--method", "tweedie", "--drift", "tweedie"], "--drift is the proposal of --method smc"),
             (["--method", "smc", "--particles", "2", "--guidance", "g", "--drift", "tweedie"], "--drift is the"),
             (["--method", "smc", "--particles", "2", "--variant", "damped"], "uses one only as its --drift")]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(base[:-4] + ["--out", str(tmp_path / "y"), "--method", "bestofn", "--particles", "2"]) == 2
    assert "--method bestofn needs --reward" in capsys.readouterr().err
    ignored = base[:-1] + [str(tmp_path / "z"), "--method", "bestofn", "--particles", "2", "--beta", "0.1",
                           "--steps", "2", "--cfg", "1", "--height", "16", "--width", "16", "--no-progress"]
    assert main(ignored) == 0
    assert "--beta is ignored with --method bestofn" in capsys.readouterr().err
    assert json.loads((tmp_path / "z" / "sample.json").read_text())["beta"] is None


def test_train_guidance_defaults_and_the_consistency_loss(tmp_path, sd_dir):
    """--model defaults to the image recipe: fresh noise (a fixed pool is memorised), so eta 0. With
    --eta 1 the consistency loss back-propagates through the network's input gradient; counting the
    FLOPs of that step once crashed inside torch (its module tracker's hooks and autograd.grad on a
    leaf)."""
    argv = ["train-guidance", "--model", str(sd_dir), "--reward", "brightness", "--beta", "0.5", "--cfg", "1",
            "--height", "16", "--width", "16", "--data-steps", "2", "--steps", "2", "--batch-size", "8",
            "--n-data", "2", "--pool-size", "16", "--no-progress", "--prompt", "a cat", "--out"]
    assert main(argv + [str(tmp_path / "default")]) == 0
    record = json.loads((tmp_path / "default" / "guidance.json").read_text())
    assert record["eta"] == 0.0 and record["train"]["fresh_noise"] and record["train"]["val_fraction"] == 0.0
    assert main(argv + [str(tmp_path / "eta"), "--eta", "1"]) == 0  # a fixed pool: fresh noise needs eta 0
    record = json.loads((tmp_path / "eta" / "guidance.json").read_text())
    assert record["eta"] == 1.0 and not record["train"]["fresh_noise"] and record["train_flops_per_step"] > 0
    assert main(argv + [str(tmp_path / "bad"), "--eta", "1", "--fresh-noise"]) == 2


def test_train_guidance_for_one_step_sampling(tmp_path, sd_dir, capsys):
    """--noise-tilt turns the consistency loss off by itself; one-step data without it are trained
    (the network serves multi-step sampling) with a warning that one-step sampling will refuse it."""
    argv = ["train-guidance", "--model", str(sd_dir), "--reward", "brightness", "--beta", "0.5", "--cfg", "1",
            "--height", "16", "--width", "16", "--data-steps", "1", "--steps", "2", "--batch-size", "8",
            "--n-data", "2", "--pool-size", "16", "--no-progress", "--prompt", "a cat"]
    assert main(argv + ["--noise-tilt", "--out", str(tmp_path / "noise")]) == 0
    record = json.loads((tmp_path / "noise" / "guidance.json").read_text())
    assert record["eta"] == 0.0 and record["train"]["noise_tilt"]
    assert "one-step sampling refuses" not in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "states")]) == 0
    assert "without --noise-tilt the network learns an x0 shift" in capsys.readouterr().err
    assert main(argv + ["--noise-tilt", "--eta", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "eta=0" in capsys.readouterr().err


def test_train_guidance_errors_are_clean(tmp_path, sd_dir, capsys):
    assert main(["train-guidance", "--out", str(tmp_path / "g")]) == 2
    assert "exactly one of --case" in capsys.readouterr().err
    assert main(["train-guidance", "--model", str(sd_dir), "--beta", "0.1", "--prompt", "x",
                 "--out", str(tmp_path / "g")]) == 2
    assert "needs --reward" in capsys.readouterr().err
    assert main(["train-guidance", "--model", str(sd_dir), "--reward", "brightness", "--beta", "0",
                 "--prompt", "x", "--out", str(tmp_path / "g")]) == 2
    assert "beta must be" in capsys.readouterr().err
    assert main(["train-guidance", "--model", str(sd_dir), "--reward", "no-such-reward", "--beta", "0.1",
                 "--prompt", "x", "--out", str(tmp_path / "g")]) == 2
    assert "unknown reward 'no-such-reward'" in capsys.readouterr().err


def test_sample_per_channel_data_var(sd_dir, tmp_path, capsys):
    common = ["sample", "--model", str(sd_dir), "--prompt", "a cat", "--n", "1", "--reward", "brightness",
              "--method", "trainingfree", "--beta", "0.05", "--steps", "2", "--cfg", "1", "--height", "16",
              "--width", "16", "--no-progress"]
    assert main(common + ["--data-var", "0.5,1,1.5,2", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "sample.json").read_text())["data_var"] == [0.5, 1.0, 1.5, 2.0]
    assert main(common + ["--data-var", "1,2", "--out", str(tmp_path / "b")]) == 2
    assert "2 per-channel variances but the model's latents have 4 channels" in capsys.readouterr().err
    for bad in ("x", "1,-1"):
        with pytest.raises(SystemExit):
            main(common + ["--data-var", bad, "--out", str(tmp_path / "c")])
        assert "--data-var" in capsys.readouterr().err


def test_sample_with_a_sample_bank(sd_dir, tmp_path, capsys):
    """--bank M: training-free guidance over M unguided samples per prompt, drawn first and recorded;
    the banks are each prompt's own, so the images equal those of each prompt sampled alone."""
    common = ["sample", "--model", str(sd_dir), "--n", "2", "--reward", "brightness", "--method", "trainingfree",
              "--beta", "0.05", "--steps", "2", "--cfg", "1", "--height", "16", "--width", "16", "--no-progress",
              "--bank", "4", "--batch-size", "3"]
    assert main(common + ["--prompt", "a cat", "--prompt", "a dog", "--out", str(tmp_path / "both")]) == 0
    record = json.loads((tmp_path / "both" / "sample.json").read_text())
    assert record["bank"] == 4 and record["job"]["bank"] == 4
    assert main(common + ["--prompt", "a dog", "--seed", "1000000", "--out", str(tmp_path / "dog")]) == 0
    alone = json.loads((tmp_path / "dog" / "sample.json").read_text())
    assert [s["reward"] for s in record["samples"][2:]] == pytest.approx([s["reward"] for s in alone["samples"]],
                                                                          abs=1e-6)
    assert main(common + ["--prompt", "a cat", "--out", str(tmp_path / "plain"), "--bank", "0"]) == 2
    assert "--bank needs at least 2" in capsys.readouterr().err
    assert main(["sample", "--model", str(sd_dir), "--prompt", "x", "--method", "tweedie", "--reward", "brightness",
                 "--bank", "8", "--out", str(tmp_path / "t")]) == 2
    assert "--bank is a prior of training-free guidance" in capsys.readouterr().err


def test_lazy_sample_banks_draw_only_the_prompts_guided(sd_dir):
    """Banks built lazily are drawn when guidance first meets their prompt, and equal the eager ones."""
    import torch

    from tiltgen.backends.diffusers import DiffusersBackend
    from tiltgen.errors import TiltgenError
    from tiltgen.eval.estimators import build_banks, build_estimator
    from tiltgen.rewards import get_reward

    model = DiffusersBackend.from_pretrained(str(sd_dir)).at(16, 16, guidance_scale=1.0)
    reward = get_reward("brightness")
    rows = [("a cat", None, 0), ("a dog", None, 1_000_000)]
    lazy = build_banks(model, reward, rows, 3, steps=2, lazy=True)
    assert lazy.drawn == [] and len(lazy) == 2 and "a dog" in lazy and "a cow" not in lazy
    estimator, _ = build_estimator(model, "trainingfree", reward, 0.05, bank=lazy)
    model.sample(model.encode(["a dog"]), seeds=[5], steps=2, guidance=estimator)
    assert lazy.drawn == ["a dog"]
    eager = build_banks(model, reward, rows, 3, steps=2)
    assert eager.drawn == ["a cat", "a dog"]
    assert torch.equal(eager["a dog"].x0, lazy["a dog"].x0)
    assert torch.equal(eager["a dog"].rewards, lazy["a dog"].rewards)
    with pytest.raises(TiltgenError, match="two negative prompts"):
        build_banks(model, reward, rows + [("a cat", "blurry", 7)], 3, lazy=True)

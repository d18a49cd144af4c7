"""Fine-tuning baselines on tiny saved pipelines: folders in and out, budgets, compute records,
LoRA, resume after a kill, and bad input."""

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")

import diffusers_tiny as tiny  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tiltgen.cli.main import main as cli  # noqa: E402
from tiltgen.errors import TiltgenError  # noqa: E402
from tiltgen.finetune import BasePool, FinetuneConfig, finetune  # noqa: E402
from tiltgen.finetune import train as train_module  # noqa: E402
from tiltgen.rewards import get_reward  # noqa: E402

PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd")
    tiny.tiny_sd("ddim", prediction_type="v_prediction").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3")
    tiny.tiny_sd3().save_pretrained(path)
    return path


def config(method, **kw):
    base = dict(method=method, beta=0.05, steps=3, batch_size=2, lr=1e-3, samples_per_prompt=3, data_steps=2,
                budgets=(2,), checkpoint_every=1, height=16, width=16)
    base.update(kw)
    return FinetuneConfig(**base)


def weights_of(folder, sub="unet"):
    return load_file(str(folder / sub / "diffusion_pytorch_model.safetensors"))


def test_pool_weights_are_the_tilt_normalised_within_each_prompt():
    reward = torch.tensor([0.1, 0.3, 0.2, 0.9, 0.5], dtype=torch.float64)
    prompt = torch.tensor([0, 0, 0, 1, 1])
    pool = BasePool(torch.zeros(5, 1), reward, prompt, ["a", "b"], 0, 0, 0.0)
    w = pool.weights(0.2)
    for p in (0, 1):
        r = reward[prompt == p]
        expected = torch.exp(r / 0.2) / torch.exp(r / 0.2).mean()
        torch.testing.assert_close(w[prompt == p], expected)


@pytest.mark.parametrize("method", ["rwdsm", "draft", "dpo"])
def test_each_method_writes_pipelines_that_plain_diffusers_loads(sd_dir, tmp_path, method):
    from diffusers import DiffusionPipeline

    out = tmp_path / method
    record = finetune(sd_dir, get_reward("brightness"), PROMPTS, config(method), out, progress=False)
    for folder in (out, out / "step-000002"):
        pipe = DiffusionPipeline.from_pretrained(str(folder))
        assert type(pipe).__name__ == "StableDiffusionPipeline"
        images = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    base, tuned, budget = weights_of(sd_dir), weights_of(out), weights_of(out / "step-000002")
    assert base.keys() == tuned.keys()
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    assert any(not torch.equal(budget[k], tuned[k]) for k in base)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]
    compute = record["compute"]
    assert compute["train"]["flops_per_step"] > 0 and compute["train"]["flops"] == 3 * compute["train"]["flops_per_step"]
    if method == "draft":
        assert compute["data"]["samples"] == 0 and all("reward" in row for row in log)
    else:
        assert compute["data"]["samples"] == 6 and compute["data"]["flops"] > 0
        assert compute["data"]["model_evals"] == 6 * 2 * 2  # CFG counts 2 at each of 2 steps
    assert compute["total_flops"] == compute["data"]["flops"] + compute["train"]["flops"]
    assert json.loads((out / "finetune.json").read_text())["budgets"] == ["step-000002"]
    assert (out / "loss.png").is_file()
    assert cli(["sample", "--model", str(out), "--prompt", "a cat", "--n", "1", "--steps", "2", "--cfg", "1",
                "--height", "16", "--width", "16", "--out", str(tmp_path / "samples")]) == 0
    if method == "dpo":  # the first step's model is the reference: the implicit ratio is 0, the loss log 2
        assert log[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)


def test_flow_transformer_and_lora(sd3_dir, tmp_path):
    from diffusers import DiffusionPipeline

    pytest.importorskip("peft")
    out = tmp_path / "lora"
    record = finetune(sd3_dir, get_reward("brightness"), PROMPTS, config("rwdsm", lora_rank=2), out, progress=False)
    no_t5 = dict(text_encoder_3=None, tokenizer_3=None)  # the tiny SD3 is saved without T5
    full = sum(p.numel() for p in DiffusionPipeline.from_pretrained(str(sd3_dir), **no_t5).transformer.parameters())
    assert 0 < record["compute"]["train"]["trainable_parameters"] < full
    base, tuned = weights_of(sd3_dir, "transformer"), weights_of(out, "transformer")
    assert base.keys() == tuned.keys()  # LoRA merged: a plain transformer checkpoint
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in changed)
    assert DiffusionPipeline.from_pretrained(str(out), **no_t5).transformer is not None


def test_a_killed_run_resumes_to_the_uninterrupted_weights(sd_dir, tmp_path, monkeypatch):
    reward = get_reward("brightness")
    whole = tmp_path / "whole"
    finetune(sd_dir, reward, PROMPTS, config("dpo", steps=4, budgets=()), whole, progress=False)
    killed = tmp_path / "killed"
    original = train_module._Step.__call__

    def dies_at_step_2(self, step, micro=0):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step, micro)

    monkeypatch.setattr(train_module._Step, "__call__", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        finetune(sd_dir, reward, PROMPTS, config("dpo", steps=4, budgets=()), killed, progress=False)
    monkeypatch.setattr(train_module._Step, "__call__", original)
    with pytest.raises(TiltgenError, match="--resume"):
        finetune(sd_dir, reward, PROMPTS, config("dpo", steps=4, budgets=()), killed, progress=False)
    with pytest.raises(TiltgenError, match="differs in config"):
        finetune(sd_dir, reward, PROMPTS, config("dpo", steps=5, budgets=()), killed, resume=True, progress=False)
    finetune(sd_dir, reward, PROMPTS, config("dpo", steps=4, budgets=()), killed, resume=True, progress=False)
    a, b = weights_of(whole), weights_of(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    log = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_bad_input_gets_clear_errors(sd_dir, tmp_path, capsys):
    args = ["finetune", "--model", str(sd_dir), "--reward", "brightness", "--prompt", "a cat", "--steps", "1",
            "--height", "16", "--width", "16", "--no-progress"]
    assert cli(args + ["--method", "draft", "--beta", "0.1", "--out", str(tmp_path / "a"), "--reward", "jpeg"]) == 2
    assert "not differentiable" in capsys.readouterr().err
    assert cli(args + ["--method", "rwdsm", "--beta", "0", "--out", str(tmp_path / "b")]) == 2
    assert "beta must be" in capsys.readouterr().err
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    assert cli(["finetune", "--method", "rwdsm", "--model", str(not_a_pipeline), "--reward", "brightness",
                "--beta", "0.1", "--prompt", "a cat", "--out", str(tmp_path / "c")]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert cli(args + ["--method", "rwdsm", "--beta", "0.1", "--budgets", "5", "--out", str(tmp_path / "d")]) == 2
    assert "budgets must lie in" in capsys.readouterr().err
    assert cli(["finetune", "--method", "rwdsm", "--model", "builtin:world-onestep", "--reward", "world-proxy",
                "--beta", "0.1", "--prompt", "a red shape", "--out", str(tmp_path / "e")]) == 2
    assert "one-step generator" in capsys.readouterr().err
    assert cli(["finetune", "--method", "draft", "--model", "builtin:world-diffusion", "--reward", "world-proxy",
                "--beta", "0.1", "--prompt", "a red dragon", "--out", str(tmp_path / "f")]) == 2
    assert "unknown word 'dragon'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["rwdsm", "draft"])
def test_gradient_accumulation_takes_the_same_steps(sd_dir, tmp_path, method):
    """grad_accum cuts each step's minibatch into micro-batches: less memory, the same step."""
    reward = get_reward("brightness")
    logs = {}
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        finetune(sd_dir, reward, PROMPTS, config(method, steps=3, budgets=(), grad_accum=k), out, progress=False)
        logs[k] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for a, b in zip(logs[1], logs[2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    # Adam divides by the gradient's size: float noise in near-zero gradients moves a weight by ~1e-5
    torch.testing.assert_close(weights_of(tmp_path / "k1"), weights_of(tmp_path / "k2"), rtol=1e-3, atol=1e-4)


def test_mixed_precision_and_bad_accumulation(sd_dir, tmp_path):
    record = finetune(sd_dir, get_reward("brightness"), PROMPTS, config("rwdsm", steps=2, budgets=(),
                                                                        mixed_precision="bf16"),
                      tmp_path / "bf16", progress=False)
    assert record["config"]["mixed_precision"] == "bf16"
    assert all(math.isfinite(json.loads(l)["loss"]) for l in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines())
    with pytest.raises(TiltgenError, match="does not split into grad_accum 3"):
        config("rwdsm", grad_accum=3)
    with pytest.raises(TiltgenError, match="mixed precision"):
        config("rwdsm", mixed_precision="int8")


def test_fp16_scales_the_loss_and_keeps_the_scale_in_the_checkpoint(sd_dir, tmp_path):
    """fp16 needs dynamic loss scaling (small gradients underflow in half precision): the steps
    match float32's closely and the scaler's state is checkpointed for resume."""
    logs = {}
    for mp in ("no", "fp16"):
        out = tmp_path / mp
        finetune(sd_dir, get_reward("brightness"), PROMPTS, config("rwdsm", steps=3, budgets=(), mixed_precision=mp),
                 out, progress=False)
        logs[mp] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logs["fp16"] == pytest.approx(logs["no"], rel=1e-2)
    scaler = torch.load(tmp_path / "fp16" / ".work" / "checkpoint.pt", weights_only=False)["scaler"]
    assert scaler["scale"] > 1 and scaler["_growth_tracker"] == 3


def test_accelerate_launch_config_sets_mixed_precision_and_accumulation(sd_dir, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16 --gradient_accumulation_steps 2` reaches every
    process as environment variables; the command's own flags win over them."""
    args = ["finetune", "--method", "rwdsm", "--model", str(sd_dir), "--reward", "brightness", "--beta", "0.5",
            "--steps", "1", "--batch-size", "4", "--samples-per-prompt", "2", "--data-steps", "2", "--cfg", "1",
            "--height", "16", "--width", "16", "--no-progress", "--prompt", "a cat"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    assert cli(args + ["--out", str(tmp_path / "launched")]) == 0
    saved = json.loads((tmp_path / "launched" / "config.json").read_text())["config"]
    assert saved["mixed_precision"] == "bf16" and saved["grad_accum"] == 2
    assert cli(args + ["--out", str(tmp_path / "own"), "--mixed-precision", "no", "--grad-accum", "1"]) == 0
    saved = json.loads((tmp_path / "own" / "config.json").read_text())["config"]
    assert saved["mixed_precision"] == "no" and saved["grad_accum"] == 1
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    assert cli(args + ["--out", str(tmp_path / "fp8")]) == 2

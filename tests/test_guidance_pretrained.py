"""Guidance networks shared like LoRAs: save_pretrained / from_pretrained folders with a model
card, the Hugging Face cache layout, and refusal on another base model unless forced."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")

import diffusers_tiny as tiny  # noqa: E402

from tiltgen.backends.diffusers import DiffusersBackend  # noqa: E402
from tiltgen.cli.main import main  # noqa: E402
from tiltgen.errors import TiltgenError  # noqa: E402
from tiltgen.tilt.learned import LearnedGuidance, from_pretrained, load_guidance  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SD pipeline, a second one with other weights, and a guidance network for the first."""
    root = tmp_path_factory.mktemp("pre")
    tiny.tiny_sd("ddim").save_pretrained(root / "sd")
    tiny.tiny_sd("ddim", seed=1).save_pretrained(root / "other")
    assert main(train_argv(root / "sd", root / "g")) == 0
    return root


def train_argv(model, out, *extra):
    return ["train-guidance", "--model", str(model), "--reward", "brightness", "--beta", "0.5", "--cfg", "1",
            "--height", "16", "--width", "16", "--data-steps", "2", "--steps", "3", "--batch-size", "8",
            "--n-data", "2", "--pool-size", "16", "--eta", "0", "--no-progress", "--prompt", "a cat",
            "--prompt", "a dog", "--out", str(out), *extra]


def latent_model(path):
    return DiffusersBackend.from_pretrained(str(path)).at(16, 16, guidance_scale=1.0)


def shift(guidance, model):
    torch.manual_seed(0)
    x = torch.randn(2, *model.latent_shape)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    return guidance(x, t, ["a cat", "a dog"], x).x0_shift


def test_training_writes_a_model_card_and_the_version(trained):
    card = (trained / "g" / "README.md").read_text()
    record = json.loads((trained / "g" / "guidance.json").read_text())
    fingerprint = record["base_model"]["fingerprint"]
    assert record["tiltgen_version"] and fingerprint in card and record["base_model"]["name"] in card
    assert "`brightness`" in card and "β = 0.5" in card and "library_name: tiltgen" in card
    assert "Training prompts: `a cat`, `a dog`" in card and "| training data | 4 samples" in card


def test_save_and_load_round_trip_and_the_hub_cache_layout(trained, tmp_path):
    model = latent_model(trained / "sd")
    guidance = from_pretrained(trained / "g", model)
    assert isinstance(guidance, LearnedGuidance) and guidance.cond_encoder is not None
    reference = shift(guidance, model)
    copy = guidance.save_pretrained(tmp_path / "copy")
    assert {p.name for p in copy.iterdir()} >= {"guidance.json", "guidance.safetensors", "README.md"}
    torch.testing.assert_close(shift(LearnedGuidance.from_pretrained(copy, model), model), reference, rtol=0, atol=0)
    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}
    cache, rev = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--me--tiny-guidance"
    shutil.copytree(copy, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    hub = from_pretrained("me/tiny-guidance", model, cache_dir=cache)
    torch.testing.assert_close(shift(hub, model), reference, rtol=0, atol=0)
    with pytest.raises(TiltgenError, match="nor in the local Hugging Face cache"):
        from_pretrained("me/absent", model, cache_dir=cache)
    with pytest.raises(TiltgenError, match="has no trained guidance"):
        from_pretrained(tmp_path, model)
    with pytest.raises(TiltgenError, match="training record"):
        from tiltgen.tilt.learned import save_pretrained

        bare = load_guidance(trained / "g")
        bare.record = {}
        save_pretrained(bare, tmp_path / "bare")


def test_another_base_model_is_refused_unless_forced(trained, tmp_path, capsys):
    other = latent_model(trained / "other")
    mine = json.loads((trained / "g" / "guidance.json").read_text())["base_model"]["fingerprint"]
    with pytest.raises(TiltgenError, match=f"fingerprint {mine}.*fingerprint {other.fingerprint()}"):
        from_pretrained(trained / "g", other)
    with pytest.warns(UserWarning, match="loaded anyway"):
        from_pretrained(trained / "g", other, force=True)
    argv = ["sample", "--model", str(trained / "other"), "--prompt", "a cat", "--method", "learned", "--guidance",
            str(trained / "g"), "--steps", "2", "--cfg", "1", "--height", "16", "--width", "16", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "refused")]) == 2
    assert "pass force=True (--force-guidance)" in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "forced"), "--force-guidance"]) == 0


def test_token_pooling_averages_the_prompt_tokens_only(trained):
    model = latent_model(trained / "sd")
    hidden = model.condition(["a cat"], 1).embeds["encoder_hidden_states"][0]  # [L, E]
    n = len(model.pipe.tokenizer("a cat").input_ids)  # with the begin and end tokens
    assert 1 < n < hidden.shape[0]
    tokens = model.prompt_embedding(["a cat", "a dog"], pooling="tokens")
    padded = model.prompt_embedding(["a cat", "a dog"])
    assert torch.allclose(tokens[0], hidden[:n].mean(0), atol=1e-6)
    assert torch.allclose(padded[0], hidden.mean(0), atol=1e-6)
    assert not torch.allclose(tokens, padded)
    with pytest.raises(TiltgenError, match="prompt pooling 'last'.*padded, tokens"):
        model.prompt_embedding(["a cat"], pooling="last")


def test_a_network_keeps_the_prompt_pooling_it_was_trained_with(trained, tmp_path):
    assert main(train_argv(trained / "sd", tmp_path / "g", "--prompt-pooling", "tokens")) == 0
    record = json.loads((tmp_path / "g" / "guidance.json").read_text())
    assert record["train"]["prompt_pooling"] == "tokens"
    # the default is not written, so earlier networks' records (and cache keys) are unchanged
    assert "prompt_pooling" not in json.loads((trained / "g" / "guidance.json").read_text())["train"]
    model = latent_model(trained / "sd")
    tokens, padded = from_pretrained(tmp_path / "g", model), from_pretrained(trained / "g", model)
    assert torch.equal(tokens.cond_encoder(["a cat"]), model.prompt_embedding(["a cat"], pooling="tokens"))
    assert torch.equal(padded.cond_encoder(["a cat"]), model.prompt_embedding(["a cat"]))


def test_prompt_pooling_is_refused_for_an_analytic_case(tmp_path, capsys):
    argv = ["train-guidance", "--case", "ring2d-linear-b2", "--family", "vp", "--steps", "2", "--n-data", "8",
            "--prompt-pooling", "tokens", "--out", str(tmp_path / "g"), "--no-progress"]
    assert main(argv) == 2
    assert "--prompt-pooling" in capsys.readouterr().err


def test_an_unknown_prompt_pooling_is_refused_by_the_training_config():
    from tiltgen.tilt.learned import TrainConfig

    with pytest.raises(TiltgenError, match="prompt pooling 'last'.*padded, tokens"):
        TrainConfig(beta=1.0, prompt_pooling="last")


def test_twisted_smc_from_the_cli_tilts_at_the_networks_beta(trained, tmp_path):
    argv = ["sample", "--model", str(trained / "sd"), "--prompt", "a cat", "--n", "2", "--reward", "brightness",
            "--method", "smc", "--guidance", str(trained / "g"), "--particles", "3", "--handoff", "--steps", "3",
            "--cfg", "1", "--height", "16", "--width", "16", "--out", str(tmp_path / "t"), "--no-progress"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "t" / "sample.json").read_text())
    assert record["beta"] == 0.5 and record["handoff"] and record["guidance"] == str(trained / "g")
    assert all(isinstance(s["terms"]["smc:log_z"], float) for s in record["samples"])
    assert main(argv[:-3] + ["--beta", "0.1", "--out", str(tmp_path / "b"), "--no-progress"]) == 2  # not its beta


def test_twisted_smc_through_guide_uses_the_networks_beta_and_twist(trained):
    import tiltgen
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(trained / "sd"))
    guided = tiltgen.guide(pipe, reward="brightness", method="smc", guidance=str(trained / "g"), particles=2,
                           handoff=True)
    out = guided(["a cat", "a dog"], height=16, width=16, num_inference_steps=3, guidance_scale=1.0,
                 generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="latent")
    assert out.images.shape == (2, 4, 8, 8) and torch.isfinite(out.images).all()
    assert guided.beta == 0.5 and len(guided.last_particles) == 2

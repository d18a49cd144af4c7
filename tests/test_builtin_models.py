"""The built-in text-to-image backend: tiny models from configs, loading, CFG, time convention,
held-out prompts and the training script (interrupt + resume)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from tiltgen.builtin import BUILTIN_WORLD, builtin_path, is_builtin_model, resolve_weights  # noqa: E402
from tiltgen.builtin.data import (DEMO_PROMPTS, N_COMBOS, check_prompt, combo_index, held_out_mask,  # noqa: E402
                                  held_out_prompts, is_held_out, scene_of_combo, training_batch, training_prompts)
from tiltgen.builtin.models import (MODEL_FILE, TIMESTEP_SCALE, BuiltinModel, build_networks, load_model,  # noqa: E402
                                    model_config, save_model)
from tiltgen.core.schedules import RectifiedFlow, VPCosine  # noqa: E402
from tiltgen.errors import TiltgenError  # noqa: E402
from tiltgen.world import parse_caption  # noqa: E402

PROMPT = "a large red circle in the centre on a gray background"


def tiny_model(tmp_path, family="diffusion", cfg=2.0, seed=0):
    torch.manual_seed(seed)
    unet, text = build_networks(16, width=8, text_dim=16)
    for p in unet.parameters():  # diffusers zero-initialises the output conv; make outputs non-trivial
        p.data.normal_(0, 0.05)
    schedule, prediction = (VPCosine(), "v") if family != "flow" else (RectifiedFlow(), "velocity")
    config = model_config(family, schedule, prediction, 16, cfg_scale=cfg, default_steps=4, default_sampler="ddim",
                          data_var=0.6)
    return save_model(tmp_path / family, unet, text, config)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("builtin"))


def test_save_load_round_trip_and_float16_weights(folder):
    model = load_model(folder)
    assert isinstance(model, BuiltinModel) and model.prediction == "v" and model.latent_shape == (3, 16, 16)
    assert is_builtin_model(folder) and not is_builtin_model(folder.parent)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert next(model.unet.parameters()).dtype == torch.float32  # stored in float16, evaluated in float32
    x, t = torch.randn(3, 3, 16, 16), torch.full((3,), 0.5)
    out = model(x, t, PROMPT)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_classifier_free_guidance_and_native_timestep(folder):
    model = load_model(folder)
    seen = []
    forward = model.unet.forward

    def spy(x, timestep, **kw):
        seen.append(timestep.clone())
        return forward(x, timestep, **kw)

    model.unet.forward = spy
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.25, 0.75])
    cond = model.encode([PROMPT, PROMPT], guidance_scale=3.0)
    guided = model(x, t, cond)
    torch.testing.assert_close(seen[-1], torch.cat([t, t]) * TIMESTEP_SCALE)  # canonical t -> 1000 t, both halves
    conditional = model(x, t, model.encode([PROMPT, PROMPT], guidance_scale=1.0))
    empty_hidden, empty_pooled = model._unconditional(2)
    from tiltgen.builtin.models import unet_output

    with torch.no_grad():
        unconditional = unet_output(model.unet, x, t, empty_hidden, empty_pooled)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-4)
    assert model.evals_per_call(cond) == 2 and model.evals_per_call(model.encode(PROMPT, 1.0)) == 1


def test_sampling_is_per_seed_and_decodes_to_unit_range(folder):
    model = load_model(folder)
    both = model.sample(model.encode([PROMPT, PROMPT]), seeds=[4, 9], steps=3)
    alone = model.sample(model.encode([PROMPT]), seeds=[9], steps=3)
    torch.testing.assert_close(both.states[1:], alone.states, atol=1e-5, rtol=1e-4)
    assert both.images.min() >= 0 and both.images.max() <= 1
    torch.testing.assert_close(BuiltinModel.decode(BuiltinModel.encode_images(both.images)), both.images)


def test_prompt_embedding_and_condition_checks(folder):
    model = load_model(folder)
    assert model.prompt_embedding(PROMPT).shape == (1, 16)
    assert model.prompt_embedding([PROMPT, DEMO_PROMPTS[1]]).shape == (2, 16)
    with pytest.raises(TiltgenError, match="3 images but 2 prompts"):
        model(torch.randn(3, 3, 16, 16), torch.full((3,), 0.5), [PROMPT, DEMO_PROMPTS[1]])
    with pytest.raises(TiltgenError, match="unknown word 'pink'"):
        model.encode(["a pink dog"])
    with pytest.raises(TiltgenError, match="at least one prompt"):
        model.encode([])


def test_loading_errors_name_the_problem(tmp_path, folder):
    with pytest.raises(TiltgenError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(TiltgenError, match="unknown built-in 'builtin:nope'; choose one of"):
        load_model("builtin:nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TiltgenError, match=f"no {MODEL_FILE}"):
        load_model(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((folder / MODEL_FILE).read_text())
    (bad / MODEL_FILE).write_text(json.dumps({**config, "vocab": ["<pad>", "x"]}))
    with pytest.raises(TiltgenError, match="different world vocabulary"):
        load_model(bad)
    (bad / MODEL_FILE).write_text(json.dumps(config))
    with pytest.raises(TiltgenError, match="missing unet/config.json"):
        load_model(bad)
    with pytest.raises(TiltgenError, match="weights path .* does not exist"):
        resolve_weights(tmp_path / "none", "weights")


def test_held_out_combinations():
    mask = held_out_mask()
    assert mask.shape == (N_COMBOS,) and int(mask.sum()) == 140
    prompts = held_out_prompts()
    assert len(set(prompts)) == 140 and all(is_held_out(parse_caption(p)) for p in prompts)
    for i in (0, 17, 1399):
        assert combo_index(scene_of_combo(i)) == i
    images, captions, _ = training_batch(400, seed=3, start=0)
    assert images.shape[0] == len(captions) < 400  # some combinations dropped ...
    assert not any(is_held_out(parse_caption(c)) for c in captions)  # ... exactly the held-out ones
    assert not any(is_held_out(parse_caption(p)) for p in DEMO_PROMPTS + tuple(training_prompts(24)))
    assert BUILTIN_WORLD.size == 16 and BUILTIN_WORLD.max_shapes == 1
    with pytest.raises(TiltgenError, match="one shape per image"):
        check_prompt("a small red circle on the left and a large blue square on the right on a gray background")


def test_training_script_runs_and_resumes_exactly(tmp_path, monkeypatch):
    from tiltgen.builtin import train_models

    common = ["--steps", "4", "--batch-size", "8", "--width", "8", "--checkpoint-every", "2", "--seed", "1"]
    assert train_models.main(["diffusion", "--out", str(tmp_path / "full")] + common) == 0
    full = load_model(tmp_path / "full")
    assert full.family == "diffusion" and full.config["data_var"] > 0
    assert "python -m tiltgen.builtin.train_models diffusion" in (tmp_path / "full" / "README.md").read_text()

    original = train_models.Trainer.run
    calls = {"n": 0}

    def interrupted(self, loss_at, work):
        def loss_with_interrupt(step, g):
            if step == 3 and calls["n"] == 0:
                calls["n"] += 1
                raise KeyboardInterrupt
            return loss_at(step, g)
        return original(self, loss_with_interrupt, work)

    monkeypatch.setattr(train_models.Trainer, "run", interrupted)
    assert train_models.main(["diffusion", "--out", str(tmp_path / "cut")] + common) == 130
    assert (tmp_path / "cut" / ".work" / train_models.CHECKPOINT).is_file()
    assert train_models.main(["diffusion", "--out", str(tmp_path / "cut"), "--resume"] + common) == 0
    resumed = load_model(tmp_path / "cut")
    for a, b in zip(full.unet.parameters(), resumed.unet.parameters()):
        torch.testing.assert_close(a, b)


def test_builtin_path_lists_shipped_models():
    with pytest.raises(TiltgenError) as info:
        builtin_path("builtin:missing")
    assert "builtin:shapes-diffusion" in str(info.value)

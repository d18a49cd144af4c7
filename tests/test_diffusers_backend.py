"""diffusers backends on tiny random pipelines: equivalence with the pipelines, guidance, time conversion."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers_tiny as tiny  # noqa: E402

from tiltgen.backends.diffusers import DiffusersBackend, PromptCondition  # noqa: E402
from tiltgen.errors import TiltgenError  # noqa: E402
from tiltgen.rewards.simple import Brightness  # noqa: E402
from tiltgen.tilt import TweedieGuidance  # noqa: E402

SIZE = 16
# (builder, builder kwargs, steps, guidance scale, prompts, seeds)
CASES = {
    "sd-ddim-cfg": (tiny.tiny_sd, {"scheduler": "ddim"}, 4, 7.5, ["a cat", "a dog"], [1, 2]),
    "sd-euler-cfg": (tiny.tiny_sd, {"scheduler": "euler"}, 4, 7.5, ["a cat", "a dog"], [1, 2]),
    "sdturbo-v-1step": (tiny.tiny_sd, {"scheduler": "euler-trailing", "prediction_type": "v_prediction"}, 1, 0.0,
                        ["a cat"], [3]),
    "sdxlturbo-1step": (tiny.tiny_sdxl, {}, 1, 0.0, ["a cat", "a dog"], [5, 6]),
    "sdxl-cfg": (tiny.tiny_sdxl, {}, 3, 5.0, ["a cat", "a cat"], [3, 4]),
    "sd3-cfg": (tiny.tiny_sd3, {}, 4, 5.0, ["a cat", "a dog"], [1, 2]),
    "flux": (tiny.tiny_flux, {}, 3, 3.5, ["a cat", "a dog"], [1, 2]),
}


def _extra(backend):
    return {"max_sequence_length": 8} if backend.family == "flux" else {}


def _pipeline_latents(pipe, backend, steps, scale, prompts, seeds):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompts, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=scale, generator=gens,
               output_type="latent", **_extra(backend)).images
    if backend.family == "flux":
        out = pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_unguided_sampling_reproduces_the_pipeline(case):
    build, kwargs, steps, scale, prompts, seeds = CASES[case]
    pipe = build(**kwargs)
    backend = DiffusersBackend(pipe)
    model = backend.at(SIZE, SIZE)
    cond = model.encode(prompts, guidance_scale=scale, **_extra(backend))
    ours = model.sample(cond, seeds=seeds, steps=steps, decode=False).latents
    ref = _pipeline_latents(pipe, backend, steps, scale, prompts, seeds)
    assert ours.shape == ref.shape
    err = float((ours - ref).abs().max())
    assert err <= 1e-5 * float(ref.abs().max()) + 1e-5, f"{case}: max |diff| {err}"


def test_decoded_images_match_the_pipeline():
    pipe = tiny.tiny_sd("ddim")
    model = DiffusersBackend(pipe).at(SIZE, SIZE)
    out = model.sample(model.encode(["a cat"], guidance_scale=3.0), seeds=[7], steps=3)
    ref = pipe(["a cat"], height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=3.0,
               generator=[torch.Generator().manual_seed(7)], output_type="pt").images
    assert out.images.shape == (1, 3, SIZE, SIZE)
    assert float(out.images.min()) >= 0 and float(out.images.max()) <= 1
    torch.testing.assert_close(out.images, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["sd-ddim-cfg", "sd-euler-cfg", "sdxlturbo-1step"])
def test_vp_time_grid_is_the_schedulers(case):
    build, kwargs, steps, *_ = CASES[case]
    pipe = build(**kwargs)
    model = DiffusersBackend(pipe).at(SIZE, SIZE)
    grid = model.times(steps)
    pipe.scheduler.set_timesteps(steps)
    torch.testing.assert_close(model.schedule.t_to_timestep(grid[:-1]), pipe.scheduler.timesteps.double())
    # alpha, sigma at the grid are the scheduler's alphas_cumprod (VE sigma for Euler)
    k = pipe.scheduler.timesteps.long()
    abar = pipe.scheduler.alphas_cumprod[k].double()
    torch.testing.assert_close(model.schedule.alpha(grid[:-1]) ** 2, abar, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["sd3-cfg", "flux"])
def test_flow_time_grid_is_the_schedulers(case):
    build, kwargs, steps, *_ = CASES[case]
    pipe = build(**kwargs)
    model = DiffusersBackend(pipe).at(SIZE, SIZE)
    grid = model.times(steps)
    assert float(grid[0]) == pytest.approx(1.0) and float(grid[-1]) == 0.0
    native = model.schedule.sigma(grid)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if case == "flux":
        sched.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).numpy(), mu=model._mu)
    else:
        sched.set_timesteps(steps)
    torch.testing.assert_close(native, sched.sigmas.double(), rtol=1e-6, atol=1e-7)


def test_flow_model_output_is_canonical_velocity():
    """One scheduler step equals one canonical DDIM step; canonical u = native v * sigma'(t)."""
    pipe = tiny.tiny_sd3()
    model = DiffusersBackend(pipe).at(SIZE, SIZE)
    cond = model.encode(["a cat"], guidance_scale=1.0)
    x = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.6], dtype=torch.float64)
    sigma = model.schedule.sigma(t)
    with torch.no_grad():
        native = pipe.transformer(hidden_states=x, timestep=(sigma * 1000).float(),
                                  encoder_hidden_states=cond.embeds["encoder_hidden_states"],
                                  pooled_projections=cond.embeds["pooled_projections"], return_dict=False)[0]
        u = model(x, t, cond)
    torch.testing.assert_close(u, native * model.schedule.d_sigma(t).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["sd-ddim-cfg", "sdxlturbo-1step", "sd3-cfg", "flux"])
def test_guided_sampling_runs_and_moves_the_samples(case):
    build, kwargs, steps, scale, prompts, seeds = CASES[case]
    backend = DiffusersBackend(build(**kwargs))
    model = backend.at(SIZE, SIZE)
    cond = model.encode(prompts, guidance_scale=scale, **_extra(backend))
    reward = model.latent_reward(Brightness())
    base = model.sample(cond, seeds=seeds, steps=steps)
    guided = model.sample(cond, seeds=seeds, steps=steps, guidance=TweedieGuidance(reward, beta=0.01))
    assert torch.isfinite(guided.latents).all() and guided.images.shape == base.images.shape
    assert float((guided.latents - base.latents).abs().max()) > 1e-4


@pytest.mark.parametrize("case", ["sd-ddim-cfg", "sd3-cfg", "flux"])
def test_reward_gradient_flows_to_latents(case):
    build, kwargs, steps, scale, prompts, seeds = CASES[case]
    backend = DiffusersBackend(build(**kwargs), gradient_checkpointing=True)
    model = backend.at(SIZE, SIZE)
    cond = model.encode(prompts, guidance_scale=scale, **_extra(backend))
    x = model.initial_latents(seeds).requires_grad_(True)
    t = torch.full((len(seeds),), 0.5, dtype=torch.float64)
    from tiltgen.core.conversions import coefficients, to_x0_eps

    x0, _ = to_x0_eps(model.prediction, model(x, t, cond), x, coefficients(model.schedule, t, x))
    r = model.latent_reward(Brightness())(x0, cond)
    assert r.shape == (len(seeds),)
    (grad,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_prompts_are_encoded_once_and_selectable():
    model = DiffusersBackend(tiny.tiny_sd()).at(SIZE, SIZE)
    calls = []
    encoder = model.pipe.text_encoder
    original = encoder.forward

    def counting(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return original(input_ids, *args, **kwargs)

    encoder.forward = counting
    cond = model.encode(["a cat", "a dog", "a cat", "a cat"], guidance_scale=2.0)
    assert sum(calls) == 4  # 2 distinct prompts, + 2 negatives
    assert isinstance(cond, PromptCondition) and len(cond) == 4
    torch.testing.assert_close(cond.embeds["encoder_hidden_states"][0], cond.embeds["encoder_hidden_states"][2])
    sub = cond.select([1, 3])
    assert sub.prompts == ["a dog", "a cat"] and sub.negative["encoder_hidden_states"].shape[0] == 2


def test_bad_inputs_raise_clear_errors():
    from tiltgen import TiltgenError

    model = DiffusersBackend(tiny.tiny_sd()).at(SIZE, SIZE)
    cond = model.encode(["a cat"], guidance_scale=1.0)
    with pytest.raises(TiltgenError, match="PromptCondition"):
        model(torch.zeros(1, *model.latent_shape), torch.ones(1), {"prompt": "a cat"})
    with pytest.raises(TiltgenError, match="3 latents but 2 prompts"):
        model(torch.zeros(3, *model.latent_shape), torch.ones(3), model.encode(["a", "b"], guidance_scale=1.0))
    with pytest.raises(TiltgenError, match="multiples of 2"):
        DiffusersBackend(tiny.tiny_sd()).at(17, 16)
    with pytest.raises(TiltgenError, match="seeds"):
        model.sample(cond, seeds=[1, 2], steps=1)


def test_plain_prompts_as_cond_are_encoded_and_broadcast():
    model = DiffusersBackend(tiny.tiny_sd()).at(SIZE, SIZE, guidance_scale=3.0)
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.7, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x, t, model.encode(["a cat", "a cat"]))
        torch.testing.assert_close(model(x, t, "a cat"), ref)
        torch.testing.assert_close(model(x, t, ["a cat", "a cat"]), ref)
        torch.testing.assert_close(model(x, t, model.encode(["a cat"])), ref)
    assert model.encode(["a cat"]).cfg_scale == 3.0
    assert model.prompt_embedding("a cat").shape == (1, 16)
    sdxl = DiffusersBackend(tiny.tiny_sdxl()).at(SIZE, SIZE, guidance_scale=0.0)
    assert sdxl.prompt_embedding(["a", "b"]).shape == (2, 16)  # pooled text embedding


def test_learned_guidance_trains_and_samples_on_a_one_step_turbo_pipeline(tmp_path):
    """SDXL-Turbo-style one-step sampling with a prompt-conditional learned guidance network."""
    from tiltgen.tilt.learned import TrainConfig, load_guidance, train_guidance

    model = DiffusersBackend(tiny.tiny_sdxl()).at(SIZE, SIZE, guidance_scale=0.0)
    reward = model.latent_reward(Brightness())
    config = TrainConfig(beta=0.05, steps=5, batch_size=16, n_data=4, pool_size=32, sampler="ddim", data_steps=1,
                         trajectory=True, eta=0.0, checkpoint_every=100, seed=0)
    result = train_guidance(model, model.schedule, reward, config, shape=model.latent_shape,
                            conditions=["a cat", "a dog"], cond_encoder=model.prompt_embedding, out_dir=tmp_path / "g",
                            progress=False)
    assert result.record["steps"] == 5
    guidance = load_guidance(tmp_path / "g", cond_encoder=model.prompt_embedding)
    cond = model.encode(["a cat", "a dog"])
    base = model.sample(cond, seeds=[0, 1], steps=1)
    guided = model.sample(cond, seeds=[0, 1], steps=1, guidance=guidance)
    assert torch.isfinite(guided.latents).all() and not torch.equal(guided.latents, base.latents)


@pytest.mark.parametrize("case", ["sd-ddim-cfg", "sd3-cfg"])
def test_memory_options_leave_the_guided_samples_unchanged(case):
    """Gradient checkpointing (denoiser, VAE, and decode + reward recomputed in the backward
    pass) and VAE slicing / tiling change memory, not results."""
    build, kwargs, steps, scale, prompts, seeds = CASES[case]
    samples = {}
    for name, options in (("none", {}), ("checkpointing", {"gradient_checkpointing": True}),
                          ("slicing+tiling", {"vae_slicing": True, "vae_tiling": True})):
        backend = DiffusersBackend(build(**kwargs), **options)
        model = backend.at(SIZE, SIZE)
        cond = model.encode(prompts, guidance_scale=scale, **_extra(backend))
        guidance = TweedieGuidance(model.latent_reward(Brightness()), beta=0.01)
        samples[name] = model.sample(cond, seeds=seeds, steps=steps, guidance=guidance).images
    torch.testing.assert_close(samples["checkpointing"], samples["none"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(samples["slicing+tiling"], samples["none"], rtol=1e-5, atol=1e-5)


def test_offload_without_a_gpu_is_a_clear_error():
    with pytest.raises(TiltgenError, match="offload .* needs a CUDA device"):
        DiffusersBackend(tiny.tiny_sd(), device="cpu", offload=True)

"""`tiltgen.guide(pipe, ...)`: reward guidance inside the user's own pipeline call. Its outputs
equal tiltgen's own sampler on the same seeds, the pipeline's options keep working, and the
pipeline object is left exactly as it was."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")

import diffusers_tiny as tiny  # noqa: E402

import tiltgen  # noqa: E402
from tiltgen.backends.diffusers import DiffusersBackend  # noqa: E402
from tiltgen.errors import TiltgenError  # noqa: E402
from tiltgen.eval.estimators import build_estimator  # noqa: E402
from tiltgen.rewards import get_reward  # noqa: E402

SIZE = 16
PROMPTS = ["a cat", "a dog"]
SEEDS = [3, 7]
# builder, kwargs, steps, guidance scale
CASES = {
    "sd-ddim": (tiny.tiny_sd, {"scheduler": "ddim"}, 3, 2.0),
    "sd-euler-v": (tiny.tiny_sd, {"scheduler": "euler", "prediction_type": "v_prediction"}, 3, 2.0),
    "sdxl": (tiny.tiny_sdxl, {}, 3, 2.0),
    "sdxl-turbo-1step": (tiny.tiny_sdxl, {}, 1, 0.0),
    "sd3": (tiny.tiny_sd3, {}, 3, 2.0),
    "flux": (tiny.tiny_flux, {}, 3, 1.0),
}


def loaded(build, **kwargs):
    """A tiny pipeline as from_pretrained leaves it (modules in eval mode)."""
    pipe = build(**kwargs)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def extra(pipe):
    return {"max_sequence_length": 8} if type(pipe).__name__ == "FluxPipeline" else {}


def state_of(pipe):
    """What a call must leave unchanged: module attributes, hooks, flags, grads, configs."""
    out = {"scheduler": dict(pipe.scheduler.config), "scheduler_class": type(pipe.scheduler)}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            out[name] = (set(module.__dict__), module.training, module.dtype,
                         [p.requires_grad for p in module.parameters()],
                         [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in module.modules()])
    return out


def pipeline_latents(pipe, call, steps, scale, **kwargs):
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    out = call(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=scale, generator=gens,
               output_type="latent", **extra(pipe), **kwargs).images
    if type(pipe).__name__ == "FluxPipeline":
        out = pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)
    return out


def close(a, b):
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()) + 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_guided_pipeline_equals_tiltgen_sampling_and_leaves_the_pipeline_as_it_was(case):
    build, kwargs, steps, scale = CASES[case]
    pipe = loaded(build, **kwargs)
    plain = pipeline_latents(pipe, pipe, steps, scale)  # (a first call lets diffusers add its lazy hook registry)
    before = state_of(pipe)
    guided = tiltgen.guide(pipe, reward="brightness", method="tweedie", beta=0.1)
    ours = pipeline_latents(pipe, guided, steps, scale)
    assert state_of(pipe) == before
    assert torch.equal(pipeline_latents(pipe, pipe, steps, scale), plain)  # unguided again, bit for bit

    model = DiffusersBackend(loaded(build, **kwargs)).at(SIZE, SIZE, guidance_scale=scale)
    cond = model.encode(PROMPTS, **extra(pipe))
    # one step: both tilt the input noise through the generator (the plug-in's noise tilt)
    estimator, _ = build_estimator(model, "tweedie", get_reward("brightness"), 0.1, steps=steps)
    assert getattr(estimator, "tilts_input", False) == (steps == 1)
    ref = model.sample(cond, seeds=SEEDS, steps=steps, guidance=estimator, decode=False).latents
    assert close(ours, ref), f"{case}: max |diff| {float((ours - ref).abs().max())}"
    assert float((ours - plain).abs().max()) > 100 * (1e-5 * float(ref.abs().max()) + 1e-5)  # it did guide


@pytest.mark.parametrize("case", ["sd-ddim", "sd3"])
def test_damped_plug_in_through_guide_equals_tiltgen_sampling(case):
    build, kwargs, steps, scale = CASES[case]
    pipe = loaded(build, **kwargs)
    guided = tiltgen.guide(pipe, reward="brightness", method="tweedie", beta=0.1, variant="damped")
    ours = pipeline_latents(pipe, guided, steps, scale)
    model = DiffusersBackend(loaded(build, **kwargs)).at(SIZE, SIZE, guidance_scale=scale)
    cond = model.encode(PROMPTS, **extra(pipe))
    latents = {}
    for variant in ("damped", "plain"):
        estimator, _ = build_estimator(model, "tweedie", get_reward("brightness"), 0.1, variant=variant)
        latents[variant] = model.sample(cond, seeds=SEEDS, steps=steps, guidance=estimator, decode=False).latents
    assert close(ours, latents["damped"]), f"{case}: max |diff| {float((ours - latents['damped']).abs().max())}"
    assert not close(latents["plain"], latents["damped"])  # the decoder makes the reward curved in the latent


def test_learned_noise_tilt_on_the_builtin_one_step_model_equals_tiltgen_sampling():
    from diffusers import DiffusionPipeline

    from tiltgen.builtin import builtin_path

    folder = builtin_path("builtin:world-onestep")
    info = json.loads((folder / "tiltgen.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    prompts = ["a red shape", "two shapes"]
    guided = tiltgen.guide(pipe, method="learned", guidance="builtin:guidance-onestep-proxy")
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    ours = guided(prompts, num_inference_steps=1, guidance_scale=info["default_cfg"], generator=gens,
                  output_type="latent").images
    model = DiffusersBackend.from_pretrained("builtin:world-onestep").at(guidance_scale=info["default_cfg"])
    estimator, _ = build_estimator(model, "learned", None, None, guidance="builtin:guidance-onestep-proxy")
    ref = model.sample(model.encode(prompts), seeds=SEEDS, steps=1, guidance=estimator, decode=False).latents
    plain = model.sample(model.encode(prompts), seeds=SEEDS, steps=1, decode=False).latents
    assert close(ours, ref) and float((ref - plain).abs().max()) > 1e-2


def test_one_step_calls_refuse_x0_shift_guidance_and_leave_the_pipeline_as_it_was():
    """One step: training-free guidance would only edit the output (refused, naming the reason);
    the same guided callable still runs with more steps."""
    build, kwargs, _, scale = CASES["sdxl-turbo-1step"]
    pipe = loaded(build, **kwargs)
    plain = pipeline_latents(pipe, pipe, 1, scale)
    before = state_of(pipe)
    guided = tiltgen.guide(pipe, reward="brightness", method="trainingfree", beta=0.1)
    with pytest.raises(TiltgenError, match="trainingfree .* single step"):
        pipeline_latents(pipe, guided, 1, scale)
    assert state_of(pipe) == before
    assert torch.equal(pipeline_latents(pipe, pipe, 1, scale), plain)
    assert torch.isfinite(pipeline_latents(pipe, guided, 2, scale)).all()


def test_the_pipelines_own_options_keep_working():
    """Negative prompts (against tiltgen's own negative prompts), callback_on_step_end, image
    output, num_images_per_prompt and a scheduler swapped in by the user."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = loaded(tiny.tiny_sd, scheduler="ddim")
    guided = tiltgen.guide(pipe, reward="brightness", method="trainingfree", beta=0.1)
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, tuple(kwargs["latents"].shape)))
        return kwargs

    ours = pipeline_latents(pipe, guided, 3, 2.0, negative_prompt=["ugly", "blurry"], callback_on_step_end=callback)
    assert seen == [(0, (2, 4, 8, 8)), (1, (2, 4, 8, 8)), (2, (2, 4, 8, 8))]
    model = DiffusersBackend(loaded(tiny.tiny_sd, scheduler="ddim")).at(SIZE, SIZE, guidance_scale=2.0)
    estimator, _ = build_estimator(model, "trainingfree", get_reward("brightness"), 0.1)
    ref = model.sample(model.encode(PROMPTS, ["ugly", "blurry"]), seeds=SEEDS, steps=3, guidance=estimator,
                       decode=False).latents
    assert close(ours, ref)

    images = guided("a cat", num_images_per_prompt=3, height=SIZE, width=SIZE, num_inference_steps=2,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (3, 3, SIZE, SIZE) and 0 <= float(images.min()) and float(images.max()) <= 1

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    swapped = pipeline_latents(pipe, guided, 3, 2.0)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and torch.isfinite(swapped).all()
    assert float((swapped - pipeline_latents(pipe, pipe, 3, 2.0)).abs().max()) > 1e-3


def test_bad_calls_get_clear_errors():
    pipe = loaded(tiny.tiny_sd, scheduler="ddim")
    with pytest.raises(TiltgenError, match="does not support str; supported pipelines: StableDiffusionPipeline"):
        tiltgen.guide("not a pipeline", reward="brightness")
    with pytest.raises(TiltgenError, match="particles= is for method='smc'"):
        tiltgen.guide(pipe, reward="brightness", particles=4)
    with pytest.raises(TiltgenError, match="method='smc' needs particles=N"):
        tiltgen.guide(pipe, reward="brightness", method="smc")
    with pytest.raises(TiltgenError, match="handoff=True hands a learned twist"):
        tiltgen.guide(pipe, reward="brightness", method="smc", particles=2, handoff=True)
    with pytest.raises(TiltgenError, match="method='smc' uses one only as its drift="):
        tiltgen.guide(pipe, reward="brightness", method="smc", particles=2, variant="damped")
    smc = tiltgen.guide(pipe, reward="brightness", method="smc", beta=0.1, particles=2)
    with pytest.raises(TiltgenError, match="does not take callback_on_step_end"):
        smc("a cat", height=SIZE, width=SIZE, num_inference_steps=2, callback_on_step_end=lambda *a: a[-1])
    with pytest.raises(TiltgenError, match="needs a reward"):
        tiltgen.guide(pipe)
    with pytest.raises(TiltgenError, match="unknown method"):
        tiltgen.guide(pipe, reward="brightness", method="magic")

    def needs_prompts(images, prompts):
        return images.mean((1, 2, 3)) * torch.tensor([len(p) for p in prompts], dtype=images.dtype)

    guided = tiltgen.guide(pipe, reward=needs_prompts, method="tweedie", beta=0.1)
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    with pytest.raises(TiltgenError, match="call the pipeline with prompt=..."):
        guided(prompt_embeds=embeds, negative_prompt_embeds=negative, height=SIZE, width=SIZE, num_inference_steps=2)
    assert "forward" not in pipe.unet.__dict__  # restored after an error too


@pytest.mark.parametrize("case", ["sd-ddim", "sd3"])
def test_sample_banks_through_guide_equal_tiltgen_sampling(case):
    """guide(..., method="trainingfree", bank=...) uses the per-prompt banks as tiltgen's sampler does."""
    from tiltgen.eval.estimators import build_banks

    build, kwargs, steps, scale = CASES[case]
    pipe = loaded(build, **kwargs)
    model = DiffusersBackend(loaded(build, **kwargs)).at(SIZE, SIZE, guidance_scale=scale)
    reward = get_reward("brightness")
    banks = build_banks(model, reward, [(p, None, 100) for p in PROMPTS], 4, steps=steps, **extra(pipe))
    guided = tiltgen.guide(pipe, reward=reward, method="trainingfree", beta=0.1, bank=banks)
    ours = pipeline_latents(pipe, guided, steps, scale)
    cond = model.encode(PROMPTS, **extra(pipe))
    latents = {}
    for name, bank in (("bank", banks), ("plain", None)):
        estimator, _ = build_estimator(model, "trainingfree", reward, 0.1, bank=bank)
        latents[name] = model.sample(cond, seeds=SEEDS, steps=steps, guidance=estimator, decode=False).latents
    assert close(ours, latents["bank"]), f"{case}: max |diff| {float((ours - latents['bank']).abs().max())}"
    assert not close(latents["plain"], latents["bank"])  # the bank changed the guidance
    with pytest.raises(TiltgenError, match="bank= is a prior of training-free guidance"):
        tiltgen.guide(pipe, reward=reward, method="tweedie", bank=banks)


@pytest.mark.parametrize("case", ["sd-ddim", "sd3", "flux"])
def test_smc_through_guide_equals_tiltgen_smc_and_leaves_the_pipeline_as_it_was(case):
    """method="smc": one population of N particles per image, seeded by the call's generators, the
    pipeline's own output type; the same latents as tiltgen's smc_sample on the same seeds."""
    from tiltgen.tilt.particles import smc_sample

    build, kwargs, steps, scale = CASES[case]
    pipe = loaded(build, **kwargs)
    pipeline_latents(pipe, pipe, steps, scale)
    before = state_of(pipe)
    guided = tiltgen.guide(pipe, reward="brightness", method="smc", beta=0.1, particles=3)
    ours = pipeline_latents(pipe, guided, steps, scale)
    assert state_of(pipe) == before
    assert [p["seed"] for p in guided.last_particles] == SEEDS
    assert all(len(p["ess"]) == steps and torch.isfinite(torch.tensor(p["log_z"])) for p in guided.last_particles)

    model = DiffusersBackend(loaded(build, **kwargs)).at(SIZE, SIZE, guidance_scale=scale)
    reward = model.latent_reward(get_reward("brightness"))
    ref = torch.cat([smc_sample(model, model.schedule, reward, 0.1, n=1, particles=3, shape=model.latent_shape,
                                cond=model.encode([prompt] * 3, **extra(pipe)), steps=steps, seed=seed).samples
                     for prompt, seed in zip(PROMPTS, SEEDS)])
    assert close(ours, ref), f"{case}: max |diff| {float((ours - ref).abs().max())}"
    images = guided(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=scale,
                    generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                    **extra(pipe)).images
    assert images.shape == (2, 3, SIZE, SIZE) and 0 <= float(images.min()) and float(images.max()) <= 1


@pytest.mark.parametrize("case", ["sd-ddim", "sd3", "flux"])
def test_best_of_n_through_guide_keeps_the_candidate_tiltgen_sample_keeps(case):
    """method="bestofn": N calls of the pipeline itself (its callback runs in each), candidate k of
    image i seeded seed_i + k * CANDIDATE_STRIDE, as `tiltgen sample --method bestofn` draws them;
    the kept latents are that candidate's, and the pipeline is left as it was."""
    from tiltgen.eval.particle_images import candidate_seed

    build, kwargs, steps, scale = CASES[case]
    pipe = loaded(build, **kwargs)
    pipeline_latents(pipe, pipe, steps, scale)
    before = state_of(pipe)
    guided = tiltgen.guide(pipe, reward="brightness", method="bestofn", particles=3)
    calls = []
    ours = pipeline_latents(pipe, guided, steps, scale,
                            callback_on_step_end=lambda p, i, t, kw: calls.append(i) or kw)
    assert state_of(pipe) == before
    assert calls == list(range(steps)) * 3

    model = DiffusersBackend(loaded(build, **kwargs)).at(SIZE, SIZE, guidance_scale=scale)
    cond = model.encode(PROMPTS, **extra(pipe))
    reward = get_reward("brightness")
    candidates = [model.sample(cond, seeds=[candidate_seed(s, k) for s in SEEDS], steps=steps, decode=False).latents
                  for k in range(3)]
    with torch.no_grad():
        scores = torch.stack([reward(model.decode(c), PROMPTS) for c in candidates], 1)
    best = scores.argmax(1)
    assert best.tolist() != [0, 0]  # these seeds pick a later candidate: the choice is tested, not just candidate 0
    assert [p["candidate"] for p in guided.last_particles] == best.tolist()
    assert [p["seed"] for p in guided.last_particles] == SEEDS
    ref = torch.stack(candidates, 1)[torch.arange(2), best]
    assert close(ours, ref), f"{case}: max |diff| {float((ours - ref).abs().max())}"
    assert torch.allclose(torch.tensor([p["rewards"] for p in guided.last_particles]), scores, atol=1e-4)
    for i, k in enumerate(best.tolist()):  # the kept image has the highest reward of its candidates
        assert float(scores[i, k]) == float(scores[i].max())
    # decoded output: the kept candidate's own image (decoded once, while it was scored)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    images = guided(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=scale,
                    generator=gens, output_type="pt", **extra(pipe)).images
    with torch.no_grad():
        expected = pipe.image_processor.postprocess(model.decode(ref) * 2 - 1, output_type="pt")
    assert close(images, expected), f"{case}: max |diff| {float((images - expected).abs().max())}"


def test_best_of_n_candidate_zero_is_the_pipelines_own_image():
    """With one candidate, best-of-N is the pipeline's own output for the same generators."""
    build, kwargs, steps, scale = CASES["sd-ddim"]
    pipe = loaded(build, **kwargs)
    guided = tiltgen.guide(pipe, reward="brightness", method="bestofn", particles=1)
    assert close(pipeline_latents(pipe, guided, steps, scale), pipeline_latents(pipe, pipe, steps, scale))
    images = guided("a cat", num_images_per_prompt=2, height=SIZE, width=SIZE, num_inference_steps=2,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, SIZE, SIZE)
    assert [p["seed"] for p in guided.last_particles] == [0, 1]


@pytest.mark.parametrize("drift", ["tweedie", "trainingfree"])
def test_smc_with_a_drift_through_guide_equals_tiltgen_smc(drift):
    """method="smc", drift=...: the guidance proposes under the plug-in twist, as `tiltgen sample
    --method smc --drift` does (the same proposal and per-image code)."""
    from tiltgen.eval.particle_images import smc_image, smc_proposal

    build, kwargs, steps, scale = CASES["sd-ddim"]
    pipe = loaded(build, **kwargs)
    guided = tiltgen.guide(pipe, reward="brightness", method="smc", beta=0.1, particles=3, drift=drift)
    ours = pipeline_latents(pipe, guided, steps, scale)
    model = DiffusersBackend(loaded(build, **kwargs)).at(SIZE, SIZE, guidance_scale=scale)
    reward = get_reward("brightness")
    proposal = smc_proposal(model, reward, 0.1, drift=drift, steps=steps)
    assert proposal.estimator is not None and not proposal.twisted
    ref = torch.cat([smc_image(model, model.latent_reward(reward), proposal, 3, model.encode([prompt] * 3),
                               seed=seed, steps=steps)[0] for prompt, seed in zip(PROMPTS, SEEDS)])
    assert close(ours, ref), f"{drift}: max |diff| {float((ours - ref).abs().max())}"
    plain = pipeline_latents(pipe, tiltgen.guide(pipe, reward="brightness", method="smc", beta=0.1, particles=3),
                             steps, scale)
    assert not close(ours, plain)  # the drift changed the proposal


def test_particle_methods_refuse_what_they_cannot_take():
    pipe = loaded(tiny.tiny_sd, scheduler="ddim")
    with pytest.raises(TiltgenError, match="method='bestofn' needs particles=N"):
        tiltgen.guide(pipe, reward="brightness", method="bestofn")
    with pytest.raises(TiltgenError, match="does not take guidance=, scale="):
        tiltgen.guide(pipe, reward="brightness", method="bestofn", particles=2, guidance="x", scale=2.0)
    with pytest.raises(TiltgenError, match="drift= is the proposal of method='smc' without guidance="):
        tiltgen.guide(pipe, reward="brightness", method="tweedie", drift="tweedie")
    with pytest.raises(TiltgenError, match="unknown SMC drift"):
        tiltgen.guide(pipe, reward="brightness", method="smc", particles=2, drift="magic")
    with pytest.raises(TiltgenError, match="plain method='smc' proposes with the base model"):
        tiltgen.guide(pipe, reward="brightness", method="smc", particles=2, scale=2.0)
    with pytest.warns(UserWarning, match="beta is ignored"):
        best = tiltgen.guide(pipe, reward="brightness", method="bestofn", particles=2, beta=0.1)
    assert best.beta is None
    with pytest.raises(TiltgenError, match="does not take latents"):
        best("a cat", height=SIZE, width=SIZE, latents=torch.zeros(1, 4, 2, 2))
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    needs_prompts = tiltgen.guide(pipe, reward=lambda images, prompts: images.mean((1, 2, 3)) * len(prompts),
                                  method="bestofn", particles=2)
    with pytest.raises(TiltgenError, match="call the pipeline with prompt=..."):
        needs_prompts(prompt_embeds=embeds, negative_prompt_embeds=negative, height=SIZE, width=SIZE,
                      num_inference_steps=2)


def test_one_step_noise_tilt_keeps_the_noise_norm_unless_told_not_to():
    """guide(..., keep_noise_norm=...) reaches the noise tilt as build_estimator's option does."""
    build, kwargs, steps, scale = CASES["sdxl-turbo-1step"]
    pipe = loaded(build, **kwargs)
    model = DiffusersBackend(loaded(build, **kwargs)).at(SIZE, SIZE, guidance_scale=scale)
    cond = model.encode(PROMPTS)
    latents = {}
    for keep in (True, False):
        guided = tiltgen.guide(pipe, reward="brightness", method="tweedie", beta=0.01, keep_noise_norm=keep)
        ours = pipeline_latents(pipe, guided, steps, scale)
        estimator, _ = build_estimator(model, "tweedie", get_reward("brightness"), 0.01, steps=1,
                                       keep_noise_norm=keep)
        assert estimator.keep_noise_norm == keep
        ref = model.sample(cond, seeds=SEEDS, steps=1, guidance=estimator, decode=False).latents
        assert close(ours, ref), f"keep={keep}: max |diff| {float((ours - ref).abs().max())}"
        latents[keep] = ours
    assert not close(latents[True], latents[False])

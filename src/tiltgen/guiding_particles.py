"""``tiltgen.guide(pipe, method="smc"|"bestofn", particles=N)``: particle methods inside a
pipeline call's signature, returning the pipeline's own output type.

* SMC runs N trajectories per image and resamples them, which a pipeline's own scheduler loop (one
  trajectory per latent) cannot do. So a ``method="smc"`` call runs tiltgen's SMC sampler (``ddpm``
  steps on the pipeline's own denoiser, text encoders and VAE, the pipeline object untouched).
  Plain SMC proposes with the base model and twists with r(x0_hat)/beta; with ``guidance`` it is
  twisted SMC (the network's log h_t twists and its guided drift proposes, at the network's beta;
  docs/particles.md); with ``drift`` a Tweedie or training-free drift proposes under the plug-in twist.
* Best-of-N calls the pipeline itself N times, so every pipeline option works as usual (its
  scheduler, ``callback_on_step_end``, once per candidate), and keeps each image's highest-reward
  candidate.

Image i of the call is seeded by the call's ``generator`` (its i-th generator's seed, or one
generator's seed + i); without a generator, by fresh random seeds. Both methods share their
per-image code with ``tiltgen sample --method smc|bestofn`` (:mod:`tiltgen.eval.particle_images`),
so the same seeds give the same images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import TiltgenError

#: The pipeline arguments an SMC call honours; any other given argument is refused by name.
SMC_CALL_ARGS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "generator", "height", "width",
                 "num_images_per_prompt", "output_type", "return_dict", "max_sequence_length")


def check_smc_call(call: dict[str, Any]) -> None:
    """Refuse, by name, the pipeline arguments that a particle call cannot honour."""
    given = sorted(name for name, value in call.items() if name not in SMC_CALL_ARGS and value is not None)
    if given:
        raise TiltgenError(f"guide(..., method='smc') runs tiltgen's particle sampler, not the pipeline's own loop, "
                           f"so it does not take {', '.join(given)}; it takes {', '.join(SMC_CALL_ARGS)}")
    if call.get("prompt") is None:
        raise TiltgenError("guide(..., method='smc') needs prompt=... (the reward and the twist read the prompts)")


def image_seeds(generator: Any, count: int) -> list[int]:
    """One seed per image from the call's ``generator`` (a list: one each; one: its seed + i)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise TiltgenError(f"{len(generator)} generators for {count} images")
        return [int(g.initial_seed()) for g in generator]
    if generator is not None:
        return [int(generator.initial_seed()) + i for i in range(count)]
    return torch.randint(0, 2**62, (count,)).tolist()


def smc_call(guided: Any, call: dict[str, Any], extra: dict[str, Any]) -> Any:
    """Run one pipeline call of ``guided`` (a GuidedPipeline with ``particles``) by SMC."""
    from .eval.particle_images import smc_image, smc_proposal

    call = {**call, **extra}
    check_smc_call(call)
    pipe, backend = guided.pipe, guided.backend
    prompts = guided._prompt_rows(call)
    negatives = _negatives(call.get("negative_prompt"), call, len(prompts))
    scale = call.get("guidance_scale", guided._default("guidance_scale"))
    model = guided._model_for(call.get("height"), call.get("width"))
    steps = guided._steps(call) or backend.default_steps
    options = guided.options
    proposal = smc_proposal(model, guided.reward, guided.beta, guidance=guided.guidance, drift=guided.drift,
                            scale=options["scale"], t_window=options["t_window"], variant=options["variant"],
                            force_guidance=guided.force, cache_dir=guided.cache_dir, steps=steps)
    guided.beta = proposal.beta
    encode_extra = {"max_sequence_length": call["max_sequence_length"]} if call.get("max_sequence_length") else {}
    latent_reward = model.latent_reward(guided.reward)
    big_n = guided.particles
    latents, guided.last_particles = [], []
    for prompt, negative, seed in zip(prompts, negatives, image_seeds(call.get("generator"), len(prompts))):
        cond = model.encode([prompt] * big_n, None if negative is None else [negative] * big_n,
                            guidance_scale=scale, **encode_extra)
        image, found = smc_image(model, latent_reward, proposal, big_n, cond, seed=seed, steps=steps,
                                 handoff=guided.handoff)
        latents.append(image)
        guided.last_particles.append({"prompt": prompt, "seed": seed, **found})
    return _output(pipe, backend, model, torch.cat(latents), call)


def bestofn_call(guided: Any, call: dict[str, Any], extra: dict[str, Any]) -> Any:
    """Run one pipeline call of ``guided`` by best-of-N: N calls of the pipeline itself, candidate k of
    image i seeded ``seed_i + k * CANDIDATE_STRIDE``, the highest reward kept per image."""
    from .core.reward import evaluate_reward
    from .eval.particle_images import candidate_seed
    from .guiding import prompts_for_the_reward

    merged = {**call, **extra}
    if merged.get("latents") is not None:
        raise TiltgenError("guide(..., method='bestofn') draws each candidate from its own seed, so it does not take "
                           "latents=...; pass generator=... instead")
    pipe, backend = guided.pipe, guided.backend
    rows = guided._prompt_rows(merged)
    count = len(rows) if rows is not None else _embedded_count(merged)
    seeds = image_seeds(merged.get("generator"), count)
    device = _generator_device(merged.get("generator"))
    scores, model, kept = [], None, None  # kept: the best (latents, images) so far, one row per image
    for k in range(guided.particles):
        generators = [torch.Generator(device).manual_seed(candidate_seed(seed, k)) for seed in seeds]
        latents = pipe(**{**merged, "generator": generators, "output_type": "latent", "return_dict": True}).images
        latents = guided._unpack(latents, merged) if backend.family == "flux" else latents
        f = backend.vae_scale_factor
        model = model or guided._model_for(latents.shape[-2] * f, latents.shape[-1] * f)
        with torch.no_grad():
            images = model.decode(latents)
            with prompts_for_the_reward(rows):
                scores.append(evaluate_reward(guided.reward, images, rows).detach().float().cpu())
        kept = (latents, images) if kept is None else _keep_better(kept, (latents, images), scores)
    best = torch.stack(scores, 1).argmax(1)  # [images]; the first of equal rewards, as tiltgen sample picks
    guided.last_particles = [{"prompt": None if rows is None else rows[i], "seed": seed, "candidate": int(k),
                              "rewards": [float(s[i]) for s in scores]}
                             for i, (seed, k) in enumerate(zip(seeds, best.tolist()))]
    return _output(pipe, backend, model, kept[0], merged, decoded=kept[1])


def _keep_better(kept: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], scores: list[Tensor]
                 ) -> tuple[Tensor, Tensor]:
    """Per image, the newest candidate where its reward beats every earlier one (ties keep the earlier:
    the first of equal rewards wins), else what was kept; one candidate's latents and images in memory."""
    better = scores[-1] > torch.stack(scores[:-1], 1).amax(1)
    return tuple(torch.where(better.to(a.device).view(-1, *[1] * (a.ndim - 1)), b, a)  # type: ignore[return-value]
                 for a, b in zip(kept, new))


def _embedded_count(call: dict[str, Any]) -> int:
    embeds = call.get("prompt_embeds")
    if embeds is None:
        raise TiltgenError("guide(..., method='bestofn') needs prompt=... or prompt_embeds=...")
    return int(embeds.shape[0]) * int(call.get("num_images_per_prompt") or 1)


def _generator_device(generator: Any) -> Any:
    first = generator[0] if isinstance(generator, (list, tuple)) and generator else generator
    return first.device if isinstance(first, torch.Generator) else "cpu"


def _negatives(negative: Any, call: dict[str, Any], count: int) -> list[str | None]:
    if negative is None:
        return [None] * count
    per_prompt = [negative] if isinstance(negative, str) else list(negative)
    k = int(call.get("num_images_per_prompt") or 1)
    rows = [n for n in per_prompt for _ in range(k)]
    if len(rows) != count:
        raise TiltgenError(f"{len(per_prompt)} negative prompts for {count // k} prompts")
    return rows


def _output(pipe: Any, backend: Any, model: Any, latents: Tensor, call: dict[str, Any],
            decoded: Tensor | None = None) -> Any:
    """The pipeline's own output for these latents (``decoded``: their images in [0, 1], if already
    decoded): ``output_type`` and ``return_dict`` as it would."""
    output_type = call.get("output_type") or "pil"
    if output_type == "latent":
        from .backends.diffusers.backend import pack_latents

        images: Any = pack_latents(latents) if backend.family == "flux" else latents
    else:
        if decoded is None:
            with torch.no_grad():
                decoded = model.decode(latents)
        images = pipe.image_processor.postprocess(decoded * 2 - 1, output_type=output_type)
    cls = _output_class(backend.family)
    if not call.get("return_dict", True):
        return (images, None) if backend.family == "sd" else (images,)
    return cls(images=images, nsfw_content_detected=None) if backend.family == "sd" else cls(images=images)


def _output_class(family: str) -> Any:
    if family == "sd":
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        return StableDiffusionPipelineOutput
    if family == "sdxl":
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        return StableDiffusionXLPipelineOutput
    if family == "sd3":
        from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

        return StableDiffusion3PipelineOutput
    from diffusers.pipelines.flux import FluxPipelineOutput

    return FluxPipelineOutput

"""``tiltgen.guide(pipe, method="smc", particles=N)``: SMC inside a pipeline call's signature.

A particle method runs N trajectories per image and resamples them, which a pipeline's own
scheduler loop (one trajectory per latent) cannot do. So a ``method="smc"`` call runs tiltgen's
SMC sampler (``ddpm`` steps on the pipeline's own denoiser, text encoders and VAE, the pipeline
object untouched) and returns the pipeline's own output type. Image i of the call is one
population, seeded by the call's ``generator`` (its i-th generator's seed, or one generator's
seed + i); without a generator, by fresh random seeds. Plain SMC proposes with the base model and
twists with r(x0_hat)/beta; with ``guidance`` it is twisted SMC: the network's log h_t twists and
its guided drift proposes, at the network's beta (docs/particles.md).
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
    from .eval.estimators import DEFAULT_BETA, build_estimator
    from .tilt.particles import smc_sample

    call = {**call, **extra}
    check_smc_call(call)
    pipe, backend = guided.pipe, guided.backend
    prompts = guided._prompt_rows(call)
    negatives = _negatives(call.get("negative_prompt"), call, len(prompts))
    scale = call.get("guidance_scale", guided._default("guidance_scale"))
    model = guided._model_for(call.get("height"), call.get("width"))
    steps = guided._steps(call) or backend.default_steps
    estimator, beta = None, guided.beta
    if guided.guidance is not None:
        estimator, beta = build_estimator(model, "learned", None, guided.beta, guidance=guided.guidance,
                                          force_guidance=guided.force, cache_dir=guided.cache_dir, steps=steps,
                                          scale=guided.options["scale"], t_window=guided.options["t_window"])
    beta = DEFAULT_BETA if beta is None else beta
    guided.beta = beta
    encode_extra = {"max_sequence_length": call["max_sequence_length"]} if call.get("max_sequence_length") else {}
    reward = model.latent_reward(guided.reward)
    big_n = guided.particles
    latents, guided.last_particles = [], []
    for prompt, negative, seed in zip(prompts, negatives, image_seeds(call.get("generator"), len(prompts))):
        cond = model.encode([prompt] * big_n, None if negative is None else [negative] * big_n,
                            guidance_scale=scale, **encode_extra)
        result = smc_sample(model, model.schedule, reward, beta, n=1, particles=big_n, shape=model.latent_shape,
                            cond=cond, drift=estimator, twist=None if estimator is None else estimator.log_twist,
                            handoff=guided.handoff, steps=steps, seed=seed)
        latents.append(result.samples)
        guided.last_particles.append({"prompt": prompt, "seed": seed, "log_z": float(result.log_z[0]),
                                      "ess": list(result.ess or []), "resamples": result.resamples,
                                      "handoff_t": result.handoff_t})
    return _output(pipe, backend, model, torch.cat(latents), call)


def _negatives(negative: Any, call: dict[str, Any], count: int) -> list[str | None]:
    if negative is None:
        return [None] * count
    per_prompt = [negative] if isinstance(negative, str) else list(negative)
    k = int(call.get("num_images_per_prompt") or 1)
    rows = [n for n in per_prompt for _ in range(k)]
    if len(rows) != count:
        raise TiltgenError(f"{len(per_prompt)} negative prompts for {count // k} prompts")
    return rows


def _output(pipe: Any, backend: Any, model: Any, latents: Tensor, call: dict[str, Any]) -> Any:
    """The pipeline's own output for these latents: ``output_type`` and ``return_dict`` as it would."""
    output_type = call.get("output_type") or "pil"
    if output_type == "latent":
        from .backends.diffusers.backend import pack_latents

        images: Any = pack_latents(latents) if backend.family == "flux" else latents
    else:
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

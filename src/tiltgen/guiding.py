"""``tiltgen.guide(pipe, ...)``: reward guidance inside a diffusers pipeline the user already holds.

The pipeline runs its own ``__call__``: its scheduler (also one the user swapped in), negative
prompts, ``guidance_scale``, ``num_inference_steps``, ``generator``, ``latents``,
``output_type`` and ``callback_on_step_end`` all work as usual. For the duration of one call,
the denoiser's ``forward`` is wrapped: each call's output is replaced by the tilted one. The
wrapper converts the denoiser's input to tiltgen's state x_t and time t (the UNet input after
``scale_model_input`` is the VP state; a flow transformer's input is the flow state at
sigma = timestep / 1000), forms the CFG-combined prediction exactly as the pipeline will,
applies the estimator through :class:`~tiltgen.tilt.GuidedModel` and adds the difference to each
CFG half, so the pipeline's own CFG combination yields the guided prediction. Afterwards the
wrapper is removed: the pipeline object is left as it was.

With a DDIM, Euler-discrete or flow-match Euler scheduler this is step for step the update that
``tiltgen sample`` makes, so the images agree with it for the same seeds.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .errors import TiltgenError, check_choice

METHODS = ("tweedie", "trainingfree", "learned", "smc", "bestofn")


def guide(pipe: Any, reward: Any = None, method: str = "tweedie", beta: float | None = None,
          guidance: Any = None, particles: int | None = None, *, scale: float | None = None,
          t_window: tuple[float, float] | None = None, variant: str | None = None, force: bool = False,
          cache_dir: str | None = None, bank: Any = None, handoff: bool = False,
          drift: str | None = None, keep_noise_norm: bool = True) -> "GuidedPipeline":
    """A callable with ``pipe``'s own call signature and output that samples p* ∝ p·exp(r/β).

    ``pipe``: a loaded ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (SD-Turbo, SDXL-Turbo and the built-in
    models are such pipelines). ``reward``: a reward spec, a registered name or any callable
    ``(images in [0, 1], prompts) -> [N]``. ``method``: ``tweedie`` (backpropagation through the
    denoiser), ``trainingfree`` or ``learned`` (``guidance``: a trained network, its folder,
    ``builtin:<name>`` or a cached hub id; refused for another base model unless ``force``).
    ``method="smc"`` with ``particles=N``: SMC with N particles per image, resampled on low ESS
    (tiltgen's ``ddpm`` sampler on the pipeline's own modules, the pipeline's output type; module
    :mod:`tiltgen.guiding_particles`); with ``guidance`` it is twisted SMC (the network twists and
    proposes at its own beta; ``handoff`` passes the twist to the plug-in near the data); with
    ``drift="tweedie"|"trainingfree"`` that guidance proposes under the plug-in twist. Each call's
    per-image log normalising-constant estimate and per-step ESS are in ``last_particles``.
    ``method="bestofn"`` with ``particles=N``: N calls of the pipeline itself, each image's
    highest-reward candidate kept (``last_particles`` names it); ``beta`` plays no part.
    ``bank`` (``trainingfree`` only): sample banks of unguided latents, ``{prompt: SampleBank}``
    (e.g. from :func:`tiltgen.eval.estimators.build_banks`), drawn with the settings of the calls
    they will guide. ``keep_noise_norm``: a call with one step tilts the input noise, keeping its
    norm unless False (:func:`tiltgen.tilt.base.keep_noise_norm`).
    """
    from .backends.diffusers.backend import FAMILIES

    name = type(pipe).__name__
    if name not in FAMILIES:
        raise TiltgenError(f"guide() does not support {name}; supported pipelines: {', '.join(FAMILIES)}")
    if method not in METHODS:
        raise TiltgenError(f"unknown method {method!r} for guide(); choose one of: {', '.join(METHODS)}")
    from .eval.particle_images import check_particle_options

    check_particle_options(method, particles, _spell, guidance=guidance, variant=variant, handoff=handoff,
                           drift=drift, scale=scale, t_window=t_window, bank=bank)
    if method == "bestofn" and beta is not None:
        warnings.warn("guide(..., method='bestofn') keeps the highest reward: beta is ignored (use method='smc' to "
                      "sample the tilt at a beta)", stacklevel=2)
        beta = None
    if method != "learned" and reward is None:
        raise TiltgenError(f"method {method!r} needs a reward")
    if method == "learned" and guidance is None:
        raise TiltgenError("method 'learned' needs guidance= (a trained guidance network or its folder)")
    if bank is not None and method != "trainingfree":
        raise TiltgenError(f"bank= is a prior of training-free guidance; method {method!r} does not use one")
    if isinstance(reward, str):
        from .rewards import reward_from_spec

        reward = reward_from_spec(reward)
    return GuidedPipeline(pipe, reward, method, beta, guidance, scale=scale, t_window=t_window, variant=variant,
                          keep_noise_norm=keep_noise_norm,
                          force=force, cache_dir=cache_dir, bank=bank, particles=particles, handoff=handoff,
                          drift=drift)


def _spell(name: str, value: Any = None) -> str:
    """An option as a Python caller writes it: ``t_window=``, ``method='smc'``."""
    return f"{name}=" if value is None else f"{name}={value!r}"


class GuidedPipeline:
    """``pipe`` with reward guidance; call it exactly as the pipeline (see :func:`guide`)."""

    def __init__(self, pipe: Any, reward: Any, method: str, beta: float | None, guidance: Any, *,
                 scale: float | None, t_window: tuple[float, float] | None, variant: str | None, force: bool,
                 cache_dir: str | None, bank: Any = None, particles: int | None = None, handoff: bool = False,
                 drift: str | None = None, keep_noise_norm: bool = True):
        from .backends.diffusers.backend import DiffusersBackend

        self.pipe = pipe
        self.reward, self.method, self.beta, self.guidance = reward, method, beta, guidance
        self.options = {"scale": scale, "t_window": t_window, "variant": variant, "bank": bank,
                        "keep_noise_norm": keep_noise_norm}
        self.force, self.cache_dir = force, cache_dir
        self.particles, self.handoff, self.drift = particles, handoff, drift
        self.last_particles: list[dict[str, Any]] = []  # smc: each image's log Z, ESS trace; bestofn: its pick
        # a view of the pipeline that changes nothing in it (no casting, no requires_grad, no eval)
        self.backend = DiffusersBackend(pipe, adopt=False)
        self.family = self.backend.family
        self._signature = inspect.signature(type(pipe).__call__)
        self._models: dict[tuple[int, int], Any] = {}
        self._estimators: dict[tuple[int, int, bool], Any] = {}

    @property
    def __signature__(self) -> inspect.Signature:  # help() and IDEs show the pipeline's own arguments
        params = list(self._signature.parameters.values())[1:]
        return self._signature.replace(parameters=params)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(self.pipe, *args, **kwargs)
        call = dict(bound.arguments)
        call.pop("self", None)
        extra = call.pop("kwargs", {}) or {}
        if self.family == "flux" and float(call.get("true_cfg_scale", extra.get("true_cfg_scale", 1.0)) or 1.0) > 1:
            raise TiltgenError("guide() on FLUX supports its distilled guidance (guidance_scale), not true CFG "
                               "(true_cfg_scale > 1)")
        if self.family == "sd3" and (call.get("skip_guidance_layers") or extra.get("skip_guidance_layers")):
            raise TiltgenError("guide() does not support SD3's skip-layer guidance (skip_guidance_layers): its extra "
                               "denoiser calls are not the CFG pair tiltgen tilts")
        if self.method == "smc":
            from .guiding_particles import smc_call

            return smc_call(self, call, extra)
        if self.method == "bestofn":
            from .guiding_particles import bestofn_call

            return bestofn_call(self, call, extra)
        rows = self._prompt_rows(call)
        denoiser = self.backend.denoiser
        with self._wrapped(denoiser, self._make_hook(denoiser.forward, rows, call)):
            return self.pipe(*args, **kwargs)

    # ---- prompts -----------------------------------------------------------------------------
    def _prompt_rows(self, call: dict[str, Any]) -> list[str] | None:
        """One prompt per image, in the pipeline's order (each prompt repeated num_images_per_prompt
        times); None when the call passes prompt embeddings instead of prompts."""
        prompt = call.get("prompt")
        if prompt is None:
            return None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        k = int(call.get("num_images_per_prompt") or 1)
        return [p for p in prompts for _ in range(k)]

    # ---- the model at this call's size ------------------------------------------------------
    def _model(self, height: int, width: int) -> Any:
        key = (height, width)
        if key not in self._models:
            self._models[key] = self.backend.at(height, width)
        return self._models[key]

    def _model_for(self, height: int | None, width: int | None) -> Any:
        """The model at a call's size; the pipeline's default size where the call gives none."""
        if height and width:
            return self._model(int(height), int(width))
        model = self.backend.at(height, width)
        return self._models.setdefault((model.height, model.width), model)

    def _default(self, name: str) -> Any:
        """The pipeline's own default for a call argument (None if it has none)."""
        parameter = self._signature.parameters.get(name)
        return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    def _estimator(self, model: Any, steps: int | None) -> Any:
        # one step or several decides how a plug-in tilts a generator (eval/estimators.py)
        key = (model.height, model.width, steps == 1)
        if key not in self._estimators:
            from .eval.estimators import build_estimator

            estimator, beta = build_estimator(model, self.method, self.reward, self.beta, guidance=self.guidance,
                                              force_guidance=self.force, cache_dir=self.cache_dir, steps=steps,
                                              **self.options)
            self._estimators[key] = estimator
            self.beta = beta
        return self._estimators[key]

    # ---- the wrapped denoiser ------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def _wrapped(module: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
        """``module.forward`` replaced for the block; restored exactly (offload hooks keep theirs)."""
        had = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        module.forward = forward  # type: ignore[method-assign]
        try:
            yield
        finally:
            if had:
                module.forward = previous  # type: ignore[method-assign]
            else:
                del module.forward

    def _make_hook(self, forward: Callable[..., Any], rows: list[str] | None, call: dict[str, Any]) -> Callable:
        from .backends.diffusers.backend import pack_latents
        from .tilt.base import GuidedModel

        # the class's own parameter names: the instance's forward may be a wrapper taking *args
        names = list(inspect.signature(type(self.backend.denoiser).forward).parameters)[1:]
        pipe, family = self.pipe, self.family

        def hook(*args: Any, **kwargs: Any) -> Any:
            given = dict(zip(names, args))
            given.update(kwargs)
            x_name = names[0]  # sample (UNet) / hidden_states (transformers)
            x_in, timestep = given[x_name], given["timestep"]
            cfg = family != "flux" and bool(getattr(pipe, "do_classifier_free_guidance", False))
            n = x_in.shape[0] // 2 if cfg else x_in.shape[0]
            latents = self._unpack(x_in, call) if family == "flux" else x_in
            model = self._model(latents.shape[-2] * self.backend.vae_scale_factor,
                                latents.shape[-1] * self.backend.vae_scale_factor)
            estimator = self._estimator(model, self._steps(call))
            t = model.t_of_timestep(timestep, x_in.shape[0])[:n]
            cond = self._cond(rows, n)
            out_dtype = x_in.dtype
            last: dict[str, Tensor] = {}

            def combined(x_t: Tensor, t_: Tensor, _cond: Any = None) -> Tensor:
                """The CFG-combined prediction in tiltgen's convention, as the pipeline forms it."""
                x = x_t.to(out_dtype)
                native = torch.cat([x, x]) if cfg else x
                call_args = dict(given)
                call_args[x_name] = pack_latents(native) if family == "flux" else native
                raw = forward(**call_args)
                raw = raw[0] if isinstance(raw, (tuple, list)) else getattr(raw, "sample", raw)
                raw = self._unpack(raw, call) if family == "flux" else raw
                last["raw"] = raw.detach()
                out = raw.float()
                if cfg:
                    uncond, text = out.chunk(2)
                    out = uncond + float(pipe.guidance_scale) * (text - uncond)
                out = model.to_canonical(out, t_)
                last["combined"] = out.detach()
                return out

            x_t = (latents[:n] if cfg else latents).float()
            with prompts_for_the_reward(rows):
                guided = GuidedModel(_Prediction(combined, model.prediction), model.schedule, estimator)(x_t, t, cond)
            delta = model.to_native(guided.detach() - last["combined"], t)
            raw = last["raw"].float() + (torch.cat([delta, delta]) if cfg else delta)
            raw = raw.to(out_dtype)
            return (pack_latents(raw) if family == "flux" else raw,)

        return hook

    def _steps(self, call: dict[str, Any]) -> int | None:
        """The number of denoising steps this pipeline call runs: its timesteps or sigmas, else
        num_inference_steps, else the pipeline's default for it (None if it has none)."""
        for name in ("timesteps", "sigmas"):
            if call.get(name) is not None:
                return len(call[name])
        if call.get("num_inference_steps") is not None:
            return int(call["num_inference_steps"])
        default = self._default("num_inference_steps")
        return default if isinstance(default, int) else None

    @staticmethod
    def _cond(rows: list[str] | None, n: int) -> list[str] | None:
        if rows is None:
            return None
        if len(rows) != n:
            raise TiltgenError(f"the pipeline denoises {n} latents but the call gives {len(rows)} prompts")
        return rows

    # ---- FLUX packs 2x2 latent patches into tokens ----------------------------------------------
    def _flux_size(self, call: dict[str, Any]) -> tuple[int, int]:
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        f = self.backend.vae_scale_factor
        return int(call.get("height") or default) // f, int(call.get("width") or default) // f

    def _unpack(self, packed: Tensor, call: dict[str, Any]) -> Tensor:
        from .backends.diffusers.backend import unpack_latents

        return unpack_latents(packed, *self._flux_size(call))


@contextlib.contextmanager
def prompts_for_the_reward(rows: list[str] | None) -> Iterator[None]:
    """Where a call passed prompt embeddings instead of prompts (``rows`` None), a reward that fails
    is reported as needing the prompts, not with its own stack trace."""
    try:
        yield
    except TiltgenError:
        raise
    except Exception as error:
        if rows is None:
            raise TiltgenError(f"the reward failed without prompts ({type(error).__name__}: {error}); call the "
                               "pipeline with prompt=... rather than prompt_embeds, so tiltgen can pass the prompts "
                               "to the reward") from error
        raise


class _Prediction:
    """A plain callable as a model of a given prediction kind (for GuidedModel)."""

    def __init__(self, fn: Callable[..., Tensor], prediction: str):
        self.fn = fn
        self.prediction = prediction

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.fn(x_t, t, cond)


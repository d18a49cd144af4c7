"""diffusers pipelines presented as canonical tiltgen models, in latent space.

The canonical state is the VAE latent (FLUX: *unpacked*, [C, H/8, W/8]; packing happens inside
the model call) with ``x_t = alpha(t) x0 + sigma(t) eps``, t = 0 data, t = 1 noise. This module is
the only place that converts to the pipelines' native time:

* UNet pipelines (SD 1.x/2.x, SD-Turbo, SDXL, SDXL-Turbo): the scheduler's beta table as a
  :class:`~tiltgen.core.schedules.DiscreteVP`; integer timestep k <-> t = (k + 1) / N; the UNet's
  ``epsilon`` / ``v_prediction`` output is the canonical ``eps`` / ``v``.
* Flow pipelines (SD3/SD3.5, FLUX): :class:`~tiltgen.core.schedules.RectifiedFlow` with the
  scheduler's shift (FLUX: the resolution-dependent ``exp(mu)``); native sigma = shifted t, the
  transformer's timestep is ``1000 sigma`` (SD3) or ``sigma`` (FLUX); its output dx/dsigma times
  sigma'(t) is the canonical ``velocity``.

Classifier-free guidance is part of the model: with scale w > 1 the model returns
``pred_u + w (pred_c - pred_u)`` (linear in the prediction, so identical for eps, v and velocity).
Reward guidance (``GuidedModel``) then wraps this CFG model: the tilted target is the CFG
sampler's distribution times exp(r / beta), i.e. ``eps* = eps_u + w (eps_c - eps_u) - sigma_t g_t``
(flow: ``u* = u_cfg - t/(1-t) g_t`` for shift 1; in general DESIGN.md §2).

The sampling grid is read from the pipeline's own scheduler (``set_timesteps``) and the
``ddim`` sampler is used by default: for these grids it is step for step the same update as
diffusers' DDIM, Euler-discrete and flow-match Euler schedulers, so unguided sampling reproduces
the pipeline's output for the same per-sample seeds (tests/test_diffusers_backend.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ...core.model import Model
from ...core.noise import SeededNoise, seeds_for
from ...core.samplers import sample as core_sample
from ...core.schedules import DiscreteVP, RectifiedFlow, Schedule
from ...errors import TiltgenError, check_choice
from ...tilt.learned.pretrained import PROMPT_POOLINGS
from ..prompts import prompt_condition

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
            "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
_UNET_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def pack_latents(x: Tensor) -> Tensor:
    """FLUX's tokens: latents [N, C, h, w] -> 2x2 patches [N, (h/2)(w/2), 4C]."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents` for latents of height ``h`` and width ``w``."""
    n, _, d = packed.shape
    c = d // 4
    return packed.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


@dataclass
class PromptCondition:
    """Per-sample text conditioning: prompts (for rewards) and encoder outputs (for the model).

    ``embeds`` / ``negative`` map argument names of the denoiser to tensors with one row per
    sample; ``negative`` is None when classifier-free guidance is off (``cfg_scale`` <= 1).
    """

    prompts: list[str]
    embeds: dict[str, Tensor]
    negative: dict[str, Tensor] | None = None
    cfg_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def uses_cfg(self) -> bool:
        return self.negative is not None and self.cfg_scale != 1.0

    def select(self, index: Sequence[int] | Tensor) -> "PromptCondition":
        """The condition of a subset / resampling of the samples (used by particle methods)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = lambda d: None if d is None else {k: v[idx.to(v.device)] for k, v in d.items()}  # noqa: E731
        return replace(self, prompts=[self.prompts[i] for i in idx.tolist()], embeds=pick(self.embeds),
                       negative=pick(self.negative))


def _expand(batch: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    return {k: v[index.to(v.device)] for k, v in batch.items()}


class DiffusersBackend:
    """A loaded pipeline; ``at(height, width)`` gives the canonical latent model at one resolution.

    ``dtype`` casts every module (e.g. ``torch.float16`` / ``bfloat16`` on GPU); the sampler state
    stays float32. Memory options (docs/scale-out.md): ``gradient_checkpointing`` trades compute
    for memory when guidance backpropagates through the denoiser (Tweedie), the VAE decoder and
    the reward (decode + reward are recomputed in the backward pass instead of stored);
    ``vae_slicing`` decodes one image at a time, ``vae_tiling`` in tiles (large images);
    ``offload`` keeps each module on the CPU until it runs (diffusers' model CPU offload; GPU only).
    """

    def __init__(self, pipe: Any, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 gradient_checkpointing: bool = False, info: dict[str, Any] | None = None, name: str | None = None,
                 vae_slicing: bool = False, vae_tiling: bool = False, offload: bool = False, adopt: bool = True):
        """``info``: the folder's ``tiltgen.json`` (built-in models): default steps, CFG and T5
        length, and the vocabulary prompts must stay within; ``name``: how the model was addressed.
        ``adopt`` False: a read-only view of a pipeline the caller owns (``tiltgen.guide``): no
        casting or moving, no ``requires_grad_``/``eval`` and no memory options are applied to it."""
        self.info = dict(info or {})
        self.name = name or self.info.get("name") or type(pipe).__name__
        name = type(pipe).__name__
        if name not in FAMILIES:
            raise TiltgenError(f"pipeline class {name!r} is not supported; supported: {', '.join(FAMILIES)}")
        self.pipe = pipe
        self.family = FAMILIES[name]
        if not adopt and (offload or dtype is not None or device is not None or gradient_checkpointing
                          or vae_slicing or vae_tiling):
            raise TiltgenError("a pipeline viewed without adopting it keeps its own device, dtype and memory settings")
        if offload and (device is None or torch.device(device).type != "cuda"):
            raise TiltgenError("offload keeps modules on the CPU and moves each to the GPU when it runs: it needs "
                               f"a CUDA device (got {device or 'none'})")
        if offload:
            if dtype is not None:
                pipe.to(dtype=dtype)
            pipe.enable_model_cpu_offload(device=device)
        elif dtype is not None or device is not None:
            pipe.to(device=device, dtype=dtype)
        self.denoiser = pipe.unet if self.family in ("sd", "sdxl") else pipe.transformer
        # with offload the modules sit on the CPU between calls; tensors live on the execution device
        self.device = torch.device(device) if offload else self.denoiser.device
        if not adopt:  # the caller's pipeline may offload itself: compute where it runs its modules
            self.device = torch.device(getattr(pipe, "_execution_device", self.device))
        self.dtype = self.denoiser.dtype
        self.memory_options = {"gradient_checkpointing": gradient_checkpointing, "vae_slicing": vae_slicing,
                               "vae_tiling": vae_tiling, "offload": offload}
        for module in self._modules() if adopt else ():
            module.requires_grad_(False)
            module.eval()
        if gradient_checkpointing:
            for module in (self.denoiser, pipe.vae):
                if getattr(module, "_supports_gradient_checkpointing", False):
                    module.enable_gradient_checkpointing()
        if vae_slicing:
            pipe.vae.enable_slicing()
        if vae_tiling:
            pipe.vae.enable_tiling()
        self.scheduler_config = dict(pipe.scheduler.config)
        if self.family in ("sd", "sdxl"):
            if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
                raise TiltgenError("UNets with a guidance-scale embedding (LCM) are not supported")
            if self.scheduler_config.get("rescale_betas_zero_snr"):
                raise TiltgenError("zero-terminal-SNR schedules (rescale_betas_zero_snr) are not supported: "
                                   "alpha(1) = 0 makes an eps model undefined at t = 1")
            kind = self.scheduler_config.get("prediction_type", "epsilon")
            if kind not in _UNET_PREDICTIONS:
                raise TiltgenError(f"UNet prediction_type {kind!r} is not supported; supported: epsilon, v_prediction")
            self.prediction = _UNET_PREDICTIONS[kind]
            beta_schedule = self.scheduler_config.get("beta_schedule", "linear")
            n = int(self.scheduler_config.get("num_train_timesteps", 1000))
            if beta_schedule in ("linear", "scaled_linear") and self.scheduler_config.get("trained_betas") is None:
                self._vp = DiscreteVP.from_diffusers(beta_schedule, n, self.scheduler_config["beta_start"],
                                                     self.scheduler_config["beta_end"])
            else:
                self._vp = DiscreteVP(pipe.scheduler.betas)
        else:
            self.prediction = "velocity"

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, cache_dir: str | None = None,
                        revision: str | None = None, variant: str | None = None,
                        gradient_checkpointing: bool = False, vae_slicing: bool = False,
                        vae_tiling: bool = False, offload: bool = False) -> "DiffusersBackend":
        """Load from a ``save_pretrained`` folder or a model id in the local HF cache."""
        from ...builtin import read_info
        from .loading import load_pipeline, resolve_model_path

        path = resolve_model_path(name_or_path, cache_dir=cache_dir, revision=revision)
        pipe = load_pipeline(path, torch_dtype=dtype, variant=variant)
        return cls(pipe, device=device, gradient_checkpointing=gradient_checkpointing, info=read_info(path),
                   name=str(name_or_path), vae_slicing=vae_slicing, vae_tiling=vae_tiling, offload=offload)

    @property
    def default_steps(self) -> int:
        """Sampling steps a model is meant for (its ``tiltgen.json``; else 30)."""
        return int(self.info.get("default_steps", 30))

    def default_guidance_scale(self) -> float:
        """Classifier-free guidance scale by default (its ``tiltgen.json``; else the pipeline family's)."""
        if "default_cfg" in self.info:
            return float(self.info["default_cfg"])
        return {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5}[self.family]

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Models with a closed vocabulary (the built-in ones) refuse prompts with other words."""
        vocabulary = self.info.get("vocabulary")
        if not vocabulary:
            return
        known = set(vocabulary)
        for prompt in prompts:
            unknown = [w for w in str(prompt).lower().rstrip(".").split() if w not in known]
            if unknown:
                raise TiltgenError(f"unknown word {unknown[0]!r} in prompt {prompt!r}: {self.name} knows only the "
                                   f"built-in world's words: {', '.join(vocabulary)}")

    def fingerprint(self) -> str:
        """A short hash of the denoiser's config and weights: which base model a guidance network
        belongs to, wherever its folder lies. Each tensor contributes its name, shape and up to
        4096 evenly spaced values, so hashing a real checkpoint takes well under a second."""
        import hashlib
        import json as _json

        if getattr(self, "_fingerprint", None) is None:
            # "_name_or_path" (where it was loaded from) and "_diffusers_version" say nothing about
            # the model: a copied or reinstalled folder must keep its fingerprint
            config = {k: v for k, v in dict(self.denoiser.config).items() if not k.startswith("_")}
            h = hashlib.sha256(_json.dumps(config, sort_keys=True, default=str).encode())
            for key, value in sorted(self.denoiser.state_dict().items()):
                flat = value.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float32).cpu()
                h.update(f"{key}{tuple(value.shape)}".encode())
                h.update(sample.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        if self.family in ("sd", "sdxl"):
            size = self.denoiser.config.sample_size * self.vae_scale_factor
        elif self.family == "sd3":
            size = self.denoiser.config.sample_size * self.vae_scale_factor
        else:
            size = 128 * self.vae_scale_factor
        return int(size), int(size)

    def at(self, height: int | None = None, width: int | None = None, *, guidance_scale: float | None = None,
           **encode_defaults: Any) -> "LatentModel":
        """The canonical latent-space model for images of ``height`` x ``width`` pixels.

        ``guidance_scale`` (and other :meth:`encode` keywords) are the defaults used when the
        model is called with plain prompts as ``cond`` (e.g. by ``train_guidance``).
        """
        dh, dw = self.default_size()
        return LatentModel(self, int(height or dh), int(width or dw), guidance_scale=guidance_scale, **encode_defaults)

    # ---- text -------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None, *,
               guidance_scale: float | None = None, true_cfg_scale: float = 1.0, height: int | None = None,
               width: int | None = None, max_sequence_length: int | None = None) -> PromptCondition:
        """Encode each distinct prompt once; one row per sample in the result.

        ``guidance_scale`` is the classifier-free guidance scale (CFG on when > 1; SD-Turbo and
        SDXL-Turbo use 0 or 1). For FLUX it is the *embedded* guidance of guidance-distilled
        models, and CFG with negative prompts is ``true_cfg_scale`` (as in the FLUX pipeline).
        """
        prompts = [str(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        if not prompts:
            raise TiltgenError("need at least one prompt")
        self.check_prompts(prompts)
        if negative_prompts is None or isinstance(negative_prompts, str):
            negatives = [negative_prompts or ""] * len(prompts)
        else:
            negatives = [str(p) for p in negative_prompts]
            if len(negatives) != len(prompts):
                raise TiltgenError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        pairs = list(dict.fromkeys(zip(prompts, negatives)))
        index = torch.tensor([pairs.index(p) for p in zip(prompts, negatives)])
        uniq_p, uniq_n = [p for p, _ in pairs], [n for _, n in pairs]
        # None (not "") for absent negatives: SDXL then uses zero embeddings (force_zeros_for_empty_prompt)
        neg_arg = None if not any(uniq_n) else uniq_n
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale()
        if max_sequence_length is None and "max_sequence_length" in self.info:
            max_sequence_length = int(self.info["max_sequence_length"])
        height, width = (height, width) if height and width else self.default_size()
        cfg_scale = float(guidance_scale if self.family != "flux" else true_cfg_scale)
        cfg = cfg_scale > 1.0
        extra: dict[str, Any] = {}
        with torch.no_grad():
            if self.family == "sd":
                pos, neg = self.pipe.encode_prompt(uniq_p, self.device, 1, cfg, neg_arg if cfg else None)
                embeds = {"encoder_hidden_states": pos}
                negative = {"encoder_hidden_states": neg} if cfg else None
            elif self.family == "sdxl":
                pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                    uniq_p, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                    negative_prompt=neg_arg if cfg else None)
                proj = (self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None
                        else int(pooled.shape[-1]))
                time_ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pos.dtype,
                                                       text_encoder_projection_dim=proj).to(self.device)
                time_ids = time_ids.repeat(len(uniq_p), 1)
                embeds = {"encoder_hidden_states": pos, "text_embeds": pooled, "time_ids": time_ids}
                negative = ({"encoder_hidden_states": neg, "text_embeds": neg_pooled, "time_ids": time_ids}
                            if cfg else None)
            elif self.family == "sd3":
                kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
                pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                    uniq_p, None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                    negative_prompt=neg_arg if cfg else None, **kw)
                embeds = {"encoder_hidden_states": pos, "pooled_projections": pooled}
                negative = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled} if cfg else None
            else:
                kw = {"max_sequence_length": max_sequence_length or 512}
                pos, pooled, text_ids = self.pipe.encode_prompt(uniq_p, None, device=self.device, **kw)
                embeds = {"encoder_hidden_states": pos, "pooled_projections": pooled}
                extra["txt_ids"] = text_ids
                negative = None
                if cfg:
                    neg, neg_pooled, neg_ids = self.pipe.encode_prompt(uniq_n, None, device=self.device, **kw)
                    negative = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
                    extra["negative_txt_ids"] = neg_ids
                if self.denoiser.config.guidance_embeds:
                    embeds["guidance"] = torch.full((len(uniq_p),), float(guidance_scale), dtype=torch.float32,
                                                    device=self.device)
                    if negative is not None:
                        negative["guidance"] = embeds["guidance"]
        return PromptCondition(prompts=prompts, embeds=_expand(embeds, index),
                               negative=None if negative is None else _expand(negative, index),
                               cfg_scale=cfg_scale, extra=extra)


class LatentModel:
    """The canonical :class:`~tiltgen.core.model.Model` of a pipeline at one image size.

    Call it as ``model(x_t, t, cond)`` with latents x_t [N, C, h, w], canonical t [N] and a
    :class:`PromptCondition` from :meth:`encode`. ``schedule``, ``prediction`` and
    ``latent_shape`` describe it; :meth:`times` gives the scheduler's own grid.
    """

    def __init__(self, backend: DiffusersBackend, height: int, width: int, guidance_scale: float | None = None,
                 **encode_defaults: Any):
        self.backend = backend
        self.encode_defaults = dict(encode_defaults, guidance_scale=guidance_scale)
        self._cache: dict[str, PromptCondition] = {}
        self.pipe = backend.pipe
        self.family = backend.family
        self.prediction = backend.prediction
        f = backend.vae_scale_factor
        multiple = 2 * f if self.family == "flux" else f
        if height % multiple or width % multiple:
            raise TiltgenError(f"height and width must be multiples of {multiple} for this pipeline, "
                               f"got {height}x{width}")
        self.height, self.width = height, width
        channels = self.pipe.vae.config.latent_channels
        self.latent_shape = (channels, height // f, width // f)
        self._mu: float | None = None
        if self.family in ("sd", "sdxl"):
            self.schedule: Schedule = backend._vp
        else:
            config = backend.scheduler_config
            if config.get("use_dynamic_shifting"):
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift

                patch = 2 if self.family == "flux" else self.backend.denoiser.config.patch_size
                seq_len = (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch)
                self._mu = float(calculate_shift(seq_len, config.get("base_image_seq_len", 256),
                                                 config.get("max_image_seq_len", 4096),
                                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15)))
                kind = config.get("time_shift_type", "exponential")
                shift = math.exp(self._mu) if kind == "exponential" else self._mu
            else:
                shift = float(config.get("shift", 1.0))
            self.schedule = RectifiedFlow(shift)
        if self.family == "flux":
            self._img_ids = self.pipe._prepare_latent_image_ids(1, self.latent_shape[1] // 2, self.latent_shape[2] // 2,
                                                                backend.device, backend.dtype)

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def info(self) -> dict[str, Any]:
        return self.backend.info

    def fingerprint(self) -> str:
        return self.backend.fingerprint()

    def __repr__(self) -> str:
        return (f"LatentModel({type(self.pipe).__name__}, {self.height}x{self.width}, latent {self.latent_shape}, "
                f"{self.prediction}, {self.schedule!r})")

    # ---- conditioning -------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None,
               **kwargs: Any) -> PromptCondition:
        """:meth:`DiffusersBackend.encode` at this size, with this model's defaults."""
        options = {k: v for k, v in self.encode_defaults.items() if v is not None}
        options.update(kwargs)
        return self.backend.encode(prompts, negative_prompts, height=self.height, width=self.width, **options)

    def condition(self, cond: Any, n: int) -> PromptCondition:
        """``cond`` as a PromptCondition of N rows: plain prompts are encoded (cached per prompt)
        and a one-row condition is broadcast, so generic library code can pass a prompt string."""
        return prompt_condition(cond, n, encode=self.encode, cache=self._cache, kind=PromptCondition,
                                what="a diffusers model", unit="latents")

    def prompt_embedding(self, cond: Any, pooling: str = "padded") -> Tensor:
        """A fixed-size text embedding per sample [N, E] (float32) for prompt-conditional guidance
        networks: the pooled text embedding (SDXL, SD3, FLUX) or, for SD 1.x/2.x, the mean of the
        text encoder's last hidden state over every padded position (``pooling="padded"``) or over
        the prompt's own tokens only (``"tokens"``). With a text encoder whose padding positions do
        not attend to the words, the padded mean dilutes the prompt; ``pooling`` is ignored where
        the pipeline already gives a pooled embedding."""
        check_choice("prompt pooling", pooling, PROMPT_POOLINGS)
        cond = self.condition(cond, len(cond) if isinstance(cond, PromptCondition) else
                              (1 if isinstance(cond, str) else len(cond)))
        if "text_embeds" in cond.embeds:
            emb = cond.embeds["text_embeds"]
        elif "pooled_projections" in cond.embeds:
            emb = cond.embeds["pooled_projections"]
        elif pooling == "tokens":
            emb = self._token_mean(cond)
        else:
            emb = cond.embeds["encoder_hidden_states"].mean(1)
        return emb.detach().float()

    def _token_mean(self, cond: PromptCondition) -> Tensor:
        """Mean of the last hidden state [N, L, E] over each prompt's tokens (the tokenizer's
        attention mask at the pipeline's padded length L) -> [N, E]."""
        hidden = cond.embeds["encoder_hidden_states"]
        mask = self.pipe.tokenizer(list(cond.prompts), padding="max_length", max_length=hidden.shape[1],
                                   truncation=True, return_tensors="pt").attention_mask
        mask = mask.to(device=hidden.device, dtype=hidden.dtype)[..., None]
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    # ---- time conversion ------------------------------------------------------------------------
    def _scheduler(self) -> Any:
        sched = self.pipe.scheduler
        if self.family in ("sd", "sdxl") and not _has_sigmas(sched) and type(sched).__name__ != "DDIMScheduler":
            from diffusers import DDIMScheduler  # e.g. PNDM: use the DDIM grid of the same config

            return DDIMScheduler.from_config(sched.config)
        return type(sched).from_config(sched.config)

    def times(self, steps: int) -> Tensor:
        """The canonical time grid (float64, decreasing) of the pipeline's scheduler for ``steps`` steps."""
        if steps < 1:
            raise TiltgenError(f"steps must be >= 1, got {steps}")
        sched = self._scheduler()
        if self.family in ("sd", "sdxl"):
            sched.set_timesteps(steps)
            ts = sched.timesteps.to(torch.float64)
            if len(ts) != steps or not bool((ts[1:] < ts[:-1]).all()):
                raise TiltgenError(f"scheduler {type(sched).__name__} gives a grid tiltgen cannot follow")
            grid = self.schedule.timestep_to_t(ts)
            if _has_sigmas(sched):  # Euler-type: the last sigma is 0, i.e. t = 0
                end = torch.zeros(1, dtype=torch.float64)
            else:  # DDIM: the final "previous" alphas_cumprod
                end = torch.zeros(1, dtype=torch.float64) if sched.config.get("set_alpha_to_one", True) \
                    else self.schedule.timestep_to_t(torch.zeros(1))
            return torch.cat([grid, end])
        kwargs: dict[str, Any] = {}
        if self._mu is not None:
            kwargs["mu"] = self._mu
        if self.family == "flux":
            kwargs["sigmas"] = torch.linspace(1.0, 1.0 / steps, steps).numpy()
            sched.set_timesteps(None if "sigmas" in kwargs else steps, **kwargs)
        else:
            sched.set_timesteps(steps, **kwargs)
        sigmas = sched.sigmas.to(torch.float64)
        return self.schedule.native_to_t(sigmas)

    def initial_latents(self, seeds: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """The pipeline's starting latents for per-sample ``seeds``, in the canonical (VP / flow) scaling.

        Each row is ``torch.randn(latent_shape, generator=Generator().manual_seed(seed))``, as the
        pipelines draw with a list of per-sample generators; Euler-type VP schedulers' VE scaling
        (``init_noise_sigma``) is converted to the VP state.
        """
        z = SeededNoise(seeds, self.latent_shape, dtype=torch.float32)()
        if self.family in ("sd", "sdxl"):
            sched = self._scheduler()
            sched.set_timesteps(1)
            if _has_sigmas(sched):
                sigma_max = float(sched.sigmas.max())
                z = z * float(sched.init_noise_sigma) / math.sqrt(sigma_max**2 + 1)
            else:
                z = z * float(sched.init_noise_sigma)
        return z.to(device=self.backend.device, dtype=dtype)

    # ---- the model call ---------------------------------------------------------------------------
    def __call__(self, x_t: Tensor, t: Tensor, cond: PromptCondition) -> Tensor:
        n = x_t.shape[0]
        cond = self.condition(cond, n)
        if x_t.shape[1:] != self.latent_shape:
            raise TiltgenError(f"latents of shape {tuple(x_t.shape[1:])}, expected {self.latent_shape}")
        t = torch.as_tensor(t, device=x_t.device).to(torch.float64).reshape(-1).expand(n)
        x = x_t.to(self.backend.dtype)
        if cond.uses_cfg:
            both = {k: torch.cat([cond.negative[k], cond.embeds[k]]) for k in cond.embeds}
            out = self._denoise(torch.cat([x, x]), torch.cat([t, t]), both, cond, negative_first=True)
            uncond, text = out.chunk(2)
            out = uncond + cond.cfg_scale * (text - uncond)
        else:
            out = self._denoise(x, t, cond.embeds, cond)
        return self.to_canonical(out.to(x_t.dtype), t)

    def to_canonical(self, out: Tensor, t: Tensor) -> Tensor:
        """The denoiser's (CFG-combined) output [N, ...] as tiltgen's prediction at canonical t [N]:
        a flow's native dx/dsigma becomes dx/dt; eps and v are the same in both."""
        if self.family not in ("sd3", "flux"):
            return out
        return out * self.schedule.d_sigma(t).to(out.dtype).reshape(-1, *([1] * (out.ndim - 1)))

    def to_native(self, prediction: Tensor, t: Tensor) -> Tensor:
        """Inverse of :meth:`to_canonical`."""
        if self.family not in ("sd3", "flux"):
            return prediction
        return prediction / self.schedule.d_sigma(t).to(prediction.dtype).reshape(-1, *([1] * (prediction.ndim - 1)))

    def t_of_timestep(self, timestep: Any, rows: int) -> Tensor:
        """Canonical t [rows] (float64) of the ``timestep`` argument the pipeline passes its denoiser
        (inverse of what :meth:`_denoise` passes): a UNet's diffusers timestep, SD3's
        sigma * num_train_timesteps, FLUX's sigma."""
        ts = torch.as_tensor(timestep).to(torch.float64).reshape(-1).cpu()
        ts = ts.expand(rows) if ts.numel() == 1 else ts
        if self.family in ("sd", "sdxl"):
            return self.schedule.timestep_to_t(ts)
        if self.family == "sd3":
            ts = ts / float(self.backend.scheduler_config.get("num_train_timesteps", 1000))
        return self.schedule.native_to_t(ts)

    def _denoise(self, x: Tensor, t: Tensor, embeds: dict[str, Tensor], cond: PromptCondition,
                 negative_first: bool = False) -> Tensor:
        if self.family in ("sd", "sdxl"):
            timestep = self.schedule.t_to_timestep(t).to(torch.float32)
            added = None
            if self.family == "sdxl":
                added = {"text_embeds": embeds["text_embeds"], "time_ids": embeds["time_ids"]}
            return self.backend.denoiser(x, timestep, encoder_hidden_states=embeds["encoder_hidden_states"],
                                         added_cond_kwargs=added, return_dict=False)[0]
        sigma = self.schedule.sigma(t)
        if self.family == "sd3":
            timestep = (sigma * self.backend.scheduler_config.get("num_train_timesteps", 1000)).to(torch.float32)
            return self.backend.denoiser(hidden_states=x, timestep=timestep,
                                         encoder_hidden_states=embeds["encoder_hidden_states"],
                                         pooled_projections=embeds["pooled_projections"], return_dict=False)[0]
        # FLUX: pack 2x2 patches, call, unpack; both prompt halves share txt_ids when CFG is on
        n, c, h, w = x.shape
        packed = pack_latents(x)
        if negative_first and "negative_txt_ids" in cond.extra:
            # two calls: FLUX's true CFG runs the negative prompt with its own text ids
            half = n // 2
            outs = [self._flux_call(packed[:half], sigma[:half], {k: v[:half] for k, v in embeds.items()},
                                    cond.extra["negative_txt_ids"]),
                    self._flux_call(packed[half:], sigma[half:], {k: v[half:] for k, v in embeds.items()},
                                    cond.extra["txt_ids"])]
            out = torch.cat(outs)
        else:
            out = self._flux_call(packed, sigma, embeds, cond.extra["txt_ids"])
        return unpack_latents(out, h, w)

    def _flux_call(self, packed: Tensor, sigma: Tensor, embeds: dict[str, Tensor], txt_ids: Tensor) -> Tensor:
        guidance = embeds.get("guidance")
        return self.backend.denoiser(hidden_states=packed, timestep=sigma.to(torch.float32),
                                     guidance=None if guidance is None else guidance.to(torch.float32),
                                     pooled_projections=embeds["pooled_projections"],
                                     encoder_hidden_states=embeds["encoder_hidden_states"],
                                     txt_ids=txt_ids, img_ids=self._img_ids, return_dict=False)[0]

    # ---- images -------------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1], NCHW float32 (differentiable; no_grad is the caller's choice)."""
        vae = self.pipe.vae
        config = vae.config
        z = latents.to(vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if self.family == "sdxl" and mean is not None and std is not None:
            shape = (1, config.latent_channels, 1, 1)
            z = z * torch.tensor(std, device=z.device, dtype=z.dtype).view(shape) / config.scaling_factor \
                + torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape)
        else:
            z = z / config.scaling_factor
            if getattr(config, "shift_factor", None) is not None and self.family in ("sd3", "flux"):
                z = z + config.shift_factor
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def latent_reward(self, reward: Any) -> "LatentReward":
        """``reward`` (on images in [0, 1] and prompts) as a reward on latents: decode, then score."""
        return LatentReward(reward, self)

    # ---- sampling -------------------------------------------------------------------------------------
    def sample(self, cond: PromptCondition, *, seeds: Sequence[int] | None = None, seed: int = 0, steps: int = 50,
               sampler: str = "ddim", guidance: Any = None, model: Model | None = None, times: Tensor | None = None,
               decode: bool = True, callback: Callable | None = None, progress: bool = False) -> "SampleOutput":
        """Sample latents (and images) for ``cond``; ``guidance`` is an estimator wrapped by
        GuidedModel, or pass any ``model`` built on this one (e.g. a counting or guided wrapper).

        The default ``ddim`` sampler on the scheduler's grid reproduces the pipeline (unguided).
        """
        seeds = list(seeds) if seeds is not None else seeds_for(len(cond), seed)
        if len(seeds) != len(cond):
            raise TiltgenError(f"{len(seeds)} seeds for {len(cond)} prompts")
        grid = self.times(steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
        if model is None:
            model = self
            if guidance is not None:
                from ...tilt.base import GuidedModel

                model = GuidedModel(self, self.schedule, guidance)
        elif guidance is not None:
            raise TiltgenError("pass either guidance= or model=, not both")
        x_init = self.initial_latents(seeds)
        with torch.no_grad():
            latents = core_sample(model, self.schedule, cond=cond, x_init=x_init, seeds=seeds, sampler=sampler,
                                  times=grid, callback=callback, progress=progress, device=x_init.device)
            images = self.decode(latents) if decode else None
        return SampleOutput(latents=latents, images=images, times=grid)

    def evals_per_call(self, cond: PromptCondition | None = None) -> int:
        """Network evaluations per sample per model call (2 with classifier-free guidance)."""
        if cond is None:
            scale = self.encode_defaults.get("guidance_scale")
            scale = self.backend.default_guidance_scale() if scale is None else float(scale)
            return 2 if scale > 1.0 and self.family != "flux" else 1
        return 2 if cond.uses_cfg else 1


@dataclass
class SampleOutput:
    latents: Tensor
    images: Tensor | None
    times: Tensor


class LatentReward:
    """A reward on decoded latents: ``reward(decode(x0), prompts)``; differentiable if ``reward`` is.

    Decoding happens only when the reward is evaluated (guidance steps that need it).
    """

    def __init__(self, reward: Any, model: LatentModel):
        from ...core.reward import as_reward, reward_name

        self.reward = as_reward(reward)
        self.model = model
        self.differentiable = self.reward.differentiable
        self.declared = getattr(self.reward, "declared", True)
        self.name = reward_name(self.reward)

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        prompts = getattr(cond, "prompts", cond)  # a PromptCondition (or builtin TextCondition), or prompts
        if isinstance(prompts, str):
            prompts = [prompts] * x0.shape[0]
        # no graph through the VAE unless a gradient of this reward can be taken and is wanted
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            if torch.is_grad_enabled() and x0.requires_grad and \
                    self.model.backend.memory_options.get("gradient_checkpointing"):
                from torch.utils.checkpoint import checkpoint

                # keep only x0: decode and reward run again in the backward pass
                return checkpoint(lambda z: self.reward(self.model.decode(z), prompts).float(), x0,
                                  use_reentrant=False)
            return self.reward(self.model.decode(x0), prompts).float()


def _has_sigmas(scheduler: Any) -> bool:
    return hasattr(scheduler, "sigmas") and type(scheduler).__name__.startswith(("Euler", "KDPM", "Heun", "LMS"))

"""Guidance estimators for text-to-image models, by method name: one place for ``tiltgen sample``
and ``tiltgen demo`` (diffusers pipelines and built-in models alike)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import TiltgenError

METHODS = ("unguided", "tweedie", "trainingfree", "learned")
DEFAULT_BETA = 0.1
BANK_SEED_OFFSET = 500_000  # bank sample j of a prompt uses the seed of its image BANK_SEED_OFFSET + j
CANDIDATE_STRIDE = 1_000_003  # best-of-N: candidate k of an image seeded s uses s + k * CANDIDATE_STRIDE


def build_estimator(model: Any, method: str, reward: Any, beta: float | None, *, guidance: str | None = None,
                    scale: float | None = None, t_window: tuple[float, float] | None = None,
                    data_var: float | Sequence[float] | None = None,
                    variant: str | None = None, seed: int = 0, force_guidance: bool = False,
                    cache_dir: str | None = None, bank: Any = None, steps: int | None = None,
                    keep_noise_norm: bool = True) -> tuple[Any, float | None]:
    """(estimator or None for ``unguided``, the beta it tilts at) for ``model`` (a diffusers
    LatentModel). ``learned`` loads ``guidance`` (a folder or ``builtin:<name>``), refuses a
    network trained for another base model and tilts at the network's own beta: a different
    ``beta`` raises. ``tweedie`` and ``trainingfree`` need ``reward`` and default to beta = 0.1;
    ``data_var`` and ``variant`` default to the model's ``tiltgen.json`` values, else 1 and
    ``bounded`` (:func:`default_variant`); ``data_var`` is one number or one per latent channel
    (:func:`latent_data_var`); ``tweedie``'s variants are ``plain`` (default) and ``damped``
    (the damped plug-in, tilt/tweedie.py). ``scale`` multiplies the guidance term: default 1, and for
    ``learned`` the network's calibrated scale when it has one (``tiltgen calibrate-guidance``).
    ``guidance`` may also be a hub id in the local cache (``cache_dir``); ``force_guidance`` loads a
    network trained for another base model with a warning instead of refusing it. ``bank``
    (``trainingfree`` only): per-prompt sample banks from :func:`build_banks`. ``steps``: the
    sampler's number of steps (default: the model's own). Sampled in a single step, a generator is a
    deterministic map of its input noise: ``tweedie`` then tilts that noise (the noise tilt,
    tilt/tweedie.py), ``trainingfree`` and a network trained without noise_tilt are refused (their
    x0 shift would edit the output, not tilt the generator), and so is a noise-tilt network sampled
    in more than one step. A noise tilt keeps the noise's norm unless ``keep_noise_norm`` is False
    (tilt/base.py, :func:`~tiltgen.tilt.base.keep_noise_norm`)."""
    steps = steps if steps is not None else _default_steps(model)
    single_step = steps == 1
    if bank is not None and method != "trainingfree":
        raise TiltgenError(f"a sample bank is a prior of training-free guidance; --method {method} does not use one")
    if method == "unguided":
        return None, beta
    if method == "learned":
        estimator, beta = _learned(model, guidance, beta, scale, t_window, force_guidance, cache_dir)
        estimator.keep_noise_norm = bool(keep_noise_norm)
        _check_calibrated_noise_norm(estimator, guidance, scale)
        tilts_input = bool(getattr(estimator, "tilts_input", False))
        if tilts_input and steps is not None and not single_step:
            raise TiltgenError(f"the guidance network {guidance} tilts a one-step generator's input noise (it was "
                               f"trained with noise_tilt), which applies to a single-step sampler only, not {steps} "
                               f"steps: use --steps 1")
        if single_step and not tilts_input:
            raise TiltgenError(f"the guidance network {guidance} shifts x0 (it was trained without noise_tilt); "
                               f"sampled in a single step, that shift would land on the output image as an edit, "
                               f"not as a tilt of the generator. For a one-step generator train it with --noise-tilt "
                               f"(docs/learned-guidance.md, 'One-step generators'), or sample with more steps")
        return estimator, beta
    if method not in METHODS:
        raise TiltgenError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if reward is None:
        raise TiltgenError(f"--method {method} needs --reward")
    beta = DEFAULT_BETA if beta is None else beta
    latent_reward = model.latent_reward(reward)
    if method == "tweedie":
        from ..tilt import TweedieGuidance

        if variant not in (None, "plain", "damped"):
            raise TiltgenError(f"--method tweedie takes --variant plain or damped, not {variant!r}")
        return TweedieGuidance(latent_reward, beta, scale=1.0 if scale is None else scale, t_window=t_window,
                               damping=variant == "damped", schedule=model.schedule, noise_tilt=single_step,
                               keep_noise_norm=keep_noise_norm), beta
    if single_step:
        raise TiltgenError("--method trainingfree shifts x0_hat along the reward gradient without differentiating "
                           "the model; sampled in a single step, that shift would land on the output image as an "
                           "edit, not as a tilt of the generator. For a one-step generator use --method tweedie "
                           "(it tilts the input noise through the generator), a noise-tilt guidance network "
                           "(--method learned), or best-of-N; or sample with more steps")
    from ..tilt.training_free import TrainingFreeGuidance

    if data_var is None:
        data_var = default_data_var(model)
    variant = variant or default_variant(model)
    return TrainingFreeGuidance(latent_reward, beta, model.schedule, data_var=latent_data_var(data_var, model),
                                variant=variant,
                                scale=1.0 if scale is None else scale,
                                t_window=t_window, seed=seed, bank=bank), beta


def _check_calibrated_noise_norm(estimator: Any, guidance: Any, scale: float | None) -> None:
    """Warn when a noise-tilt network samples at a calibrated scale picked with the other noise-norm
    setting (calibrations before the norm was kept have none recorded: the free shift)."""
    calibration = estimator.record.get("calibration") or {}
    if scale is not None or not calibration or not estimator.tilts_input:
        return
    calibrated = bool(calibration.get("keep_noise_norm", False))
    if calibrated != estimator.keep_noise_norm:
        how = {True: "keeping the noise's norm", False: "with the free noise shift"}
        warnings.warn(f"the guidance network {guidance} was calibrated {how[calibrated]} (scale "
                      f"{calibration.get('scale')}) but samples {how[estimator.keep_noise_norm]}: rerun "
                      "`tiltgen calibrate-guidance`, or pass --scale", stacklevel=3)


def _default_steps(model: Any) -> int | None:
    """The model's own number of sampler steps (a diffusers LatentModel's backend records it), or None."""
    return getattr(getattr(model, "backend", None), "default_steps", None)


def build_banks(model: Any, reward: Any, prompts: Sequence[tuple[Any, str | None, int]], size: int, *,
                steps: int | None = None, sampler: str = "ddim", batch_size: int = 8, progress: bool = False,
                sampling_model: Any = None, lazy: bool = False, **encode: Any) -> "PromptBanks":
    """One :class:`~tiltgen.tilt.bank.SampleBank` per distinct prompt: ``size`` unguided latents of
    ``model`` (a diffusers LatentModel) for it, scored by ``reward`` through the decoder.

    ``prompts`` holds (prompt, negative prompt or None, first seed): sample j of the bank uses
    seed first_seed + BANK_SEED_OFFSET + j, so it never repeats an image's seed (< BANK_SEED_OFFSET
    images per prompt). ``encode`` (e.g. guidance_scale) goes to ``model.encode``, as for the images:
    the bank must come from the distribution being guided. Each bank costs ``size`` unguided samples
    (drawn through ``sampling_model`` when given, e.g. a counting wrapper of ``model``). ``lazy``:
    draw a prompt's bank when guidance first asks for it (a process draws only the prompts it
    samples, a resumed run only the unfinished ones), else all of them now."""
    banks = PromptBanks(model, reward, prompts, size, steps=steps, sampler=sampler, batch_size=batch_size,
                        sampling_model=sampling_model, encode=encode)
    if not lazy:
        from tqdm.auto import tqdm

        for key in tqdm(list(banks), desc="sample banks", disable=not progress):
            banks[key]
    return banks


class PromptBanks(Mapping):
    """Sample banks by prompt text (see :func:`build_banks`), each drawn on first access."""

    def __init__(self, model: Any, reward: Any, prompts: Sequence[tuple[Any, str | None, int]], size: int, *,
                 steps: int | None, sampler: str, batch_size: int, sampling_model: Any, encode: dict[str, Any]):
        if size < 2:
            raise TiltgenError(f"a sample bank needs at least 2 samples, got --bank {size}")
        self._specs: dict[str, tuple[Any, str | None, int]] = {}
        for prompt, negative, seed in prompts:
            key = str(prompt)
            if key in self._specs and self._specs[key][1] != negative:
                raise TiltgenError(f"the prompt {key!r} appears with two negative prompts ({self._specs[key][1]!r}, "
                                   f"{negative!r}); a sample bank is per prompt: give each prompt one negative prompt")
            self._specs.setdefault(key, (prompt, negative, seed))
        self.model, self.size, self.sampler, self.batch_size = model, size, sampler, batch_size
        self.latent_reward = model.latent_reward(reward)
        self.steps = steps or model.backend.default_steps
        self.sampling_model, self.encode = sampling_model, encode
        self._banks: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._specs:
            raise KeyError(key)
        if key not in self._banks:
            self._banks[key] = self._draw(*self._specs[key])
        return self._banks[key]

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def drawn(self) -> list[str]:
        """The prompts whose banks have been drawn so far."""
        return list(self._banks)

    def _draw(self, prompt: Any, negative: str | None, seed: int) -> Any:
        from ..tilt.bank import SampleBank, score_samples

        seeds = [seed + BANK_SEED_OFFSET + j for j in range(self.size)]
        latents, values, grads = [], [], []
        for start in range(0, self.size, self.batch_size):
            chunk = seeds[start:start + self.batch_size]
            cond = self.model.encode([prompt] * len(chunk), None if negative is None else [negative] * len(chunk),
                                     **self.encode)
            x0 = self.model.sample(cond, seeds=chunk, steps=self.steps, sampler=self.sampler, decode=False,
                                   model=self.sampling_model).latents
            value, grad = score_samples(x0, self.latent_reward, cond)
            latents.append(x0)
            values.append(value)
            grads.append(grad)
        return SampleBank(torch.cat(latents), torch.cat(values), None if grads[0] is None else torch.cat(grads))


def latent_data_var(data_var: float | Sequence[float], model: Any) -> float | Tensor:
    """The training-free proxy's data variance for latents [N, C, h, w]: a number, or one variance
    per latent channel (a [C, 1, 1] tensor; C must be the model's latent channels)."""
    if isinstance(data_var, (int, float)):
        return float(data_var)
    values = [float(v) for v in data_var]
    channels = getattr(model, "latent_shape", (len(values),))[0]
    if len(values) != channels:
        raise TiltgenError(f"data_var gives {len(values)} per-channel variances but the model's latents have "
                           f"{channels} channels")
    return torch.tensor(values, dtype=torch.float64).reshape(-1, 1, 1)


def default_data_var(model: Any) -> float | list[float]:
    """The data variance a model folder records in its ``tiltgen.json`` (``data_var``: one number
    or one per latent channel), else 1 (latents normalised by their scaling factor)."""
    return getattr(model, "info", {}).get("data_var", 1.0)


def default_variant(model: Any) -> str:
    """The training-free variant a model recommends in its ``tiltgen.json``
    (``trainingfree_variant``), else ``bounded`` (the analytic benchmark's choice)."""
    return str(getattr(model, "info", {}).get("trainingfree_variant", "bounded"))


def _learned(model: Any, guidance: str | None, beta: float | None, scale: float | None,
             t_window: tuple[float, float] | None, force: bool = False,
             cache_dir: str | None = None) -> tuple[Any, float | None]:
    from ..tilt.learned import from_pretrained

    if not guidance:
        raise TiltgenError("--method learned needs --guidance PATH (a folder written by train-guidance)")
    estimator = from_pretrained(guidance, model, force=force, scale=scale, cache_dir=cache_dir)
    record = estimator.record
    trained_beta = float(record["beta"]) if "beta" in record else None
    if beta is not None and trained_beta is not None and abs(beta - trained_beta) > 1e-12:
        raise TiltgenError(f"the guidance network {guidance} was trained at beta={trained_beta:g}; "
                           f"omit --beta or pass the same value (got {beta:g})")
    if t_window is not None:
        estimator.t_window = t_window
    return estimator, trained_beta

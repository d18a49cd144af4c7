"""Guidance estimators for text-to-image models, by method name: one place for ``tiltgen sample``
and ``tiltgen demo`` (diffusers pipelines and built-in models alike)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import TiltgenError

METHODS = ("unguided", "tweedie", "trainingfree", "learned")
DEFAULT_BETA = 0.1


def build_estimator(model: Any, method: str, reward: Any, beta: float | None, *, guidance: str | None = None,
                    scale: float | None = None, t_window: tuple[float, float] | None = None,
                    data_var: float | Sequence[float] | None = None,
                    variant: str | None = None, seed: int = 0, force_guidance: bool = False,
                    cache_dir: str | None = None) -> tuple[Any, float | None]:
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
    network trained for another base model with a warning instead of refusing it."""
    if method == "unguided":
        return None, beta
    if method == "learned":
        return _learned(model, guidance, beta, scale, t_window, force_guidance, cache_dir)
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
                               damping=variant == "damped", schedule=model.schedule), beta
    from ..tilt.training_free import TrainingFreeGuidance

    if data_var is None:
        data_var = default_data_var(model)
    variant = variant or default_variant(model)
    return TrainingFreeGuidance(latent_reward, beta, model.schedule, data_var=latent_data_var(data_var, model),
                                variant=variant,
                                scale=1.0 if scale is None else scale,
                                t_window=t_window, seed=seed), beta


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

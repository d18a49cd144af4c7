"""The guidance-estimator protocol and the model wrapper that applies it.

An estimator sees the state, the time, the conditioning and the base model's x0_hat (with
its autograd graph to x_t when it sets ``needs_model_grad``) and returns a :class:`Tilt`.
:class:`GuidedModel` is itself a model, so samplers never know about guidance.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..core.conversions import coefficients, from_x0_eps, to_x0_eps
from ..core.model import Model, as_model
from ..core.schedules import Schedule
from ..errors import TiltgenError
from .decomposition import Tilt, apply_tilt


@runtime_checkable
class GuidanceEstimator(Protocol):
    """Estimates g_t = grad log h_t (or the equivalent x0 shift)."""

    needs_model_grad: bool

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tilt: ...


def in_window(t: Tensor, window: tuple[float, float] | None) -> Tensor | None:
    """[N] bool mask of times inside the closed window [lo, hi], or None for no window."""
    if window is None:
        return None
    lo, hi = window
    return (t >= lo) & (t <= hi)


def per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product [N, 1, ...] (broadcasts against a and b)."""
    return (a * b).flatten(1).sum(1).reshape((a.shape[0],) + (1,) * (a.ndim - 1))


def keep_noise_norm(x_t: Tensor, shifted: Tensor) -> Tensor:
    """``shifted`` rescaled per sample to the norm of ``x_t`` [N, ...]: the direction of the tilted
    noise, the radius of the base noise.

    A noise tilt x_T + s is the exact tilt of N(0, sigma^2 I) only for a log-linear h; a first-order
    shift by a large gradient also moves the noise off the sphere of radius ~ sigma sqrt(D) where
    the generator was trained. A reward of bounded range R cannot do that: under the exact tilt
    p* ∝ N(x_T) exp(r/beta) the log-density of radius rho + delta falls by about rho delta /
    sigma^2, against at most R / beta gained. Keeping each sample's radius keeps the first-order
    tilt's law of directions exactly and the base law of radii (docs/learned-guidance.md, "Keeping
    the noise's norm")."""
    dims = tuple(range(1, x_t.ndim))
    radius = x_t.pow(2).sum(dims, keepdim=True).sqrt()
    tilted = shifted.pow(2).sum(dims, keepdim=True).sqrt()
    return shifted * (radius / tilted.clamp_min(torch.finfo(tilted.dtype).tiny))


def check_window(window: tuple[float, float] | None) -> tuple[float, float] | None:
    if window is None:
        return None
    lo, hi = (float(v) for v in window)
    if not 0 <= lo < hi <= 1:
        raise TiltgenError(f"time window must satisfy 0 <= lo < hi <= 1, got {window}")
    return lo, hi


class GuidedModel:
    """``model`` with the reward tilt of ``estimator`` applied to its output (same kind)."""

    def __init__(self, model: Model, schedule: Schedule, estimator: GuidanceEstimator):
        self.model = as_model(model)
        self.prediction = self.model.prediction
        self.schedule = schedule
        self.estimator = estimator

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        c = coefficients(self.schedule, t, x_t)
        if getattr(self.estimator, "tilts_input", False):
            return self._input_tilted(x_t, t, cond, c)
        if self.estimator.needs_model_grad:
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                x0, eps = to_x0_eps(self.prediction, self.model(x, t, cond), x, c)
                _check_x0(x0, t, self.prediction)
                tilt = self.estimator(x, t, cond, x0)
            x0, eps = x0.detach(), eps.detach()
        else:
            x0, eps = to_x0_eps(self.prediction, self.model(x_t, t, cond), x_t, c)
            _check_x0(x0, t, self.prediction)
            tilt = self.estimator(x_t, t, cond, x0)
        return from_x0_eps(self.prediction, *apply_tilt(x0, eps, tilt, c), c)

    def _input_tilted(self, x_t: Tensor, t: Tensor, cond: Any, c: Any) -> Tensor:
        """Evaluate the model at the shifted input x_t + estimator.input_shift (a deterministic
        generator's tilted noise), and return its x0 as a prediction at the unshifted x_t.
        An estimator with ``needs_model_grad`` gets the model's x0 at x_t with its graph to x_t
        (``input_shift(x_t, t, cond, x0_hat)``): the generator is differentiated, then called again."""
        self._check_input_time(t)
        if self.estimator.needs_model_grad:
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                x0, _ = to_x0_eps(self.prediction, self.model(x, t, cond), x, c)
                shift = self.estimator.input_shift(x, t, cond, x0).detach()
        else:
            shift = self.estimator.input_shift(x_t, t, cond)
        x_in = x_t + shift
        if getattr(self.estimator, "keep_noise_norm", False):
            x_in = keep_noise_norm(x_t, x_in)
        x0, _ = to_x0_eps(self.prediction, self.model(x_in, t, cond), x_in, c)
        return from_x0_eps(self.prediction, x0, (x_t - c.alpha * x0) / c.sigma, c)

    def _check_input_time(self, t: Tensor) -> None:
        """A noise tilt shifts a one-step generator's Gaussian input, at the sampler's start time only:
        a model call at any later time means a sampler with more than one step, where it is wrong."""
        start = float(getattr(self.schedule, "t_max", 1.0))
        times = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        later = times[times < start - 1e-6]
        if later.numel():
            first = float(later[0])
            raise TiltgenError(f"this guidance tilts a one-step generator's input noise (the model call at t = "
                               f"{start:g}), but the sampler also calls the model at t = {first:.4g}: sample with "
                               f"a single step (--steps 1, num_inference_steps=1)")


def _check_x0(x0: Tensor, t: Tensor, prediction: str) -> None:
    """Guidance reads the model's x0_hat; name a non-finite one here, not as the reward's fault later."""
    bad = ~torch.isfinite(x0.detach()).flatten(1).all(1)
    if bool(bad.any()):
        first = float(torch.as_tensor(t).reshape(-1).expand(x0.shape[0])[bad][0])
        hint = (" (an eps prediction carries no x0 where alpha = 0: use a velocity or x0 model, or start the "
                "sampler below that time)" if prediction == "eps" else "")
        raise TiltgenError(f"the model's x0 prediction is not finite at t = {first:.4g} for {int(bad.sum())} of "
                           f"{x0.shape[0]} samples{hint}")

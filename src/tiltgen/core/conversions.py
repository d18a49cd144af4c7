"""Conversions between model output kinds, all derived from (alpha, sigma, alpha', sigma').

Kinds (``PREDICTIONS``), for ``x_t = alpha x0 + sigma eps``:

* ``eps``      the noise eps
* ``x0``       the clean sample x0
* ``v``        diffusion v-prediction, ``v = alpha eps - sigma x0``
* ``velocity`` flow velocity ``u = dx_t/dt = alpha' x0 + sigma' eps`` (canonical t)
* ``score``    ``grad log p_t(x_t) = -eps / sigma``

Every conversion goes through the pair (x0, eps): ``to_x0_eps`` solves the 2x2 linear
system that relates (x_t, prediction) to (x0, eps), ``from_x0_eps`` maps back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import TiltgenError, check_choice
from .schedules import Schedule

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")


@dataclass(frozen=True)
class Coefficients:
    """alpha, sigma and their t-derivatives, each shaped to broadcast against x ([N, 1, ...])."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


def as_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Time as a tensor of shape [N] in x's dtype and device (a scalar is broadcast)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise TiltgenError(f"time must be a scalar or have shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t


def coefficients(schedule: Schedule, t: Tensor | float, x: Tensor) -> Coefficients:
    """Schedule coefficients at time ``t`` (scalar or [N]), shaped to broadcast against ``x``:
    [N, 1, ..., 1], or [1, 1, ..., 1] when every sample shares one time. The shared case is
    the sampler's, which runs at every model call, so it is cached per (schedule, t)."""
    t = as_time(t, x)
    if t.shape[0] > 0 and (t.stride(0) == 0 or bool((t == t[0]).all())):
        return _shared_coefficients(schedule, float(t[0]), x.dtype, x.device, x.ndim)
    return _coefficients(schedule, t, (t.shape[0],) + (1,) * (x.ndim - 1), x.dtype, x.device)


def _coefficients(schedule: Schedule, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> Coefficients:
    t64 = t.to(torch.float64)  # schedules are evaluated in float64, then cast

    def shaped(fn) -> Tensor:
        return fn(t64).to(dtype=dtype, device=device).reshape(shape)

    return Coefficients(shaped(schedule.alpha), shaped(schedule.sigma),
                        shaped(schedule.d_alpha), shaped(schedule.d_sigma))


@functools.lru_cache(maxsize=4096)
def _shared_coefficients(schedule: Schedule, t: float, dtype: torch.dtype, device: torch.device,
                         ndim: int) -> Coefficients:
    return _coefficients(schedule, torch.tensor([t], dtype=torch.float64), (1,) * ndim, dtype, device)


def to_x0_eps(kind: str, prediction: Tensor, x_t: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a prediction of ``kind`` at state ``x_t``."""
    a, s = c.alpha, c.sigma
    if kind == "eps":
        return (x_t - s * prediction) / a, prediction
    if kind == "x0":
        return prediction, (x_t - a * prediction) / s
    if kind == "score":
        eps = -s * prediction
        return (x_t - s * eps) / a, eps
    if kind == "v":
        norm = a**2 + s**2
        return (a * x_t - s * prediction) / norm, (s * x_t + a * prediction) / norm
    if kind == "velocity":
        det = a * c.d_sigma - s * c.d_alpha
        return (c.d_sigma * x_t - s * prediction) / det, (a * prediction - c.d_alpha * x_t) / det
    check_choice("prediction kind", kind, PREDICTIONS)
    raise AssertionError  # unreachable


def from_x0_eps(kind: str, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
    """The prediction of ``kind`` that corresponds to (x0, eps)."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "score":
        return -eps / c.sigma
    if kind == "v":
        return c.alpha * eps - c.sigma * x0
    if kind == "velocity":
        return c.d_alpha * x0 + c.d_sigma * eps
    check_choice("prediction kind", kind, PREDICTIONS)
    raise AssertionError  # unreachable


def convert(prediction: Tensor, from_kind: str, to_kind: str, x_t: Tensor, t: Tensor | float,
            schedule: Schedule) -> Tensor:
    """Convert a model output between kinds, e.g. ``convert(eps, "eps", "velocity", x, t, s)``."""
    if from_kind == to_kind:
        check_choice("prediction kind", from_kind, PREDICTIONS)
        return prediction
    c = coefficients(schedule, t, x_t)
    x0, eps = to_x0_eps(from_kind, prediction, x_t, c)
    return from_x0_eps(to_kind, x0, eps, c)

"""The reward-tilt decomposition of DESIGN.md §2, implemented once.

With h_t(x) = E[exp(r(x0)/beta) | x_t = x] and g = grad_x log h_t:

    eps*   = eps - sigma g
    x0*    = x0 + (sigma^2 / alpha) g
    score* = score + g,   v*, u*: re-derived from (x0*, eps*)

The x0 form, ``x0_shift = (sigma^2/alpha) g = E_{p*}[x0 | x_t] - E_p[x0 | x_t]``, stays
finite at pure noise (alpha -> 0) where g -> 0 and sigma^2/alpha -> inf; estimators that
can compute it directly (exact, training-free, learned) return it instead of g. Given only g at
alpha = 0, the correction is taken as its limit through g: zero, because h_1 is constant.
The same holds below ``ALPHA_MIN``: there the exact g is O(alpha), but a g estimated through an
imperfect network (the plug-in's back-propagation through the denoiser) carries errors that do
not shrink with alpha, and sigma^2/alpha would multiply them by more than 1/ALPHA_MIN. Cosine
schedules start there (diffusers' ``squaredcos_cap_v2``: alpha = 4.9e-5 at the last timestep;
zero-SNR tables clamped to 2^-24: alpha = 2.4e-4); a shift taken at face value wrecks the first
step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.conversions import Coefficients, coefficients, from_x0_eps, to_x0_eps
from ..core.schedules import Schedule
from ..errors import TiltgenError


@dataclass(frozen=True)
class Tilt:
    """An estimate of the guidance term, as ``g = grad log h_t`` or as ``x0_shift`` (one of them)."""

    g: Tensor | None = None
    x0_shift: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.g is None) == (self.x0_shift is None):
            raise TiltgenError("a Tilt holds exactly one of g or x0_shift")

    @property
    def value(self) -> Tensor:
        return self.g if self.g is not None else self.x0_shift  # type: ignore[return-value]

    def masked(self, keep: Tensor) -> "Tilt":
        """Zero the term for samples where ``keep`` ([N] bool) is False."""
        shape = (keep.shape[0],) + (1,) * (self.value.ndim - 1)
        value = torch.where(keep.reshape(shape), self.value, torch.zeros_like(self.value))
        return Tilt(g=value) if self.g is not None else Tilt(x0_shift=value)

    def scaled(self, scale: float) -> "Tilt":
        return Tilt(g=self.g * scale) if self.g is not None else Tilt(x0_shift=self.x0_shift * scale)


#: Below this alpha (signal-to-noise ratio 1e-6) a tilt given as g is taken at its alpha = 0 limit.
ALPHA_MIN = 1e-3


def x0_shift_from_g(g: Tensor, c: Coefficients) -> Tensor:
    """(sigma^2 / alpha) g, taken as 0 where alpha < ALPHA_MIN (the alpha = 0 limit: h_1 is
    constant; module docstring)."""
    signal = c.alpha >= ALPHA_MIN
    alpha_safe = torch.where(signal, c.alpha, torch.ones_like(c.alpha))
    return torch.where(signal, c.sigma**2 / alpha_safe, torch.zeros_like(c.alpha)) * g


def g_from_x0_shift(x0_shift: Tensor, c: Coefficients) -> Tensor:
    """(alpha / sigma^2) x0_shift."""
    return c.alpha / c.sigma**2 * x0_shift


def apply_tilt(x0: Tensor, eps: Tensor, tilt: Tilt, c: Coefficients) -> tuple[Tensor, Tensor]:
    """Tilted (x0*, eps*) from the base (x0, eps) and a guidance term."""
    shift = tilt.x0_shift if tilt.x0_shift is not None else x0_shift_from_g(tilt.g, c)  # type: ignore[arg-type]
    if shift.shape != x0.shape:
        raise TiltgenError(f"guidance term has shape {tuple(shift.shape)}, expected {tuple(x0.shape)}")
    # eps* = eps - sigma g = eps - (alpha / sigma) x0_shift
    return x0 + shift, eps - (c.alpha / c.sigma) * shift


def guide_prediction(prediction: Tensor, kind: str, x_t: Tensor, t: Tensor | float, schedule: Schedule,
                     tilt: Tilt) -> Tensor:
    """The tilted model output of the same ``kind`` as ``prediction``."""
    c = coefficients(schedule, t, x_t)
    x0, eps = to_x0_eps(kind, prediction, x_t, c)
    return from_x0_eps(kind, *apply_tilt(x0, eps, tilt, c), c)

"""Exact guidance from an oracle that knows the tilted posterior (the analytic family)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from .decomposition import Tilt


@runtime_checkable
class TiltOracle(Protocol):
    """Knows E_{p*}[x0 | x_t] - E_p[x0 | x_t] exactly (e.g. a tilted Gaussian mixture)."""

    def x0_shift(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor: ...


class ExactGuidance:
    """The reference estimator: exact x0 shift (equivalently exact g_t) from an oracle."""

    needs_model_grad = False

    def __init__(self, oracle: TiltOracle):
        self.oracle = oracle

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tilt:
        return Tilt(x0_shift=self.oracle.x0_shift(x_t, t, cond))

"""Quadratic rewards on flattened samples: r(x) = -1/2 x^T A x + w^T x + c.

Linear (A = 0) and concave quadratic rewards keep a Gaussian-mixture base closed under
tilting, which is what makes the analytic benchmark exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import TiltgenError
from .registry import register_reward


class QuadraticReward:
    """r(x) = -1/2 x^T A x + w^T x + c on x flattened to [N, d] (differentiable)."""

    differentiable = True

    def __init__(self, A: Tensor | None = None, w: Tensor | None = None, c: float = 0.0, name: str = "quadratic"):
        if A is None and w is None:
            raise TiltgenError("QuadraticReward needs A, w or both")
        d = (A if A is not None else w).shape[0]
        self.A = torch.zeros(d, d, dtype=torch.float64) if A is None else torch.as_tensor(A, dtype=torch.float64)
        self.w = torch.zeros(d, dtype=torch.float64) if w is None else torch.as_tensor(w, dtype=torch.float64)
        if self.A.shape != (d, d) or self.w.shape != (d,):
            raise TiltgenError(f"QuadraticReward: A must be [d, d] and w [d], got {tuple(self.A.shape)} and {tuple(self.w.shape)}")
        if not torch.allclose(self.A, self.A.T):
            raise TiltgenError("QuadraticReward: A must be symmetric")
        self.c = float(c)
        self.name = name
        self.dim = d

    @classmethod
    def linear(cls, w: Tensor, name: str = "linear") -> "QuadraticReward":
        """r(x) = w^T x."""
        return cls(w=torch.as_tensor(w, dtype=torch.float64), name=name)

    @classmethod
    def centered(cls, center: Tensor, A: Tensor, name: str = "quadratic") -> "QuadraticReward":
        """r(x) = -1/2 (x - center)^T A (x - center)."""
        A = torch.as_tensor(A, dtype=torch.float64)
        m = torch.as_tensor(center, dtype=torch.float64)
        return cls(A=A, w=A @ m, c=-0.5 * float(m @ A @ m), name=name)

    def _flat(self, x0: Tensor) -> Tensor:
        x = x0.reshape(x0.shape[0], -1)
        if x.shape[1] != self.dim:
            raise TiltgenError(f"reward {self.name!r} is defined on dimension {self.dim}, got samples of dimension {x.shape[1]}")
        return x

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        x = self._flat(x0)
        A, w = self.A.to(x), self.w.to(x)
        return -0.5 * ((x @ A) * x).sum(1) + x @ w + self.c

    def grad(self, x0: Tensor, cond: Any = None) -> Tensor:
        """Closed-form gradient w - A x (A symmetric), shaped like x0."""
        x = self._flat(x0)
        return (self.w.to(x) - x @ self.A.to(x)).reshape(x0.shape)


@register_reward("linear")
def _linear(w: list[float]) -> QuadraticReward:
    return QuadraticReward.linear(torch.tensor(w, dtype=torch.float64))


@register_reward("quadratic")
def _quadratic(center: list[float], scale: float = 1.0) -> QuadraticReward:
    d = len(center)
    return QuadraticReward.centered(torch.tensor(center, dtype=torch.float64), scale * torch.eye(d, dtype=torch.float64))

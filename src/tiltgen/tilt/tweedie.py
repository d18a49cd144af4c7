"""Tweedie plug-in guidance (the DPS / FreeDoM / Universal-Guidance "backprop" baseline).

h_t(x) ~ exp(r(x0_hat(x)) / beta), so g = grad_x r(x0_hat(x)) / beta, differentiated
through the model and the reward. It replaces the posterior p(x0 | x_t) by a point mass at
its mean. By Tweedie's second-order identity, J = d x0_hat / d x_t = (alpha/sigma^2)
Cov[x0 | x_t], so for a linear reward r = w.x0 the plug-in x0 shift is Cov[x0 | x_t] w / beta:
the first cumulant of the tilt. The exact shift E_{p*}[x0 | x_t] - E_p[x0 | x_t] equals it
only when the posterior is Gaussian; for a multimodal posterior the exact tilt re-weights
the modes (bounded by the distance between them) while the plug-in moves along the
between-mode covariance without bound as beta shrinks: it overshoots (docs/tweedie-bias.md).
Costs a backward pass through the
generator and the reward at every step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.reward import Reward, as_reward, evaluate_reward, reward_name
from ..errors import TiltgenError, check_beta
from .base import check_window, in_window
from .decomposition import Tilt


class TweedieGuidance:
    """g = scale * grad_x r(x0_hat(x_t), c) / beta, optionally only for t in ``t_window``."""

    needs_model_grad = True

    def __init__(self, reward: Reward, beta: float, scale: float = 1.0,
                 t_window: tuple[float, float] | None = None):
        self.reward = as_reward(reward)
        if not self.reward.differentiable:
            raise TiltgenError(f"Tweedie guidance needs a differentiable reward; {reward_name(self.reward)!r} is not")
        self.beta = check_beta(beta)
        self.scale = float(scale)
        self.t_window = check_window(t_window)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tilt:
        if not x0_hat.requires_grad:
            raise TiltgenError("Tweedie guidance needs x0_hat with a graph to x_t (use it through GuidedModel)")
        r = evaluate_reward(self.reward, x0_hat, cond)
        (grad,) = torch.autograd.grad(r.sum(), x_t)
        tilt = Tilt(g=grad.detach() * (self.scale / self.beta))
        keep = in_window(t, self.t_window)
        return tilt if keep is None else tilt.masked(keep)

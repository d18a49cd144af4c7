"""The three fine-tuning objectives, each one small function of the canonical model.

Noised states follow the library's one convention, x_t = alpha_t x0 + sigma_t eps with
t ~ U(t_min, 1); the regression target is the model's own prediction kind of (x0, eps)
(eps, v or flow velocity), so one code path serves UNets and transformers.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.conversions import coefficients, from_x0_eps
from ..core.model import Denoiser
from ..core.samplers import ddim_step


def noised(model: Any, x0: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, regression target) of ``x0`` at times ``t`` [N] with noise ``eps``."""
    c = coefficients(model.schedule, t, x0)
    x_t = c.alpha * x0 + c.sigma * eps
    return x_t.to(x0.dtype), from_x0_eps(model.prediction, x0, eps, c).to(x0.dtype)


def per_sample_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample [N]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def dsm_loss(model: Any, x0: Tensor, cond: Any, t: Tensor, eps: Tensor) -> Tensor:
    """Denoising score matching on samples ``x0`` (drawn in proportion to exp(r/beta) by the
    caller, which makes this reward-weighted DSM) [scalar]."""
    x_t, target = noised(model, x0, t, eps)
    return per_sample_error(model(x_t, t, cond), target).mean()


def dpo_loss(model: Any, reference: Callable[[], Any], x_a: Tensor, x_b: Tensor, cond: Any, t: Tensor,
             eps: Tensor, p_a: Tensor, scale: float) -> Tensor:
    """Diffusion-DPO with soft labels [scalar].

    The implicit log-likelihood ratio log p_theta(x) / p_ref(x) is estimated by
    -scale * (err_theta(x) - err_ref(x)) at one shared (t, eps) per pair; the loss is the
    cross-entropy of sigma(ratio_a - ratio_b) against P(a preferred) = ``p_a``. With
    p_a = sigma((r_a - r_b) / beta) its optimum is p_ref * exp(r / beta).
    """
    x_t, target = noised(model, torch.cat([x_a, x_b]), torch.cat([t, t]), torch.cat([eps, eps]))
    both = _twice(cond)
    err = per_sample_error(model(x_t, torch.cat([t, t]), both), target)
    with reference():
        err_ref = per_sample_error(model(x_t, torch.cat([t, t]), both), target)
    gap = err - err_ref
    n = x_a.shape[0]
    logit = -scale * (gap[:n] - gap[n:])
    return -(p_a * F.logsigmoid(logit) + (1 - p_a) * F.logsigmoid(-logit)).mean()


def _twice(cond: Any) -> Any:
    n = len(cond)
    return cond.select(list(range(n)) * 2)


def draft_loss(model: Any, reference: Callable[[], Any], latent_reward: Any, cond: Any, x_init: Tensor,
               times: Tensor, k: int, beta: float, reg: float) -> tuple[Tensor, Tensor]:
    """DRaFT-K / AlignProp: sample with DDIM, back-propagate through the last ``k`` steps.

    Loss = -mean r(x0) / beta + reg * mean |x0 - x0_ref|^2, where x0_ref is the frozen
    model's output from the same state k steps before the end (for a one-step generator:
    from the same noise). Returns (loss, rewards [N]).
    """
    schedule = model.schedule
    grid = [float(t) for t in times]
    k = min(k, len(grid) - 1)
    denoise = Denoiser(model, schedule, cond)
    x = x_init
    with torch.no_grad():
        for t, t_next in zip(grid[:-1 - k], grid[1:-k]):
            x = ddim_step(denoise, x, t, t_next, schedule)
    start = x.detach()
    x = start
    for t, t_next in zip(grid[-1 - k:-1], grid[-k:]):
        x = ddim_step(denoise, x, t, t_next, schedule)
    with reference():
        x_ref = start
        for t, t_next in zip(grid[-1 - k:-1], grid[-k:]):
            x_ref = ddim_step(denoise, x_ref, t, t_next, schedule)
    r = latent_reward(x, cond)
    loss = -r.mean() / beta + reg * (x - x_ref.detach()).pow(2).mean()
    return loss, r.detach()

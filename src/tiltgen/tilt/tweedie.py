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

``damping=True`` is the damped plug-in (the within-mode correction that "Are we really
tilting?", arXiv 2606.02884, derives in closed form; the derivation used here is in
docs/tweedie-bias.md). For a Gaussian posterior N(x0_hat, v I) and a concave quadratic reward
with curvature a, the exact log h_t is the plug-in's r(x0_hat) / beta times

    lambda_t = 1 / (1 + a v / beta),

so the plug-in over-concentrates within a mode by the factor 1 / lambda_t. Both v and a are
read along the reward gradient u = grad r / |grad r| at no extra network evaluation: v from the
backward pass the plug-in already makes, u.J^T u = (alpha / sigma^2) u.Cov[x0 | x_t] u
(Tweedie's second-order identity), and a = -u.H_r u from one more reward gradient, a secant
over the posterior spread sqrt(v). a is clamped at 0, so convex directions are not amplified.

``noise_tilt=True`` is the plug-in for a deterministic one-step generator x0 = G(x_T), sampled in a
single step. There the x0 shift above would land on the output with the factor sigma^2 / alpha of
the start time (about 1 / alpha_T, hundreds), an edit of the image along the reward gradient rather
than a tilt of the generator's law. G's input is tilted instead, as for noise-tilt networks
(docs/learned-guidance.md, "One-step generators"): h(x_T) = exp(r(G(x_T)) / beta) holds exactly,
so the first-order tilt of N(0, sigma_T^2 I) is x_T + sigma_T^2 grad r(G(x_T)) / beta, by back-
propagation through G and the reward, then one more call of G at the shifted input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.conversions import coefficients
from ..core.reward import Reward, as_reward, evaluate_reward, reward_gradient, reward_name
from ..core.schedules import Schedule
from ..errors import TiltgenError, check_beta
from .base import check_window, in_window, per_sample_dot
from .decomposition import Tilt


class TweedieGuidance:
    """g = scale * grad_x r(x0_hat(x_t), c) / beta, optionally only for t in ``t_window``;
    times lambda_t with ``damping`` (needs ``schedule``)."""

    needs_model_grad = True

    def __init__(self, reward: Reward, beta: float, scale: float = 1.0,
                 t_window: tuple[float, float] | None = None, damping: bool = False,
                 schedule: Schedule | None = None, noise_tilt: bool = False, keep_noise_norm: bool = True):
        if (damping or noise_tilt) and schedule is None:
            raise TiltgenError("damped or noise-tilt Tweedie guidance needs the model's schedule (alpha, sigma of t)")
        if damping and noise_tilt:
            raise TiltgenError("the damped plug-in corrects the x0 shift of a multi-step sampler; a one-step "
                               "generator's noise tilt has no posterior to damp: use one or the other")
        self.damping = bool(damping)
        self.noise_tilt = bool(noise_tilt)
        self.keep_noise_norm = bool(keep_noise_norm)  # noise tilt: the tilted noise keeps its norm (tilt/base.py)
        self.schedule = schedule
        self.reward = as_reward(reward)
        if not self.reward.differentiable:
            raise TiltgenError(f"Tweedie guidance needs a differentiable reward; {reward_name(self.reward)!r} is not")
        self.beta = check_beta(beta)
        self.scale = float(scale)
        self.t_window = check_window(t_window)

    @property
    def tilts_input(self) -> bool:
        """True with ``noise_tilt``: GuidedModel then shifts the model's input by :meth:`input_shift`."""
        return self.noise_tilt

    def input_shift(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tensor:
        """Noise tilt: scale * sigma^2 * grad_x r(x0_hat(x_t)) / beta, shaped like x_t (``x0_hat`` with
        its graph to ``x_t``: the generator's output, differentiated through)."""
        if not self.noise_tilt:
            raise TiltgenError("this Tweedie guidance shifts x0 (it was built without noise_tilt)")
        sigma = coefficients(self.schedule, t, x_t).sigma  # type: ignore[arg-type]
        g = self._tilt(self._reward_grad(x_t, x0_hat, cond), t).value
        return g * sigma.to(g.dtype) ** 2

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tilt:
        if self.noise_tilt:
            raise TiltgenError("a noise-tilt Tweedie guidance shifts the model input; wrap the model in GuidedModel")
        if not self.damping:
            return self._tilt(self._reward_grad(x_t, x0_hat, cond), t)
        _check_graph(x0_hat)
        r = evaluate_reward(self.reward, x0_hat, cond)
        (grad_x0,) = torch.autograd.grad(r.sum(), x0_hat, retain_graph=True)
        (grad,) = torch.autograd.grad(x0_hat, x_t, grad_outputs=grad_x0)
        grad = grad * self.damping_factor(x_t, t, cond, x0_hat.detach(), grad_x0.detach(), grad.detach())
        return self._tilt(grad, t)

    def _reward_grad(self, x_t: Tensor, x0_hat: Tensor, cond: Any) -> Tensor:
        """grad_x r(x0_hat(x_t)), back-propagated through the model and the reward (shaped like x_t)."""
        _check_graph(x0_hat)
        r = evaluate_reward(self.reward, x0_hat, cond)
        (grad,) = torch.autograd.grad(r.sum(), x_t)
        return grad

    def _tilt(self, grad: Tensor, t: Tensor) -> Tilt:
        """g = scale * grad / beta, zero outside ``t_window``."""
        tilt = Tilt(g=grad.detach() * (self.scale / self.beta))
        keep = in_window(t, self.t_window)
        return tilt if keep is None else tilt.masked(keep)

    def damping_factor(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor, grad_x0: Tensor,
                       grad_xt: Tensor) -> Tensor:
        """lambda_t [N, 1, ...] = 1 / (1 + a v / beta) along u = grad_x0 / |grad_x0| (module docstring).
        ``grad_xt`` = J^T grad_x0, the plug-in's own backward pass."""
        c = coefficients(self.schedule, t, x_t)  # type: ignore[arg-type]
        tiny = torch.finfo(grad_x0.dtype).tiny  # a zero gradient must give 0, not 0/0, in float32 too
        norm2 = per_sample_dot(grad_x0, grad_x0)
        alpha = c.alpha.expand_as(norm2)
        ok = (norm2 > 0) & (alpha > 1e-6)
        # posterior variance along u: (sigma^2 / alpha) u.J u; J^T = J for a conservative denoiser
        v = (c.sigma**2 / alpha.clamp_min(1e-6)) * per_sample_dot(grad_x0, grad_xt) / norm2.clamp_min(tiny)
        v = torch.where(ok, v.clamp_min(0.0), torch.zeros_like(v))
        step = v.sqrt() * grad_x0 / norm2.clamp_min(tiny).sqrt()
        nearby = reward_gradient(self.reward, x0_hat + step, cond)
        # curvature a = -u.H u by a secant over the posterior spread; 0 where there is no spread
        curvature = -per_sample_dot(nearby - grad_x0, step) / per_sample_dot(step, step).clamp_min(tiny)
        curvature = torch.where(v > 0, curvature.clamp_min(0.0), torch.zeros_like(curvature))
        return (1.0 / (1.0 + curvature * v / self.beta)).to(grad_xt.dtype)


def _check_graph(x0_hat: Tensor) -> None:
    if not x0_hat.requires_grad:
        raise TiltgenError("Tweedie guidance needs x0_hat with a graph to x_t (use it through GuidedModel)")

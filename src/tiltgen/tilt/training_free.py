"""Training-free guidance: the tilt of a Gaussian posterior proxy around x0_hat.

The exact guidance term (DESIGN.md §2) is the shift of the posterior mean,

    x0_shift = E_{p*}[x0 | x_t] - E_p[x0 | x_t],   p*(x0 | x_t) ∝ p(x0 | x_t) exp(r(x0) / beta).

We replace the unknown posterior p(x0 | x_t) by the posterior a Gaussian prior
N(m, s^2 I) with the data's per-dimension variance s^2 would give, re-centred on the
model's own x0_hat:

    q_t(x0 | x_t) = N(x0_hat, nu_t I),   nu_t = s^2 sigma_t^2 / (alpha_t^2 s^2 + sigma_t^2).

nu_t needs no model evaluation: it is s^2 at pure noise (alpha = 0, where the posterior is
the prior) and ~ sigma_t^2 / alpha_t^2 -> 0 at data. Tilting q_t gives the variants:

* ``linear``  x0_shift = nu_t grad r(x0_hat) / beta. Exact for a Gaussian posterior and a
  linear reward (so: a single Gaussian base with s^2 its variance, linear reward).
* ``bounded`` (default) the tilt of the two-point proxy x0_hat +- sqrt(nu_t) u along
  u = grad r / |grad r|: sqrt(nu_t) tanh(sqrt(nu_t) |grad r| / beta) u. Equal to ``linear``
  for weak tilts, but never more than one proxy standard deviation: a Gaussian's tilted
  mean grows without bound as beta shrinks, a multimodal posterior's does not.
* ``newton``  solves (I + nu_t A / beta) x0_shift = nu_t grad r(x0_hat) / beta by a few
  conjugate-gradient steps, with A v taken from differences of reward gradients
  (A = -Hessian of r). Exact for a Gaussian posterior and a quadratic reward; equals
  ``linear`` for a linear reward. Accounts for reward curvature, which ``linear``
  (and the Tweedie plug-in) ignore and so overshoot on peaked rewards.
* ``snis``    self-normalised importance sampling of the tilted proxy from K fixed
  antithetic draws x0_hat + sqrt(nu_t) z_k with weights exp(r / beta): reward *values*
  only, so non-differentiable rewards work; the shift is bounded by the draws' spread.

None backpropagates through the generator; model evaluations equal the unguided
sampler's. Reward gradients are taken at x0_hat (detached; ``newton`` also at nearby points).
At t = 0 every variant gives g = grad r / beta, exact; at t = 1 the shift is finite (the
x0 form is returned, so nothing divides by alpha = 0). See docs/training-free-guidance.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.conversions import coefficients
from ..core.reward import Reward, as_reward, evaluate_reward, reward_gradient, reward_name
from ..core.schedules import Schedule
from ..errors import TiltgenError, check_beta, check_choice
from .base import check_window, in_window, per_sample_dot
from .decomposition import Tilt

VARIANTS = ("linear", "bounded", "newton", "snis")


def posterior_variance(schedule: Schedule, t: Tensor, x: Tensor, data_var: float) -> Tensor:
    """nu_t = s^2 sigma^2 / (alpha^2 s^2 + sigma^2), shaped to broadcast against ``x``
    ([N, 1, ...], or [1, 1, ...] when every sample shares t: the cached sampler case)."""
    c = coefficients(schedule, t, x)
    sigma2 = c.sigma**2
    return data_var * sigma2 / (c.alpha**2 * data_var + sigma2)


def _newton_shift(reward: Reward, x0: Tensor, cond: Any, nu: Tensor, beta: float, steps: int) -> Tensor:
    """CG on (I + M) s = b, b = nu grad r(x0) / beta, M v = nu/beta (grad r(x0) - grad r(x0 + v)).

    M v is exact for a quadratic reward (M = nu A / beta) and a secant otherwise.
    """
    g0 = reward_gradient(reward, x0, cond)
    b = nu * g0 / beta
    s, res, p = torch.zeros_like(b), b.clone(), b.clone()
    rr = per_sample_dot(res, res)
    for _ in range(steps):
        mp = nu / beta * (g0 - reward_gradient(reward, x0 + p, cond))
        ap = p + mp
        denom = per_sample_dot(p, ap)
        # (I + M) is positive definite for concave rewards; stop a direction where it is not.
        step = torch.where(denom > 1e-30, rr / denom.clamp_min(1e-30), torch.zeros_like(denom))
        s = s + step * p
        res = res - step * ap
        rr_new = per_sample_dot(res, res)
        p = res + torch.where(rr > 1e-30, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr)) * p
        rr = rr_new
    return s


def _bounded_shift(grad: Tensor, nu: Tensor, beta: float) -> Tensor:
    """sqrt(nu) tanh(sqrt(nu) |grad| / beta) grad / |grad|  [N, ...]: the tilt of the two-point
    proxy x0_hat +- sqrt(nu) u (u = grad / |grad|) under the linearised reward."""
    a = torch.linalg.vector_norm(grad.flatten(1), dim=1).reshape((-1,) + (1,) * (grad.ndim - 1))
    a = a * (nu.sqrt() / beta)
    # tanh(a) / a -> 1 as a -> 0 (the linear shift); the clamp only guards a zero gradient
    return grad * (torch.tanh(a) / a.clamp_min(1e-30) * (nu / beta))


def _draws(k: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    """k fixed antithetic standard-normal draws [k, *shape] (the same for every sample and step,
    so the guided ODE stays a deterministic function of its state). When k/2 >= dim they are
    whitened (sample covariance exactly I), so SNIS reproduces the linear shift for weak tilts."""
    half = torch.randn((k // 2,) + shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flat = half.reshape(k // 2, -1)
    if flat.shape[0] >= flat.shape[1]:
        chol = torch.linalg.cholesky(flat.T @ flat / flat.shape[0])
        flat = torch.linalg.solve_triangular(chol, flat.T, upper=False).T
    half = flat.reshape(half.shape)
    return torch.cat([half, -half]).to(dtype=dtype, device=device)


def _snis_shift(reward: Reward, x0: Tensor, cond: Any, nu: Tensor, beta: float, z: Tensor) -> Tensor:
    """sum_k w_k sqrt(nu) z_k, w = softmax_k(r(x0 + sqrt(nu) z_k) / beta)  [N, ...]."""
    k, n = z.shape[0], x0.shape[0]
    delta = nu.sqrt()[None] * z[:, None]  # [k, N, ...]
    points = (x0[None] + delta).reshape((k * n,) + x0.shape[1:])
    cond_k = cond if cond is None else _repeat_cond(cond, k)
    log_w = evaluate_reward(reward, points, cond_k).reshape(k, n) / beta
    weights = torch.softmax(log_w, 0).reshape((k, n) + (1,) * (x0.ndim - 1))
    return (weights * delta).sum(0)


def _repeat_cond(cond: Any, k: int) -> Any:
    """Conditioning for k stacked copies of the batch (tensors and lists are tiled)."""
    if isinstance(cond, Tensor):
        return cond.repeat((k,) + (1,) * (cond.ndim - 1))
    if isinstance(cond, (list, tuple)):
        return type(cond)(list(cond) * k)
    return cond


class TrainingFreeGuidance:
    """Training-free guidance: the tilt of the proxy posterior N(x0_hat, nu_t I) (module docstring).

    ``data_var`` is the data's per-dimension variance s^2 (1 for latents normalised by their
    scaling factor; else estimate it from a few unguided samples). ``variant`` is one of
    ``bounded`` (default: chosen by the analytic benchmark), ``linear``, ``newton``
    (``cg_steps`` extra reward gradients per call), ``snis`` (``draws`` reward values per
    sample per call, no gradient). ``scale`` multiplies the
    shift; ``t_window`` restricts guidance to t in [lo, hi].
    """

    needs_model_grad = False

    def __init__(self, reward: Reward, beta: float, schedule: Schedule, *, data_var: float = 1.0,
                 variant: str = "bounded", scale: float = 1.0, t_window: tuple[float, float] | None = None,
                 cg_steps: int = 2, draws: int = 16, seed: int = 0):
        self.reward = as_reward(reward)
        self.variant = check_choice("training-free variant", variant, VARIANTS)
        if variant != "snis" and not self.reward.differentiable:
            raise TiltgenError(f"training-free variant {variant!r} needs a differentiable reward; "
                               f"{reward_name(self.reward)!r} is not: use variant='snis' (reward values only)")
        self.beta = check_beta(beta)
        self.schedule = schedule
        if not (float(data_var) > 0 and math.isfinite(float(data_var))):
            raise TiltgenError(f"data_var must be a finite number > 0, got {data_var!r}")
        self.data_var = float(data_var)
        self.scale = float(scale)
        self.t_window = check_window(t_window)
        if cg_steps < 1:
            raise TiltgenError(f"cg_steps must be >= 1, got {cg_steps}")
        if draws < 2 or draws % 2:
            raise TiltgenError(f"draws must be an even number >= 2 (antithetic pairs), got {draws}")
        self.cg_steps = int(cg_steps)
        self.draws = int(draws)
        self.seed = int(seed)

    def x0_shift(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tensor:
        """The estimated E*[x0 | x_t] - E[x0 | x_t]  [N, ...]."""
        x0 = x0_hat.detach()
        nu = posterior_variance(self.schedule, t, x0, self.data_var)
        if self.variant == "linear":
            return nu * reward_gradient(self.reward, x0, cond) / self.beta
        if self.variant == "bounded":
            return _bounded_shift(reward_gradient(self.reward, x0, cond), nu, self.beta)
        if self.variant == "newton":
            return _newton_shift(self.reward, x0, cond, nu, self.beta, self.cg_steps)
        z = _draws(self.draws, tuple(x0.shape[1:]), x0.dtype, x0.device, self.seed)
        return _snis_shift(self.reward, x0, cond, nu, self.beta, z)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, x0_hat: Tensor) -> Tilt:
        keep = in_window(t, self.t_window)
        if keep is not None and not bool(keep.any()):
            return Tilt(x0_shift=torch.zeros_like(x0_hat))  # no reward evaluations outside the window
        shift = self.x0_shift(x_t, t, cond, x0_hat)
        tilt = Tilt(x0_shift=shift if self.scale == 1.0 else shift * self.scale)
        return tilt if keep is None else tilt.masked(keep)

"""A sample bank: the proxy prior of training-free guidance as a kernel density of base samples.

Training-free guidance replaces the unknown posterior p(x0 | x_t) by the posterior of a
Gaussian prior N(m, S). A Gaussian has one mode, so the proxy cannot choose between the
data's modes: its tilt moves every sample by at most about one posterior standard deviation,
never across to a rare or distant mode (docs/training-free-guidance.md, "A sample bank").

With M unguided samples x_1..x_M of the base model (one conditional distribution), the prior
becomes their kernel density

    p_hat(x0) = (1/M) sum_j N(x0; x_j, K),   K = h^2 S,   h = bandwidth * M^(-1/(D+4)),

(S the data covariance the proxy already uses, D the elements of one sample, h a Scott-type
factor). Its posterior at x_t = alpha x0 + sigma eps is again a mixture, exactly:

    p_hat(x0 | x_t) = sum_j pi_j N(x0; m_j, C_t),
    pi_j ∝ N(x_t; alpha x_j, alpha^2 K + sigma^2 I),
    m_j = x_j + kappa (x_t - alpha x_j),   kappa = alpha K (alpha^2 K + sigma^2 I)^-1,
    C_t = sigma^2 K (alpha^2 K + sigma^2 I)^-1   (the Gaussian proxy's formula with S -> K).

Tilting it by exp(r/beta) reweights the components, pi*_j ∝ pi_j exp(r(m_j)/beta), and
tilts each inside: the x0 shift is

    sum_j (pi*_j - pi_j) m_j + shift_within = (I - alpha kappa) sum_j (pi*_j - pi_j) x_j + shift_within,

where shift_within is the ordinary training-free variant with covariance C_t (it needs the
reward gradient at x0_hat only). r(m_j) is the bank's reward value plus, when the bank holds
reward gradients g_j, the first-order term g_j . (m_j - x_j) (exact for a linear reward).
Per call this costs an [N, M] matrix of distances: no model evaluation, no reward evaluation
beyond the variant's. Building the bank costs M unguided samples and their rewards, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.conversions import coefficients
from ..core.reward import Reward, as_reward, evaluate_reward, reward_gradient, reward_name
from ..errors import TiltgenError

CHUNK_ENTRIES = 1 << 22  # entries of one [samples, M] kernel matrix
DEFAULT_BANDWIDTH = 0.5  # half of Scott's factor: chosen on the analytic benchmark (docs)


@dataclass(frozen=True)
class SampleBank:
    """M unguided samples of the base model ``x0`` [M, ...] (one conditional distribution),
    their rewards ``rewards`` [M] and, for a differentiable reward, the reward gradients
    ``grads`` [M, ...] (None: values only)."""

    x0: Tensor
    rewards: Tensor
    grads: Tensor | None = None

    def __post_init__(self) -> None:
        m = self.x0.shape[0] if self.x0.ndim else 0
        if m < 2:
            raise TiltgenError(f"a sample bank needs at least 2 samples [M, ...], got shape {tuple(self.x0.shape)}")
        if self.rewards.shape != (m,):
            raise TiltgenError(f"the bank's rewards have shape {tuple(self.rewards.shape)}, expected [{m}]")
        if self.grads is not None and self.grads.shape != self.x0.shape:
            raise TiltgenError(f"the bank's reward gradients have shape {tuple(self.grads.shape)}, "
                               f"expected {tuple(self.x0.shape)} (one per sample)")
        for name, value in (("samples", self.x0), ("rewards", self.rewards), ("reward gradients", self.grads)):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise TiltgenError(f"the sample bank's {name} are not all finite")

    @property
    def size(self) -> int:
        return int(self.x0.shape[0])

    @classmethod
    def from_samples(cls, x0: Tensor, reward: Reward, cond: Any = None, *, grads: bool | None = None) -> "SampleBank":
        """Score unguided samples ``x0`` [M, ...] of the base model (under ``cond``) with :func:`score_samples`."""
        values, gradients = score_samples(x0, reward, cond, grads=grads)
        return cls(x0.detach(), values, gradients)


def score_samples(x0: Tensor, reward: Reward, cond: Any = None, *, grads: bool | None = None
                  ) -> tuple[Tensor, Tensor | None]:
    """The rewards [M] of samples ``x0`` [M, ...] and, when ``grads`` (default: when the reward is
    differentiable; a reward whose differentiability was only assumed and that gives no gradient
    keeps values only), their reward gradients [M, ...]."""
    reward = as_reward(reward)
    x0 = x0.detach()
    with torch.no_grad():
        values = evaluate_reward(reward, x0, cond).detach()
    if grads and not reward.differentiable:
        raise TiltgenError(f"grads=True needs a differentiable reward; {reward_name(reward)!r} is not")
    if grads is False or not reward.differentiable:
        return values, None
    try:
        return values, reward_gradient(reward, x0, cond).detach()
    except TiltgenError:
        if grads or getattr(reward, "declared", True):
            raise
        return values, None  # differentiability was only assumed, and autograd says no: values only


def bandwidth_factor(bank: SampleBank, bandwidth: float) -> float:
    """h^2 = (bandwidth * M^(-1/(D+4)))^2, the kernel covariance K = h^2 S as a multiple of S."""
    dim = bank.x0[0].numel()
    return (bandwidth * bank.size ** (-1.0 / (dim + 4))) ** 2


def bank_shift(bank: SampleBank, x_t: Tensor, t: Tensor, schedule, eigenvalues: Tensor, basis: Tensor | None,
               beta: float, bandwidth: float) -> Tensor:
    """(I - alpha kappa) sum_j (pi*_j - pi_j) x_j  [N, ...]: the x0 shift from reweighting the
    bank's kernel components at ``x_t`` (module docstring). ``eigenvalues`` [D] (per-element
    variances, flattened, when ``basis`` is None) and ``basis`` [D, D] | None describe S, the data
    covariance; the within-component covariance C_t is the caller's (posterior_variance of h^2 S)."""
    n, shape = x_t.shape[0], tuple(x_t.shape[1:])
    dtype, device = x_t.dtype, x_t.device
    kernel = bandwidth_factor(bank, bandwidth) * eigenvalues.to(dtype=dtype, device=device).reshape(1, -1)
    c = coefficients(schedule, t, x_t)
    alpha = c.alpha.reshape(-1, 1).to(dtype)
    sigma = c.sigma.reshape(-1, 1).to(dtype)
    var = alpha**2 * kernel + sigma**2                 # [N or 1, D] per-direction variance of x_t | x_j
    kappa = alpha * kernel / var

    def rotate(v: Tensor) -> Tensor:
        flat = v.flatten(1).to(dtype=dtype, device=device)
        return flat if basis is None else flat @ basis.to(dtype=dtype, device=device)

    y, xb = rotate(x_t), rotate(bank.x0)               # [N, D], [M, D]
    rewards = bank.rewards.to(dtype=dtype, device=device)
    gb = None if bank.grads is None else rotate(bank.grads)
    rows = max(1, CHUNK_ENTRIES // bank.size)  # bounds the [rows, M] matrices' memory
    parts = []
    for start in range(0, n, rows):
        take = slice(start, start + rows)
        a, k = _rows(alpha, take), _rows(kappa, take)
        parts.append(_reweighted_mean(y[take], xb, rewards, gb, a, k, _rows(1.0 / var, take), beta))
    between = (1 - alpha * kappa) * torch.cat(parts)
    if basis is not None:
        between = between @ basis.T.to(dtype=dtype, device=device)
    return between.reshape((n,) + shape)


def _rows(v: Tensor, take: slice) -> Tensor:
    """Rows ``take`` of a per-sample [N, D] tensor; a shared [1, D] one as it is."""
    return v if v.shape[0] == 1 else v[take]


def _reweighted_mean(y: Tensor, xb: Tensor, rewards: Tensor, gb: Tensor | None, alpha: Tensor, kappa: Tensor,
                     precision: Tensor, beta: float) -> Tensor:
    """sum_j (pi*_j - pi_j) x_j  [n, D] for the rows ``y`` [n, D] against the bank ``xb`` [M, D]."""
    # log pi_j = -1/2 sum_i (y_i - alpha x_ji)^2 precision_i, less the y-only term (common to every j)
    log_pi = (y * precision * alpha) @ xb.T - 0.5 * (precision * alpha**2) @ (xb**2).T
    log_tilt = rewards[None].expand(y.shape[0], -1)
    if gb is not None:
        # r(m_j) ~ r_j + g_j . kappa (y - alpha x_j)
        log_tilt = log_tilt + (kappa * y) @ gb.T - (kappa * alpha) @ (gb * xb).T
    pi = torch.softmax(log_pi, dim=1)
    pi_tilted = torch.softmax(log_pi + log_tilt / beta, dim=1)
    return (pi_tilted - pi) @ xb

"""Analytic backend: Gaussian mixtures with exact noised densities, scores and tilts.

Under ``x_t = alpha x0 + sigma eps`` a mixture sum_k pi_k N(mu_k, S_k) stays a mixture,
sum_k pi_k N(alpha mu_k, alpha^2 S_k + sigma^2 I), so the score, the posterior mean
E[x0 | x_t] and every model output kind are exact at every t, for any schedule. A
quadratic reward keeps the family closed under tilting, which gives exact tilted samples,
exact log h_t and exact g_t. Everything is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.conversions import PREDICTIONS, coefficients, from_x0_eps
from ..core.schedules import Schedule
from ..errors import TiltgenError, check_beta, check_choice
from ..rewards.quadratic import QuadraticReward

_LOG_2PI = math.log(2 * math.pi)


class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in R^d (weights [K], means [K, d], covs [K, d, d])."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if means.ndim != 2 or weights.shape != (means.shape[0],) or covs.shape != (*means.shape, means.shape[1]):
            raise TiltgenError(f"GaussianMixture needs weights [K], means [K, d], covs [K, d, d]; got "
                               f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(covs.shape)}")
        if not bool((weights > 0).all()):
            raise TiltgenError("GaussianMixture weights must be positive")
        try:
            torch.linalg.cholesky(covs)
        except RuntimeError:
            raise TiltgenError("GaussianMixture covariances must be symmetric positive definite") from None
        self.weights = weights / weights.sum()
        self.means = means
        self.covs = covs

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _check_x(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise TiltgenError(f"the mixture lives in dimension {self.dim}; got samples of shape {tuple(x.shape)}")
        return x.to(torch.float64)

    # --- noised mixture at one time -------------------------------------------------------
    def _components(self, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """log pi_k N(x; alpha mu_k, C_k) [N, K] and C_k^{-1}(x - alpha mu_k) [N, K, d],
        with C_k = alpha^2 S_k + sigma^2 I."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        chol = torch.linalg.cholesky(alpha**2 * self.covs + sigma**2 * eye)
        mean_t = alpha * self.means
        diff = x[:, None, :] - mean_t[None]  # [N, K, d]
        z = torch.linalg.solve_triangular(chol[None], diff[..., None], upper=False)[..., 0]
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_comp = torch.log(self.weights) - 0.5 * (z**2).sum(-1) - 0.5 * (log_det + self.dim * _LOG_2PI)
        solved = torch.cholesky_solve(diff.permute(1, 2, 0), chol).permute(2, 0, 1)  # C^{-1}(x - m)
        return log_comp, solved

    def _by_time(self, x: Tensor, t: Tensor, schedule: Schedule, fn) -> Tensor:
        """Apply ``fn(x_group, alpha, sigma)`` to groups of samples sharing a time."""
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        out = None
        for value in torch.unique(t):
            mask = t == value
            alpha = float(schedule.alpha(value))
            sigma = float(schedule.sigma(value))
            part = fn(x[mask], alpha, sigma)
            if out is None:
                out = torch.empty((x.shape[0],) + part.shape[1:], dtype=part.dtype)
            out[mask] = part
        return out  # type: ignore[return-value]

    def log_prob_t(self, x: Tensor, t: Tensor | float, schedule: Schedule) -> Tensor:
        """log p_t(x) [N]."""
        x = self._check_x(x)
        return self._by_time(x, t, schedule, lambda xs, a, s: torch.logsumexp(self._components(xs, a, s)[0], 1))

    def log_prob(self, x0: Tensor) -> Tensor:
        """log p(x0) [N] of the data distribution."""
        x = self._check_x(x0)
        return torch.logsumexp(self._components(x, 1.0, 0.0)[0], 1)

    def responsibilities(self, x0: Tensor) -> Tensor:
        """p(k | x0) [N, K] under the data distribution."""
        x = self._check_x(x0)
        return torch.softmax(self._components(x, 1.0, 0.0)[0], 1)

    def score(self, x: Tensor, t: Tensor | float, schedule: Schedule) -> Tensor:
        """grad_x log p_t(x) [N, d]."""
        x = self._check_x(x)

        def fn(xs: Tensor, a: float, s: float) -> Tensor:
            log_comp, solved = self._components(xs, a, s)
            return -(torch.softmax(log_comp, 1)[..., None] * solved).sum(1)

        return self._by_time(x, t, schedule, fn)

    def posterior_mean(self, x: Tensor, t: Tensor | float, schedule: Schedule) -> Tensor:
        """E[x0 | x_t = x] [N, d]: per-component Gaussian posterior means, weighted."""
        x = self._check_x(x)

        def fn(xs: Tensor, a: float, s: float) -> Tensor:
            log_comp, solved = self._components(xs, a, s)
            # mu_k + alpha S_k C_k^{-1} (x - alpha mu_k); with C^{-1}(x - m) already solved
            comp_mean = self.means[None] + torch.einsum("kij,nkj->nki", self.covs, solved) * a
            return (torch.softmax(log_comp, 1)[..., None] * comp_mean).sum(1)

        return self._by_time(x, t, schedule, fn)

    # --- samples, rewards, tilting -----------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples [n, d]."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)

    def expected_reward(self, reward: QuadraticReward) -> float:
        """E[r(x0)] in closed form for a quadratic reward."""
        self._check_reward(reward)
        quad = torch.einsum("ij,kji->k", reward.A, self.covs) + torch.einsum("ki,ij,kj->k", self.means, reward.A, self.means)
        per_comp = -0.5 * quad + self.means @ reward.w + reward.c
        return float(self.weights @ per_comp)

    def _check_reward(self, reward: QuadraticReward) -> None:
        if not isinstance(reward, QuadraticReward):
            raise TiltgenError("exact tilting needs a QuadraticReward (linear or quadratic)")
        if reward.dim != self.dim:
            raise TiltgenError(f"reward {reward.name!r} has dimension {reward.dim} but the mixture has dimension {self.dim}")

    def tilt(self, reward: QuadraticReward, beta: float) -> "TiltedMixture":
        """The exact tilted mixture p*(x0) ∝ p(x0) exp(r(x0) / beta) and log Z = log E_p[exp(r/beta)]."""
        beta = check_beta(beta)
        self._check_reward(reward)
        prec = torch.linalg.inv(self.covs)
        prec_star = prec + reward.A / beta
        try:
            chol_star = torch.linalg.cholesky(prec_star)
        except RuntimeError:
            raise TiltgenError(f"exp(r / beta) is not integrable against the base at beta={beta}: "
                               "the tilted precision is not positive definite") from None
        info = torch.einsum("kij,kj->ki", prec, self.means) + reward.w / beta
        cov_star = torch.cholesky_inverse(chol_star)
        mean_star = torch.einsum("kij,kj->ki", cov_star, info)
        # log of integral N(x; mu_k, S_k) exp(r(x)/beta) dx, completing the square
        log_z_k = (0.5 * (info * mean_star).sum(-1)
                   - 0.5 * torch.einsum("ki,kij,kj->k", self.means, prec, self.means)
                   - 0.5 * torch.logdet(self.covs)
                   - torch.log(torch.diagonal(chol_star, dim1=-2, dim2=-1)).sum(-1)
                   + reward.c / beta)
        log_w = torch.log(self.weights) + log_z_k
        log_z = torch.logsumexp(log_w, 0)
        tilted = GaussianMixture(torch.softmax(log_w, 0), mean_star, 0.5 * (cov_star + cov_star.transpose(1, 2)))
        return TiltedMixture(self, tilted, reward, beta, float(log_z))

    def model(self, schedule: Schedule, prediction: str = "eps") -> "MixtureModel":
        """The exact model of this distribution under ``schedule`` as a :class:`~tiltgen.core.Model`."""
        return MixtureModel(self, schedule, prediction)


class MixtureModel:
    """Exact model output of a Gaussian mixture (any prediction kind). ``cond`` is ignored."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, prediction: str = "eps"):
        self.mixture = mixture
        self.schedule = schedule
        self.prediction = check_choice("prediction kind", prediction, PREDICTIONS)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        c = coefficients(self.schedule, t, x_t)
        if self.prediction == "score":
            return self.mixture.score(x_t, t, self.schedule).to(x_t.dtype)
        x0 = self.mixture.posterior_mean(x_t, t, self.schedule).to(x_t.dtype)
        eps = (x_t - c.alpha * x0) / c.sigma
        return from_x0_eps(self.prediction, x0, eps, c)


@dataclass
class TiltedMixture:
    """A base mixture, its exact tilt by ``reward`` at ``beta``, and the exact h_t oracle."""

    base: GaussianMixture
    tilted: GaussianMixture
    reward: QuadraticReward
    beta: float
    log_z: float  # log E_p[exp(r(x0) / beta)]

    def oracle(self, schedule: Schedule) -> "MixtureTiltOracle":
        return MixtureTiltOracle(self, schedule)


class MixtureTiltOracle:
    """Exact log h_t, g_t and x0 shift under one schedule (implements ``tilt.TiltOracle``)."""

    def __init__(self, tilt: TiltedMixture, schedule: Schedule):
        self.tilt = tilt
        self.schedule = schedule

    def log_h(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """log h_t(x) = log p*_t(x) - log p_t(x) + log Z  [N]."""
        s = self.schedule
        return self.tilt.tilted.log_prob_t(x_t, t, s) - self.tilt.base.log_prob_t(x_t, t, s) + self.tilt.log_z

    def grad_log_h(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """g_t(x) = score*_t(x) - score_t(x)  [N, d]."""
        s = self.schedule
        return (self.tilt.tilted.score(x_t, t, s) - self.tilt.base.score(x_t, t, s)).to(x_t.dtype)

    def x0_shift(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """E_{p*}[x0 | x_t] - E_p[x0 | x_t]  [N, d] (finite even at pure noise)."""
        s = self.schedule
        return (self.tilt.tilted.posterior_mean(x_t, t, s) - self.tilt.base.posterior_mean(x_t, t, s)).to(x_t.dtype)

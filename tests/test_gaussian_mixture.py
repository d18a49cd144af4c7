"""The analytic backend against quadrature and autograd (float64)."""

import math

import pytest
import torch

from tiltgen.backends import GaussianMixture
from tiltgen.core import RectifiedFlow, VPLinear, coefficients
from tiltgen.errors import TiltgenError
from tiltgen.rewards import QuadraticReward

SCHEDULES = [VPLinear(), RectifiedFlow(), RectifiedFlow(shift=3.0)]


def mixture_1d():
    return GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]), torch.tensor([[[0.3]], [[0.6]]]))


def test_log_prob_t_integrates_to_one_and_matches_quadrature():
    gm = mixture_1d()
    s = VPLinear()
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)[:, None]
    dx = float(grid[1] - grid[0])
    for t in (0.0, 0.3, 0.9):
        assert float(gm.log_prob_t(grid, t, s).exp().sum() * dx) == pytest.approx(1.0, abs=1e-6)


def test_score_is_gradient_of_log_density():
    gm = GaussianMixture(torch.tensor([0.5, 0.5]), torch.randn(2, 3, dtype=torch.float64),
                         torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * torch.tensor([0.4, 1.2])[:, None, None])
    for s in SCHEDULES:
        x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(gm.log_prob_t(x, 0.4, s).sum(), x)
        torch.testing.assert_close(gm.score(x.detach(), 0.4, s), grad)


def test_posterior_mean_obeys_tweedie_formula():
    gm = mixture_1d()
    for s in SCHEDULES:
        x = torch.randn(20, 1, dtype=torch.float64) * 2
        t = torch.rand(20, dtype=torch.float64) * 0.9 + 0.05  # per-sample times
        c = coefficients(s, t, x)
        tweedie = (x + c.sigma**2 * gm.score(x, t, s)) / c.alpha
        torch.testing.assert_close(gm.posterior_mean(x, t, s), tweedie)


def _quadrature_h(gm, reward, beta, s, x, t):
    """h_t(x) = ∫ p(x0) N(x; a x0, s^2) exp(r(x0)/beta) dx0 / p_t(x) on a fine grid (1-D)."""
    x0 = torch.linspace(-12, 12, 40001, dtype=torch.float64)[:, None]
    a, sg = float(s.alpha(torch.tensor(t))), float(s.sigma(torch.tensor(t)))
    like = torch.exp(-0.5 * ((x[:, 0][None] - a * x0) / sg) ** 2)  # [grid, N]
    w = gm.log_prob(x0).exp()[:, None] * like
    return (w * torch.exp(reward(x0) / beta)[:, None]).sum(0) / w.sum(0)


@pytest.mark.parametrize("reward", [QuadraticReward.linear(torch.tensor([0.8])),
                                    QuadraticReward.centered(torch.tensor([1.0]), torch.tensor([[1.5]]))])
def test_exact_tilt_and_log_h_match_quadrature(reward):
    gm = mixture_1d()
    beta = 0.7
    tm = gm.tilt(reward, beta)
    grid = torch.linspace(-6, 6, 101, dtype=torch.float64)[:, None]
    unnorm = gm.log_prob(grid) + reward(grid) / beta
    torch.testing.assert_close(tm.tilted.log_prob(grid), unnorm - tm.log_z)
    for s in SCHEDULES:
        oracle = tm.oracle(s)
        x = torch.linspace(-3, 3, 9, dtype=torch.float64)[:, None]
        for t in (0.2, 0.7):
            torch.testing.assert_close(oracle.log_h(x, t), torch.log(_quadrature_h(gm, reward, beta, s, x, t)),
                                       rtol=1e-6, atol=1e-6)
            xg = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(oracle.log_h(xg, t).sum(), xg)
            torch.testing.assert_close(oracle.grad_log_h(x, t), grad)
            c = coefficients(s, t, x)
            torch.testing.assert_close(oracle.x0_shift(x, t), c.sigma**2 / c.alpha * grad)


def test_expected_reward_closed_form_matches_monte_carlo():
    gm = GaussianMixture(torch.tensor([0.4, 0.6]), torch.randn(2, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    reward = QuadraticReward.centered(torch.ones(4, dtype=torch.float64), torch.diag(torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)))
    x = gm.sample(400_000, torch.Generator().manual_seed(0))
    assert float(reward(x).mean()) == pytest.approx(gm.expected_reward(reward), abs=0.02)


def test_bad_input():
    gm = mixture_1d()
    with pytest.raises(TiltgenError, match="beta must be"):
        gm.tilt(QuadraticReward.linear(torch.tensor([1.0])), 0.0)
    with pytest.raises(TiltgenError, match="beta must be"):
        gm.tilt(QuadraticReward.linear(torch.tensor([1.0])), -1.0)
    with pytest.raises(TiltgenError, match="dimension 2 but the mixture has dimension 1"):
        gm.tilt(QuadraticReward.linear(torch.tensor([1.0, 0.0])), 1.0)
    with pytest.raises(TiltgenError, match="dimension 1; got samples of shape"):
        gm.model(VPLinear())(torch.zeros(4, 3), torch.full((4,), 0.5))
    with pytest.raises(TiltgenError, match="not integrable"):
        gm.tilt(QuadraticReward(A=torch.tensor([[-10.0]])), 0.1)  # convex reward: exp(r/beta) blows up
    with pytest.raises(TiltgenError, match="positive definite"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), -torch.eye(2)[None])

"""Training-free guidance: exactness where the Gaussian-posterior proxy is exact, limits, errors."""

import pytest
import torch

from tiltgen.backends.gaussian_mixture import GaussianMixture
from tiltgen.core import CountingModel, CountingReward, RectifiedFlow, VPLinear, as_reward, sample
from tiltgen.errors import TiltgenError
from tiltgen.eval.analytic_bench import BenchSettings, resolve_method, run_analytic_bench
from tiltgen.rewards.quadratic import QuadraticReward
from tiltgen.tilt import GuidedModel, TrainingFreeGuidance
from tiltgen.tilt.training_free import VARIANTS, posterior_variance

SCHEDULES = [RectifiedFlow(), VPLinear()]


def gaussian(dim: int = 3, var: float = 2.0, mean: float = 0.5) -> GaussianMixture:
    """A single isotropic Gaussian N(mean, var I): its posterior p(x0 | x_t) is exactly N(x0_hat, nu_t I)."""
    return GaussianMixture(torch.ones(1), torch.full((1, dim), mean, dtype=torch.float64),
                           var * torch.eye(dim, dtype=torch.float64)[None])


def states(schedule, dim: int, t: float, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * 2, torch.full((n,), t, dtype=torch.float64)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["flow", "vp"])
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_linear_variant_exact_for_gaussian_and_linear_reward(schedule, t):
    base = gaussian()
    reward = QuadraticReward.linear(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    oracle = base.tilt(reward, 0.7).oracle(schedule)
    est = TrainingFreeGuidance(reward, 0.7, schedule, data_var=2.0, variant="linear")
    x, tt = states(schedule, 3, t)
    x0_hat = base.posterior_mean(x, tt, schedule)
    torch.testing.assert_close(est.x0_shift(x, tt, None, x0_hat), oracle.x0_shift(x, tt), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["flow", "vp"])
def test_newton_variant_exact_for_gaussian_and_quadratic_reward(schedule):
    base = gaussian()
    A = torch.diag(torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64))
    reward = QuadraticReward.centered(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64), A)
    oracle = base.tilt(reward, 0.5).oracle(schedule)
    # CG on a d x d system is exact after d steps
    est = TrainingFreeGuidance(reward, 0.5, schedule, data_var=2.0, variant="newton", cg_steps=3)
    x, tt = states(schedule, 3, 0.6)
    x0_hat = base.posterior_mean(x, tt, schedule)
    torch.testing.assert_close(est.x0_shift(x, tt, None, x0_hat), oracle.x0_shift(x, tt), rtol=1e-7, atol=1e-8)


def correlated_gaussian(dim: int = 4) -> tuple[GaussianMixture, torch.Tensor]:
    """A single Gaussian with a full, anisotropic covariance (eigenvalues 0.1..3, rotated)."""
    g = torch.Generator().manual_seed(5)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    cov = rotation @ torch.diag(torch.linspace(0.1, 3.0, dim, dtype=torch.float64)) @ rotation.T
    cov = 0.5 * (cov + cov.T)
    mean = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    return GaussianMixture(torch.ones(1), mean[None], cov[None]), cov


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["flow", "vp"])
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_linear_variant_exact_with_full_data_covariance(schedule, t):
    base, cov = correlated_gaussian()
    reward = QuadraticReward.linear(torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64))
    oracle = base.tilt(reward, 0.7).oracle(schedule)
    est = TrainingFreeGuidance(reward, 0.7, schedule, data_cov=cov, variant="linear")
    x, tt = states(schedule, 4, t)
    x0_hat = base.posterior_mean(x, tt, schedule)
    torch.testing.assert_close(est.x0_shift(x, tt, None, x0_hat), oracle.x0_shift(x, tt), rtol=1e-9, atol=1e-9)
    # the isotropic proxy with the mean variance is not exact here (away from t = 0, where both
    # tend to sigma^2 / alpha^2): the covariance is what fixed it
    iso = TrainingFreeGuidance(reward, 0.7, schedule, data_var=float(torch.diagonal(cov).mean()), variant="linear")
    error = (iso.x0_shift(x, tt, None, x0_hat) - oracle.x0_shift(x, tt)).abs().max()
    assert t < 0.5 or float(error) > 0.05 * float(oracle.x0_shift(x, tt).abs().max())


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["flow", "vp"])
def test_newton_variant_exact_with_full_data_covariance(schedule):
    base, cov = correlated_gaussian()
    A = torch.diag(torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=torch.float64))
    reward = QuadraticReward.centered(torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64), A)
    oracle = base.tilt(reward, 0.5).oracle(schedule)
    est = TrainingFreeGuidance(reward, 0.5, schedule, data_cov=cov, variant="newton", cg_steps=4)
    x, tt = states(schedule, 4, 0.6)
    x0_hat = base.posterior_mean(x, tt, schedule)
    torch.testing.assert_close(est.x0_shift(x, tt, None, x0_hat), oracle.x0_shift(x, tt), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["flow", "vp"])
def test_per_element_data_var_exact_for_diagonal_gaussian(schedule):
    var = torch.tensor([[0.2], [1.0], [3.0]], dtype=torch.float64)  # per "channel" of a [3, 2] sample
    cov = torch.diag(var.expand(3, 2).flatten())
    base = GaussianMixture(torch.ones(1), torch.zeros(1, 6, dtype=torch.float64), cov[None])
    weights = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.3, 0.8], dtype=torch.float64)
    reward = QuadraticReward.linear(weights)
    oracle = base.tilt(reward, 0.5).oracle(schedule)
    x, tt = states(schedule, 6, 0.4)
    x0_hat = base.posterior_mean(x, tt, schedule)
    est = TrainingFreeGuidance(as_reward(lambda x0: reward(x0.flatten(1))), 0.5, schedule, data_var=var,
                               variant="linear")
    shift = est.x0_shift(x.reshape(-1, 3, 2), tt, None, x0_hat.reshape(-1, 3, 2))
    torch.testing.assert_close(shift.flatten(1), oracle.x0_shift(x, tt), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_isotropic_covariance_matches_scalar_variance(variant):
    """data_cov = s^2 I is the scalar proxy, for every variant (whitened bounded, CG and SNIS included)."""
    flow = RectifiedFlow()
    reward = QuadraticReward.centered(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64),
                                      torch.diag(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)))
    x, tt = states(flow, 3, 0.6, n=16)
    x0 = 0.5 * x
    scalar = TrainingFreeGuidance(reward, 0.3, flow, data_var=2.5, variant=variant)
    matrix = TrainingFreeGuidance(reward, 0.3, flow, data_cov=2.5 * torch.eye(3, dtype=torch.float64), variant=variant)
    torch.testing.assert_close(matrix.x0_shift(x, tt, None, x0), scalar.x0_shift(x, tt, None, x0),
                               rtol=1e-9, atol=1e-10)


def test_bounded_shift_is_bounded_in_the_whitened_metric():
    """At most one proxy standard deviation along the whitened gradient: shift^T C^-1 shift <= 1."""
    flow = RectifiedFlow()
    _, cov = correlated_gaussian()
    reward = QuadraticReward.linear(torch.tensor([50.0, 0.0, -20.0, 5.0], dtype=torch.float64))
    est = TrainingFreeGuidance(reward, 0.01, flow, data_cov=cov, variant="bounded")
    x, tt = states(flow, 4, 1.0, n=4)
    shift = est.x0_shift(x, tt, None, torch.zeros_like(x))
    mahalanobis = torch.einsum("ni,ij,nj->n", shift, torch.linalg.inv(cov), shift)  # C_1 = cov at t = 1
    torch.testing.assert_close(mahalanobis, torch.ones(4, dtype=torch.float64))


def test_bad_data_covariance():
    flow = RectifiedFlow()
    reward = QuadraticReward.linear(torch.tensor([1.0, 0.0], dtype=torch.float64))
    eye = torch.eye(2, dtype=torch.float64)
    with pytest.raises(TiltgenError, match="not both"):
        TrainingFreeGuidance(reward, 1.0, flow, data_var=1.0, data_cov=eye)
    with pytest.raises(TiltgenError, match="square"):
        TrainingFreeGuidance(reward, 1.0, flow, data_cov=torch.ones(2, 3))
    with pytest.raises(TiltgenError, match="positive definite"):
        TrainingFreeGuidance(reward, 1.0, flow, data_cov=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(TiltgenError, match="symmetric"):
        TrainingFreeGuidance(reward, 1.0, flow, data_cov=torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(TiltgenError, match="data_var"):
        TrainingFreeGuidance(reward, 1.0, flow, data_var=torch.tensor([1.0, -1.0]))
    x, tt = states(flow, 3, 0.5, n=2)
    with pytest.raises(TiltgenError, match="3 elements"):
        TrainingFreeGuidance(reward, 1.0, flow, data_cov=eye).x0_shift(x, tt, None, x)
    with pytest.raises(TiltgenError, match="broadcast"):
        TrainingFreeGuidance(reward, 1.0, flow, data_var=torch.ones(2)).x0_shift(x, tt, None, x)


def test_posterior_variance_limits():
    x = torch.zeros(3, 2, dtype=torch.float64)
    flow = RectifiedFlow()
    nu = posterior_variance(flow, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), x, 3.0).flatten()
    assert nu[0] == pytest.approx(3.0)  # pure noise: the prior variance
    assert nu[1] == pytest.approx(3.0 * 0.25 / (0.25 * 3.0 + 0.25))
    assert nu[2] == 0.0  # data: no tilt left


def test_variants_agree_for_weak_tilt():
    """For a tiny gradient all variants reduce to the first cumulant nu grad r / beta."""
    flow = RectifiedFlow()
    reward = QuadraticReward.linear(torch.tensor([1e-3, 2e-3], dtype=torch.float64))
    x, tt = states(flow, 2, 0.5, n=8)
    x0 = x * 0.3
    shifts = [TrainingFreeGuidance(reward, 1.0, flow, data_var=1.0, variant=v, draws=64).x0_shift(x, tt, None, x0)
              for v in VARIANTS]
    for s in shifts[1:]:
        torch.testing.assert_close(s, shifts[0], rtol=0.1, atol=1e-7)


def test_bounded_shift_is_bounded_by_posterior_std():
    flow = RectifiedFlow()
    reward = QuadraticReward.linear(torch.tensor([100.0, 0.0], dtype=torch.float64))
    est = TrainingFreeGuidance(reward, 0.01, flow, data_var=4.0, variant="bounded")
    x, tt = states(flow, 2, 1.0, n=4)
    shift = est.x0_shift(x, tt, None, torch.zeros_like(x))
    torch.testing.assert_close(shift[:, 0], torch.full((4,), 2.0, dtype=torch.float64))  # sqrt(nu) = 2
    assert bool(torch.isfinite(shift).all())


def test_snis_works_with_non_differentiable_reward_and_is_deterministic():
    flow = RectifiedFlow()
    reward = as_reward(lambda x0: (x0[:, 0] > 0).to(x0.dtype), differentiable=False)
    est = TrainingFreeGuidance(reward, 0.5, flow, data_var=1.0, variant="snis")
    x, tt = states(flow, 2, 0.7, n=16)
    a, b = est.x0_shift(x, tt, None, x), est.x0_shift(x, tt, None, x)
    torch.testing.assert_close(a, b)
    assert float(a[:, 0].mean()) > 0  # pushes towards the rewarded half-plane
    with pytest.raises(TiltgenError, match="differentiable"):
        TrainingFreeGuidance(reward, 0.5, flow)


def test_window_and_no_model_backprop():
    flow = RectifiedFlow()
    base = gaussian(dim=2)
    reward = CountingReward(QuadraticReward.linear(torch.tensor([1.0, 0.0], dtype=torch.float64)))
    model = CountingModel(base.model(flow, "velocity"))
    est = TrainingFreeGuidance(reward, 1.0, flow, data_var=2.0, t_window=(0.2, 0.8))
    assert est.needs_model_grad is False
    guided = GuidedModel(model, flow, est)
    x = sample(guided, flow, shape=(2,), n=8, steps=10, sampler="euler", progress=False, dtype=torch.float64)
    assert bool(torch.isfinite(x).all())
    assert model.sample_evals == 80  # one model call per step, like unguided Euler
    assert 0 < reward.grad_evals < 80  # only steps inside the window evaluate the reward


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="nope"), "variant"), (dict(data_var=0.0), "data_var"), (dict(data_var=float("nan")), "data_var"),
    (dict(cg_steps=0), "cg_steps"), (dict(draws=3), "draws"), (dict(t_window=(0.5, 0.1)), "window")])
def test_bad_arguments(kwargs, match):
    reward = QuadraticReward.linear(torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(TiltgenError, match=match):
        TrainingFreeGuidance(reward, 1.0, RectifiedFlow(), **kwargs)
    with pytest.raises(TiltgenError, match="beta"):
        TrainingFreeGuidance(reward, -1.0, RectifiedFlow())


def test_nan_reward_is_reported():
    reward = as_reward(lambda x0: x0[:, 0] * float("nan"), differentiable=True)
    est = TrainingFreeGuidance(reward, 1.0, RectifiedFlow())
    x = torch.ones(2, 1)
    with pytest.raises(TiltgenError, match="non-finite"):
        est(x, torch.full((2,), 0.5), None, x)


def test_bench_registers_methods_and_closes_half_the_gap():
    for name in ["trainingfree"] + [f"trainingfree-{v}" for v in VARIANTS]:
        resolve_method(name)
    result = run_analytic_bench(["ring2d-linear-b2"], ["flow"], ["unguided", "trainingfree"],
                                BenchSettings(n=400, steps=10, floor_pairs=10), progress=False)
    unguided, tf = result.records
    assert tf["model_evals"] == unguided["model_evals"]
    assert tf["reward_grad_evals"] == tf["model_evals"]
    assert tf["energy_distance"] <= 0.5 * unguided["energy_distance"]

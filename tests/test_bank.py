"""Training-free guidance with a sample bank: exact for the bank's own kernel mixture, bad input, bench."""

import pytest
import torch

from tiltgen.backends.gaussian_mixture import GaussianMixture
from tiltgen.core import RectifiedFlow, VPLinear, as_reward
from tiltgen.errors import TiltgenError
from tiltgen.eval.analytic_bench import BenchSettings, resolve_method, run_analytic_bench
from tiltgen.rewards.quadratic import QuadraticReward
from tiltgen.tilt import TrainingFreeGuidance
from tiltgen.tilt import bank as bank_module
from tiltgen.tilt.bank import SampleBank, bandwidth_factor
from tiltgen.tilt.training_free import VARIANTS

SCHEDULES = [RectifiedFlow(), VPLinear()]
DIM, M = 3, 6


def bank_points() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(M, DIM, generator=g, dtype=torch.float64) * 2


def spd(dim: int = DIM) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    return rotation @ torch.diag(torch.linspace(0.3, 2.5, dim, dtype=torch.float64)) @ rotation.T


def kernel_mixture(bank: SampleBank, cov: torch.Tensor, bandwidth: float) -> GaussianMixture:
    """The bank's kernel density as a Gaussian mixture: M equal components N(x_j, h^2 S)."""
    kernel = bandwidth_factor(bank, bandwidth) * cov
    return GaussianMixture(torch.full((M,), 1.0 / M, dtype=torch.float64), bank.x0, kernel.expand(M, DIM, DIM))


def states(t: float, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, DIM, generator=g, dtype=torch.float64) * 2, torch.full((n,), t, dtype=torch.float64)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["flow", "vp"])
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("full_cov", [True, False], ids=["data_cov", "data_var"])
def test_linear_bank_is_exact_for_its_kernel_mixture(schedule, t, full_cov):
    """The bank's prior is the Gaussian mixture sum_j N(x_j, h^2 S) / M; with a linear reward
    its posterior reweighting and the linear variant inside each component are both exact."""
    reward = QuadraticReward.linear(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    bank = SampleBank.from_samples(bank_points(), reward)
    cov = spd() if full_cov else torch.diag(torch.tensor([0.4, 1.0, 2.0], dtype=torch.float64))
    spec = {"data_cov": cov} if full_cov else {"data_var": torch.diagonal(cov)}
    oracle = kernel_mixture(bank, cov, 0.7).tilt(reward, 0.6).oracle(schedule)
    est = TrainingFreeGuidance(reward, 0.6, schedule, variant="linear", bank=bank, bandwidth=0.7, **spec)
    x, tt = states(t)
    shift = est.x0_shift(x, tt, None, torch.zeros_like(x))  # a linear reward's gradient is the same anywhere
    torch.testing.assert_close(shift, oracle.x0_shift(x, tt), rtol=1e-8, atol=1e-9)


def test_bank_reweights_between_modes_where_the_gaussian_proxy_cannot():
    """Two far modes, reward favouring the light one: at high noise the bank moves the posterior
    mean most of the way to the exact tilt's; the Gaussian proxy moves it by about one std."""
    schedule = RectifiedFlow()
    means = torch.tensor([[0.0, 0.0], [6.0, 0.0]], dtype=torch.float64)
    base = GaussianMixture(torch.tensor([0.9, 0.1], dtype=torch.float64), means,
                           0.25 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    reward = QuadraticReward.linear(torch.tensor([1.0, 0.0], dtype=torch.float64))
    samples = base.sample(4096, torch.Generator().manual_seed(0))
    cov = torch.cov(samples.T)
    oracle = base.tilt(reward, 1.0).oracle(schedule)
    x, tt = torch.zeros(1, 2, dtype=torch.float64), torch.full((1,), 0.98, dtype=torch.float64)
    x0_hat = base.posterior_mean(x, tt, schedule)
    exact = float(oracle.x0_shift(x, tt)[0, 0])
    banked = TrainingFreeGuidance(reward, 1.0, schedule, data_cov=cov, bank=SampleBank.from_samples(samples, reward))
    plain = TrainingFreeGuidance(reward, 1.0, schedule, data_cov=cov)
    assert exact > 4.0
    assert abs(float(banked.x0_shift(x, tt, None, x0_hat)[0, 0]) - exact) < 0.1 * exact
    assert float(plain.x0_shift(x, tt, None, x0_hat)[0, 0]) < 0.5 * exact


def test_bank_chunks_give_the_same_shift(monkeypatch):
    reward = QuadraticReward.linear(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    est = TrainingFreeGuidance(reward, 0.6, VPLinear(), data_cov=spd(),
                               bank=SampleBank.from_samples(bank_points(), reward))
    x, _ = states(0.4)
    tt = torch.linspace(0.1, 0.9, x.shape[0], dtype=torch.float64)  # per-sample times too
    whole = est.x0_shift(x, tt, None, x)
    monkeypatch.setattr(bank_module, "CHUNK_ENTRIES", 2 * M)  # two rows per chunk
    torch.testing.assert_close(est.x0_shift(x, tt, None, x), whole, rtol=1e-12, atol=1e-12)


def test_values_only_bank_for_a_non_differentiable_reward():
    """A reward without gradients: the bank keeps values only and the snis variant uses them."""
    reward = as_reward(lambda x0, cond: (x0[:, 0] > 0).to(x0.dtype))
    bank = SampleBank.from_samples(bank_points(), reward)
    assert bank.grads is None
    est = TrainingFreeGuidance(reward, 0.5, RectifiedFlow(), data_var=1.0, variant="snis", bank=bank)
    x, tt = states(0.9)
    shift = est.x0_shift(x, tt, None, x)
    assert torch.isfinite(shift).all()
    assert float(shift[:, 0].mean()) > 0  # toward the rewarded half-space
    with pytest.raises(TiltgenError, match="differentiable"):
        SampleBank.from_samples(bank_points(), reward, grads=True)


def test_bank_bad_input():
    reward = QuadraticReward.linear(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    points = bank_points()
    with pytest.raises(TiltgenError, match="at least 2"):
        SampleBank(points[:1], torch.zeros(1))
    with pytest.raises(TiltgenError, match="rewards have shape"):
        SampleBank(points, torch.zeros(M + 1, dtype=torch.float64))
    with pytest.raises(TiltgenError, match="not all finite"):
        SampleBank(points, torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(TiltgenError, match="gradients have shape"):
        SampleBank(points, torch.zeros(M, dtype=torch.float64), grads=torch.zeros(M, 2, dtype=torch.float64))
    bank = SampleBank.from_samples(points, reward)
    with pytest.raises(TiltgenError, match="bandwidth"):
        TrainingFreeGuidance(reward, 1.0, RectifiedFlow(), bank=bank, bandwidth=0.0)
    with pytest.raises(TiltgenError, match="SampleBank"):
        TrainingFreeGuidance(reward, 1.0, RectifiedFlow(), bank=points)
    est = TrainingFreeGuidance(reward, 1.0, RectifiedFlow(), bank=bank)
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(TiltgenError, match="shape"):
        est.x0_shift(x, torch.full((4,), 0.5, dtype=torch.float64), None, x)


def test_bench_bank_reaches_the_rare_mode():
    """On the rare mode at beta = 0.5 the Gaussian proxy barely moves; the bank gets most of the way."""
    for name in ["trainingfree-bank"] + [f"trainingfree-bank-{v}" for v in VARIANTS]:
        resolve_method(name)
    result = run_analytic_bench(["raremode4d-linear-b0.5"], ["flow"], ["unguided", "trainingfree", "trainingfree-bank"],
                                BenchSettings(n=400, steps=10, floor_pairs=10), progress=False)
    unguided, plain, banked = result.records
    assert banked["model_evals"] == unguided["model_evals"]  # the bank's sampling is setup, counted apart
    assert banked["setup_reward_evals"] >= banked["bank_size"] > 0  # values, and gradients (counted as calls too)
    assert banked["setup_model_evals"] == banked["bank_size"] * unguided["model_evals"]
    assert banked["energy_distance"] <= 0.1 * plain["energy_distance"]
    assert banked["mode_weight_error"] <= 0.1


def test_per_prompt_banks_match_one_bank_per_prompt():
    """A mapping prompt -> bank guides each row with its own prompt's bank, as if sampled alone."""
    reward = QuadraticReward.linear(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    banks = {"a": SampleBank.from_samples(bank_points(), reward),
             "b": SampleBank.from_samples(bank_points()[:4] * -1.5, reward)}
    x, tt = states(0.6, n=6)
    prompts = ["a", "b", "b", "a", "b", "a"]
    mixed = TrainingFreeGuidance(reward, 0.6, VPLinear(), data_cov=spd(), bank=banks).x0_shift(x, tt, prompts, x)
    for name, bank in banks.items():
        rows = [i for i, p in enumerate(prompts) if p == name]
        alone = TrainingFreeGuidance(reward, 0.6, VPLinear(), data_cov=spd(), bank=bank)
        torch.testing.assert_close(mixed[rows], alone.x0_shift(x[rows], tt[rows], [name] * len(rows), x[rows]),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(TiltgenError, match="no sample bank for the prompt 'c'"):
        TrainingFreeGuidance(reward, 0.6, VPLinear(), bank=banks).x0_shift(x, tt, ["c"] * 6, x)
    with pytest.raises(TiltgenError, match="prompts as the condition"):
        TrainingFreeGuidance(reward, 0.6, VPLinear(), bank=banks).x0_shift(x, tt, None, x)
    with pytest.raises(TiltgenError, match="empty mapping"):
        TrainingFreeGuidance(reward, 0.6, VPLinear(), bank={})

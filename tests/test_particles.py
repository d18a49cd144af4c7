"""Particle methods: best-of-N and SMC / Feynman-Kac steering."""

import pytest
import torch

from tiltgen.backends.gaussian_mixture import GaussianMixture
from tiltgen.core import CountingModel, CountingReward, RectifiedFlow, as_reward
from tiltgen.errors import TiltgenError
from tiltgen.eval.analytic_bench import BenchSettings, resolve_method, run_analytic_bench
from tiltgen.eval.metrics import energy_distance
from tiltgen.rewards.quadratic import QuadraticReward
from tiltgen.tilt import TrainingFreeGuidance, best_of_n, smc_sample
from tiltgen.tilt.particles import ess_fraction, systematic_resample

FLOW = RectifiedFlow()


def two_modes() -> GaussianMixture:
    """Modes at -2 and +2 (std 0.5) in 1-D; a linear reward x / beta reweights them."""
    return GaussianMixture(torch.ones(2), torch.tensor([[-2.0], [2.0]], dtype=torch.float64),
                           torch.full((2, 1, 1), 0.25, dtype=torch.float64))


LINEAR = QuadraticReward.linear(torch.tensor([1.0], dtype=torch.float64))


def run_smc(particles: int, n: int = 300, **kwargs) -> torch.Tensor:
    base = two_modes()
    return smc_sample(base.model(FLOW, "velocity"), FLOW, LINEAR, 1.0, n=n, particles=particles, shape=(1,),
                      steps=20, dtype=torch.float64, **kwargs).samples


def test_smc_approaches_target_as_particles_grow():
    base = two_modes()
    exact = base.tilt(LINEAR, 1.0).tilted.sample(2000, torch.Generator().manual_seed(1))
    unguided = base.sample(2000, torch.Generator().manual_seed(2))
    e1, e16 = (energy_distance(run_smc(k), exact) for k in (1, 16))
    assert e16 < 0.25 * energy_distance(unguided, exact)
    assert e16 < e1
    # mode weights: exact p*(x > 0) = 1 / (1 + e^-4) ~ 0.98
    assert float((run_smc(16) > 0).double().mean()) > 0.9


def test_smc_with_one_particle_is_the_base_sampler():
    x = run_smc(1, n=400)
    assert abs(float((x > 0).double().mean()) - 0.5) < 0.1


def test_smc_with_drift_corrects_the_proposal():
    """A deliberately over-strong drift (3x) is corrected by the transition weights as N grows."""
    base = two_modes()
    exact = base.tilt(LINEAR, 1.0).tilted.sample(2000, torch.Generator().manual_seed(1))
    drift = TrainingFreeGuidance(LINEAR, 1.0, FLOW, data_var=4.25, variant="linear", scale=3.0)
    kwargs = dict(n=200, particles=128, shape=(1,), steps=20, dtype=torch.float64)
    model = base.model(FLOW, "velocity")
    with_drift = smc_sample(model, FLOW, LINEAR, 1.0, drift=drift, **kwargs).samples
    plain_drift = smc_sample(model, FLOW, LINEAR, 1.0, drift=drift, **dict(kwargs, particles=1)).samples
    assert energy_distance(with_drift, exact) < 0.5 * energy_distance(plain_drift, exact)
    assert abs(float(with_drift.mean()) - float(exact.mean())) < 0.15


def test_smc_non_differentiable_reward_and_counts():
    base = two_modes()
    reward = CountingReward(as_reward(lambda x0: 3.0 * (x0[:, 0] > 0).to(x0.dtype), differentiable=False))
    model = CountingModel(base.model(FLOW, "velocity"))
    out = smc_sample(model, FLOW, reward, 1.0, n=50, particles=8, shape=(1,), steps=10, dtype=torch.float64)
    assert out.samples.shape == (50, 1) and out.particles.shape == (50, 8, 1)
    assert model.sample_evals == 50 * 8 * 10  # ddpm: one model call per particle per step
    assert reward.grad_evals == 0 and reward.evals == 50 * 8 * 11
    assert float((out.samples > 0).double().mean()) > 0.85
    torch.testing.assert_close(torch.logsumexp(out.log_weights, 1), torch.zeros(50, dtype=torch.float64))


def test_best_of_n_picks_highest_reward():
    base = two_modes()
    out = best_of_n(base.model(FLOW, "velocity"), FLOW, LINEAR, n=20, particles=8, shape=(1,), steps=10,
                    sampler="euler", dtype=torch.float64)
    torch.testing.assert_close(out.samples[:, 0], out.particles[:, :, 0].max(1).values)


def test_systematic_resampling_and_ess():
    log_w = torch.log(torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64))
    idx = systematic_resample(log_w, torch.Generator().manual_seed(0))
    assert idx[0].tolist() == [1, 1, 1, 1] and sorted(idx[1].tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(ess_fraction(log_w), torch.tensor([0.25, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(particles=0), "particles"), (dict(particles=2.5), "particles"), (dict(ess_threshold=0.0), "ess_threshold"),
    (dict(ess_threshold=1.5), "ess_threshold"), (dict(n=0), "populations"), (dict(sampler="magic"), "sampler")])
def test_bad_input(kwargs, match):
    args = dict(n=2, particles=2, shape=(1,), steps=2)
    args.update(kwargs)
    with pytest.raises(TiltgenError, match=match):
        smc_sample(two_modes().model(FLOW, "velocity"), FLOW, LINEAR, 1.0, **args)


def test_drift_needs_stochastic_sampler_and_nan_reward_errors():
    model = two_modes().model(FLOW, "velocity")
    drift = TrainingFreeGuidance(LINEAR, 1.0, FLOW)
    with pytest.raises(TiltgenError, match="stochastic"):
        smc_sample(model, FLOW, LINEAR, 1.0, n=2, particles=2, shape=(1,), steps=2, drift=drift, sampler="heun")
    nan = as_reward(lambda x0: x0[:, 0] * float("nan"), differentiable=False)
    with pytest.raises(TiltgenError, match="non-finite"):
        smc_sample(model, FLOW, nan, 1.0, n=2, particles=2, shape=(1,), steps=2)
    with pytest.raises(TiltgenError, match="non-finite"):
        best_of_n(model, FLOW, nan, n=2, particles=2, shape=(1,), steps=2)
    with pytest.raises(TiltgenError, match="particles"):
        best_of_n(model, FLOW, LINEAR, n=2, particles=0, shape=(1,), steps=2)


def test_bench_patterns_and_costs():
    for name in ["bestofn-4", "smc-4", "smc-4+trainingfree", "smc-2+tweedie", "bestofn-2+trainingfree-linear"]:
        resolve_method(name)
    for bad, match in [("smc-0", "particles"), ("smc-4+nope", "drift"), ("bestofn-0", "particles"),
                       ("bestofn-4+nope", "drift")]:
        with pytest.raises(TiltgenError, match=match):
            resolve_method(bad)
    settings = BenchSettings(n=100, steps=5)
    records = run_analytic_bench(["ring2d-linear-b2"], ["flow"], ["unguided", "smc-4", "bestofn-4", "smc-2+trainingfree"],
                                 settings, progress=False).records
    by = {r["method"]: r for r in records}
    # SMC's ddpm steps match the Heun trajectory's 2 * 5 - 1 model evaluations
    assert by["smc-4"]["model_evals"] == 4 * 9 == 4 * by["unguided"]["model_evals"]
    assert by["smc-4"]["sampler"] == "ddpm" and by["smc-4"]["smc_steps"] == 9
    assert by["bestofn-4"]["model_evals"] == 4 * by["unguided"]["model_evals"]
    assert by["smc-2+trainingfree"]["reward_grad_evals"] == 2 * 8  # drift on every step but the last
    with pytest.raises(TiltgenError, match="particles"):
        resolve_method("twisted-smc-0")
    twisted = run_analytic_bench(["ring2d-linear-b2"], ["flow"], ["twisted-smc-4", "twisted-nohandoff-smc-4"],
                                 BenchSettings(n=40, steps=5, train_steps=20, train_data=200, train_pool=2000),
                                 progress=False).records
    row = next(r for r in twisted if r["method"] == "twisted-smc-4")
    assert row["model_evals"] == 4 * 9 and len(row["ess_per_step"]) == 9 and 0 < row["ess_min"] <= 1
    assert row["train_reward_evals"] > 0 and abs(row["log_z"] - row["log_z_exact"]) < 2
    # the default hands over to the plug-in, whose reward is evaluated at every step to compare
    plain = next(r for r in twisted if r["method"] == "twisted-nohandoff-smc-4")
    assert row["handoff"] and not plain["handoff"] and plain["handoff_t"] is None
    assert row["reward_evals"] == 4 * (9 + 1) and plain["reward_evals"] == 4  # 9 steps and the final reward


def test_twisted_smc_with_the_exact_twist_has_even_weights_and_the_exact_normaliser():
    """With the exact log h_t as twist and the exact drift as proposal, every weight is equal up
    to the time discretisation: the ESS tends to 1 and log Z to log E_p[exp(r/beta)] as the
    steps grow; the plug-in twist's log Z varies far more between populations."""
    from tiltgen.tilt import ExactGuidance

    base = two_modes()
    tilt = base.tilt(LINEAR, 1.0)
    oracle = tilt.oracle(FLOW)
    model = base.model(FLOW, "velocity")
    kwargs = dict(n=200, particles=16, shape=(1,), steps=200, dtype=torch.float64)
    twisted = smc_sample(model, FLOW, LINEAR, 1.0, drift=ExactGuidance(oracle), twist=oracle.log_h, **kwargs)
    plugin = smc_sample(model, FLOW, LINEAR, 1.0, **kwargs)
    assert min(twisted.ess) > 0.95 and len(twisted.ess) == 200
    assert abs(float(twisted.log_z.mean()) - tilt.log_z) < 0.03 and float(twisted.log_z.std()) < 0.06
    assert float(plugin.log_z.std()) > 4 * float(twisted.log_z.std())
    with pytest.raises(TiltgenError, match="returned 3 values for 3200 particles"):
        smc_sample(model, FLOW, LINEAR, 1.0, twist=lambda x, t, c: torch.zeros(3), **kwargs)


def test_twisted_smc_with_a_learned_twist_evens_the_weights():
    """A guidance network trained on the base model: its log potential as twist and its drift
    as proposal give more even weights and a better log Z than the plug-in twist."""
    from tiltgen.tilt.learned import TrainConfig, train_guidance

    base = two_modes()
    tilt = base.tilt(LINEAR, 1.0)
    model = base.model(FLOW, "velocity")
    guidance = train_guidance(model, FLOW, LINEAR, TrainConfig(beta=1.0, steps=300, n_data=2000, pool_size=20000,
                                                              time_levels=20, batch_size=256),
                              shape=(1,), progress=False).guidance
    kwargs = dict(n=300, particles=16, shape=(1,), steps=50, dtype=torch.float64)
    twisted = smc_sample(model, FLOW, LINEAR, 1.0, drift=guidance, twist=guidance.log_twist, **kwargs)
    plugin = smc_sample(model, FLOW, LINEAR, 1.0, **kwargs)
    assert min(twisted.ess) > min(plugin.ess) + 0.1
    assert abs(float(twisted.log_z.mean()) - tilt.log_z) < abs(float(plugin.log_z.mean()) - tilt.log_z)
    exact = tilt.tilted.sample(3000, torch.Generator().manual_seed(1))
    assert energy_distance(twisted.samples, exact) < 0.05


def test_twisted_smc_hands_a_twist_wrong_near_the_data_over_to_the_plug_in():
    """A twist that is exact at high noise and wrong near the data (where the plug-in
    r(x0_hat)/beta is nearly exact): with ``handoff`` the plug-in takes over once its one-step
    weight increments vary less, and the samples and log Z come back to the exact tilt's."""
    from tiltgen.tilt import ExactGuidance

    base = two_modes()
    beta = 0.5
    tilt = base.tilt(LINEAR, beta)
    oracle = tilt.oracle(FLOW)
    model = base.model(FLOW, "velocity")

    def wrong_near_data(x, t, cond):  # exact above t = 0.4, then a growing wrong bump in x
        ramp = (0.4 - t).clamp_min(0.0) / 0.4
        return oracle.log_h(x, t) + 6.0 * ramp * torch.sin(2.0 * x[:, 0])

    kwargs = dict(n=400, particles=8, shape=(1,), steps=100, dtype=torch.float64, drift=ExactGuidance(oracle))
    counted = CountingReward(LINEAR)
    plain = smc_sample(model, FLOW, LINEAR, beta, twist=wrong_near_data, **kwargs)
    handed = smc_sample(model, FLOW, counted, beta, twist=wrong_near_data, handoff=True, **kwargs)
    assert plain.handoff_t is None and handed.handoff_t is not None and 0.0 < handed.handoff_t <= 0.45
    exact = tilt.tilted.sample(4000, torch.Generator().manual_seed(1))
    assert energy_distance(handed.samples, exact) < 0.5 * energy_distance(plain.samples, exact)
    assert abs(float(handed.log_z.mean()) - tilt.log_z) < abs(float(plain.log_z.mean()) - tilt.log_z)
    assert counted.evals == 400 * 8 * (100 + 1)  # the plug-in at every step (to compare, then to twist), the final reward
    # handing over the exact twist costs nothing (the weights telescope between resamplings)
    exact_twist = smc_sample(model, FLOW, LINEAR, beta, twist=oracle.log_h, handoff=True, **kwargs)
    assert energy_distance(exact_twist.samples, exact) < 0.02
    with pytest.raises(TiltgenError, match="handoff=True hands a twist over"):
        smc_sample(model, FLOW, LINEAR, beta, handoff=True, **{**kwargs, "n": 2})


def test_exact_tilt_with_the_smc_sampler_is_the_smc_rows_floor():
    """``exact-ddpm``: the exact tilt at SMC's sampler and steps; its error is the sampler's and
    shrinks with the steps (what no number of particles can remove)."""
    rows = {}
    for steps in (3, 40):
        records = run_analytic_bench(["ring2d-linear-b0.5"], ["vp"], ["exact-ddpm"], BenchSettings(n=600, steps=steps),
                                     progress=False).records
        rows[steps] = next(r for r in records if r["method"] == "exact-ddpm")
    assert rows[3]["sampler"] == "ddpm" and rows[3]["smc_steps"] == 5 and rows[3]["model_evals"] == 5
    assert rows[40]["smc_steps"] == 79
    named = run_analytic_bench(["ring2d-linear-b0.5"], ["vp"], ["exact-ddpm", "smc-2"],
                               BenchSettings(n=50, steps=3, smc_steps=7), progress=False).records
    assert [r["smc_steps"] for r in named if r["method"] != "unguided"] == [7, 7]
    assert next(r for r in named if r["method"] == "smc-2")["model_evals"] == 2 * 7
    assert rows[40]["energy_distance"] < 0.5 * rows[3]["energy_distance"]
    assert rows[40]["energy_distance"] < 3 * rows[40]["energy_floor"]

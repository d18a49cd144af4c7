"""The decomposition against exact tilted mixtures, and the estimators."""

import pytest
import torch

from tiltgen.backends import GaussianMixture
from tiltgen.core import PREDICTIONS, DiscreteVP, RectifiedFlow, VPCosine, VPLinear, as_model, as_reward, sample
from tiltgen.core.conversions import coefficients
from tiltgen.errors import TiltgenError
from tiltgen.rewards import QuadraticReward
from tiltgen.tilt import ExactGuidance, GuidedModel, Tilt, TweedieGuidance, guide_prediction, x0_shift_from_g
from tiltgen.tilt.decomposition import ALPHA_MIN

SCHEDULES = [VPLinear(), VPCosine(), RectifiedFlow(), RectifiedFlow(shift=3.0)]


def ring(d=2):
    means = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0]], dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.2, 0.3, 0.5]), means, 0.3 * torch.eye(2, dtype=torch.float64).expand(3, 2, 2))


@pytest.mark.parametrize("kind", PREDICTIONS)
@pytest.mark.parametrize("form", ["g", "x0_shift"])
def test_guided_prediction_equals_exact_tilted_model(kind, form):
    gm = ring()
    tm = gm.tilt(QuadraticReward.centered(torch.tensor([1.0, 2.0]), torch.eye(2)), beta=0.5)
    for s in SCHEDULES:
        x = torch.randn(16, 2, dtype=torch.float64) * 2
        t = torch.full((16,), 0.37, dtype=torch.float64)
        oracle = tm.oracle(s)
        tilt = Tilt(g=oracle.grad_log_h(x, t)) if form == "g" else Tilt(x0_shift=oracle.x0_shift(x, t))
        guided = guide_prediction(gm.model(s, kind)(x, t), kind, x, t, s, tilt)
        torch.testing.assert_close(guided, tm.tilted.model(s, kind)(x, t), rtol=1e-8, atol=1e-8)


def test_x0_shift_is_exact_at_pure_noise_while_g_vanishes():
    gm = ring()
    tm = gm.tilt(QuadraticReward.linear(torch.tensor([1.0, 0.0])), beta=1.0)
    s = RectifiedFlow()
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.ones(8, dtype=torch.float64)
    oracle = tm.oracle(s)
    torch.testing.assert_close(oracle.grad_log_h(x, t), torch.zeros_like(x), atol=1e-12, rtol=0)
    # at t = 1 the tilted velocity is eps - E*[x0]: only the x0 form carries it
    guided = guide_prediction(gm.model(s, "velocity")(x, t), "velocity", x, t, s, Tilt(x0_shift=oracle.x0_shift(x, t)))
    torch.testing.assert_close(guided, x - tm.tilted.means.T @ tm.tilted.weights)
    from_g = guide_prediction(gm.model(s, "velocity")(x, t), "velocity", x, t, s, Tilt(g=oracle.grad_log_h(x, t)))
    assert bool(torch.isfinite(from_g).all())


def test_g_below_alpha_min_is_taken_at_its_pure_noise_limit():
    s = DiscreteVP.from_diffusers("squaredcos_cap_v2")  # alpha = 4.9e-5 at the last timestep
    x = torch.randn(4, 2, dtype=torch.float64)
    g = torch.randn(4, 2, dtype=torch.float64)
    first = coefficients(s, torch.ones(4, dtype=torch.float64), x)
    assert 0 < float(first.alpha[0]) < ALPHA_MIN
    assert bool((x0_shift_from_g(g, first) == 0).all())
    later = coefficients(s, torch.full((4,), 0.98, dtype=torch.float64), x)
    assert float(later.alpha[0]) > ALPHA_MIN
    torch.testing.assert_close(x0_shift_from_g(g, later), later.sigma**2 / later.alpha * g)


def test_plug_in_does_not_blow_up_at_a_cosine_schedules_first_step():
    """A denoiser whose x0 still depends on x_t at pure noise (as a trained one does) gives a plug-in
    g of O(1), not O(alpha); at the first step of squaredcos_cap_v2 (sigma^2/alpha = 2e4) taken at
    face value it threw the samples' mean reward from 3.06 (exact) to 9.3."""
    gm = ring()
    s = DiscreteVP.from_diffusers("squaredcos_cap_v2")
    exact = gm.model(s, "x0")
    imperfect = as_model(lambda x, t, c: exact(x, t, c) + 0.01 * x, prediction="x0")
    reward = QuadraticReward.linear(torch.tensor([1.0, 0.0], dtype=torch.float64))
    tilted = gm.tilt(reward, beta=1.0).tilted
    guided = sample(GuidedModel(imperfect, s, TweedieGuidance(reward, beta=1.0)), s, n=256, shape=(2,), steps=30,
                    sampler="ddim", progress=False, dtype=torch.float64)
    assert bool(torch.isfinite(guided).all())
    assert abs(float(guided[:, 0].mean()) - float(tilted.weights @ tilted.means[:, 0])) < 0.3


def test_tilt_holds_exactly_one_term():
    with pytest.raises(TiltgenError):
        Tilt()
    with pytest.raises(TiltgenError):
        Tilt(g=torch.zeros(1), x0_shift=torch.zeros(1))


def test_tweedie_matches_covariance_formula_on_a_gaussian():
    """For a Gaussian base and linear reward the plug-in is exact: x0 shift = Cov[x0|x_t] w / beta."""
    gm = GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0]]), torch.tensor([[[1.0, 0.3], [0.3, 0.5]]]))
    reward = QuadraticReward.linear(torch.tensor([1.0, -2.0]))
    tm = gm.tilt(reward, beta=0.8)
    for s in SCHEDULES:
        x = torch.randn(10, 2, dtype=torch.float64)
        t = torch.full((10,), 0.6, dtype=torch.float64)
        guided = GuidedModel(gm.model(s, "eps"), s, TweedieGuidance(reward, 0.8))
        torch.testing.assert_close(guided(x, t), tm.tilted.model(s, "eps")(x, t), rtol=1e-8, atol=1e-8)


def test_damped_tweedie_is_exact_for_an_isotropic_gaussian_and_a_quadratic_reward():
    """lambda_t = 1 / (1 + a v / beta) turns the plug-in into the exact tilt of a Gaussian mode under a
    concave quadratic reward (v and a read along grad r); the undamped plug-in over-concentrates."""
    gm = GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0, 0.2]]), 0.7 * torch.eye(3).unsqueeze(0))
    reward = QuadraticReward.centered(torch.tensor([2.0, 1.0, -1.0]), 3.0 * torch.eye(3))
    tm = gm.tilt(reward, beta=0.4)
    for s in SCHEDULES:
        x = torch.randn(10, 3, dtype=torch.float64)
        t = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
        exact = tm.tilted.model(s, "eps")(x, t)
        damped = GuidedModel(gm.model(s, "eps"), s, TweedieGuidance(reward, 0.4, damping=True, schedule=s))
        torch.testing.assert_close(damped(x, t), exact, rtol=1e-7, atol=1e-8)
        plain = GuidedModel(gm.model(s, "eps"), s, TweedieGuidance(reward, 0.4))
        assert float((plain(x, t) - exact).abs().max()) > 1e-2
    # a linear reward has no curvature: damping changes nothing
    linear = QuadraticReward.linear(torch.tensor([1.0, -2.0, 0.5]))
    s = RectifiedFlow()
    x, t = torch.randn(6, 3, dtype=torch.float64), torch.full((6,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(GuidedModel(gm.model(s, "eps"), s, TweedieGuidance(linear, 0.4, damping=True, schedule=s))(x, t),
                               GuidedModel(gm.model(s, "eps"), s, TweedieGuidance(linear, 0.4))(x, t))
    with pytest.raises(TiltgenError, match="schedule"):
        TweedieGuidance(reward, 0.4, damping=True)
    # a reward that is flat somewhere (zero gradient) leaves the float32 model untouched there
    flat = as_reward(lambda x0, cond=None: (x0 * 0).sum(1))
    x32, t32 = torch.randn(4, 3), torch.full((4,), 0.5)
    damped_flat = GuidedModel(gm.model(s, "eps"), s, TweedieGuidance(flat, 0.4, damping=True, schedule=s))
    torch.testing.assert_close(damped_flat(x32, t32), gm.model(s, "eps")(x32, t32))


def test_tweedie_overshoots_on_a_mixture():
    gm = ring()
    reward = QuadraticReward.linear(torch.tensor([1.0, 0.0]))
    tm = gm.tilt(reward, beta=0.5)
    s = RectifiedFlow()
    x_tweedie = sample(GuidedModel(gm.model(s, "velocity"), s, TweedieGuidance(reward, 0.5)), s, shape=(2,), n=400,
                       steps=20, dtype=torch.float64, progress=False)
    assert float(reward(x_tweedie).mean()) > tm.tilted.expected_reward(reward) + 0.3


def test_tweedie_window_and_bad_input():
    gm = ring()
    reward = QuadraticReward.linear(torch.tensor([1.0, 0.0]))
    s = VPLinear()
    est = TweedieGuidance(reward, 1.0, t_window=(0.0, 0.5))
    guided = GuidedModel(gm.model(s, "eps"), s, est)
    x = torch.randn(4, 2, dtype=torch.float64)
    late = torch.full((4,), 0.8, dtype=torch.float64)
    torch.testing.assert_close(guided(x, late), gm.model(s, "eps")(x, late))
    with pytest.raises(TiltgenError, match="beta must be"):
        TweedieGuidance(reward, 0.0)
    with pytest.raises(TiltgenError, match="time window"):
        TweedieGuidance(reward, 1.0, t_window=(0.6, 0.2))
    with pytest.raises(TiltgenError, match="needs a differentiable reward"):
        TweedieGuidance(as_reward(lambda x0: (x0[:, 0] > 0).double(), differentiable=False), 1.0)


def test_non_finite_reward_is_reported_not_propagated():
    gm = ring()
    s = RectifiedFlow()
    bad = as_reward(lambda x0, c: torch.where(x0[:, 0] > 0, torch.log(-x0[:, 0]), x0[:, 0]), differentiable=True, name="logneg")
    guided = GuidedModel(gm.model(s, "velocity"), s, TweedieGuidance(bad, 1.0))
    with pytest.raises(TiltgenError, match="reward 'logneg' returned non-finite values"):
        sample(guided, s, shape=(2,), n=64, steps=5, dtype=torch.float64, progress=False)


def test_plain_callables_work_as_model_and_reward():
    s = RectifiedFlow()
    # exact velocity of N(0, I) data: u = (t x - (1 - t) x ... ) derived from x0_hat = (1-t) x / ((1-t)^2 + t^2)
    def velocity(x, t):
        tt = t[:, None]
        x0 = (1 - tt) * x / ((1 - tt) ** 2 + tt**2)
        eps = (x - (1 - tt) * x0) / tt
        return eps - x0

    model = as_model(velocity, prediction="velocity")
    reward = as_reward(lambda x0: x0.sum(1), differentiable=True)
    guided = GuidedModel(model, s, TweedieGuidance(reward, beta=1.0))
    x = sample(guided, s, shape=(2,), n=2000, steps=30, dtype=torch.float64, progress=False)
    # N(0, I) tilted by exp(sum(x)) is N(1, I): Tweedie is exact on a Gaussian
    torch.testing.assert_close(x.mean(0), torch.ones(2, dtype=torch.float64), atol=0.08, rtol=0)
    with pytest.raises(TiltgenError, match="does not declare its prediction kind"):
        as_model(velocity)
    undeclared = as_reward(lambda x0: x0.sum(1))  # differentiability inferred (tests/test_user_rewards.py)
    assert undeclared.differentiable and not undeclared.declared


def test_closed_form_reward_gradient_matches_autograd_and_is_counted():
    from tiltgen.core.reward import CountingReward, reward_gradient

    reward = QuadraticReward.centered(torch.tensor([1.0, -0.5]), torch.tensor([[2.0, 0.3], [0.3, 1.0]]))
    x = torch.randn(7, 2, dtype=torch.float64)
    autograd_only = as_reward(lambda x0, c: reward(x0), differentiable=True)  # no .grad: autograd path
    torch.testing.assert_close(reward_gradient(reward, x), reward_gradient(autograd_only, x))
    counted = CountingReward(reward)
    reward_gradient(counted, x)
    assert counted.evals == 7 and counted.grad_evals == 7
    assert getattr(CountingReward(autograd_only), "grad", None) is None
    bad = as_reward(lambda x0, c: x0.sum(1), differentiable=True)
    bad.grad = lambda x0, c: x0[:, :1]
    with pytest.raises(TiltgenError, match="grad returned shape"):
        reward_gradient(bad, x)


def test_a_non_finite_x0_prediction_is_named_not_blamed_on_the_reward():
    """An eps model on a flow has no x0 at t = 1 (alpha = 0): the error says so, at that time."""
    s = RectifiedFlow()
    model = as_model(lambda x, t, c: torch.zeros_like(x), prediction="eps")
    reward = as_reward(lambda x, c: -(x**2).sum(1))
    guided = GuidedModel(model, s, TweedieGuidance(reward, beta=1.0))
    with pytest.raises(TiltgenError, match=r"x0 prediction is not finite at t = 1 for 4 of 4 samples \(an eps"):
        sample(guided, s, shape=(2,), n=4, steps=5, progress=False)

"""Noise tilt for deterministic one-step generators: closed form and learned from reward values."""

from __future__ import annotations

import pytest
import torch

from tiltgen.core.samplers import sample
from tiltgen.core.schedules import VPCosine
from tiltgen.errors import TiltgenError
from tiltgen.rewards import QuadraticReward
from tiltgen.tilt import GuidedModel, TweedieGuidance
from tiltgen.tilt.learned import TrainConfig, train_guidance

SCHEDULE = VPCosine()
A = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=torch.float64)
B = torch.tensor([0.2, -0.1], dtype=torch.float64)
W = torch.tensor([1.0, -0.5], dtype=torch.float64)
BETA = 2.0


def generator(x_t, t, cond=None):
    """x0 = A x_T + b in one step (an x0-prediction model, deterministic)."""
    return x_t @ A.T.to(x_t.dtype) + B.to(x_t.dtype)


generator.prediction = "x0"


def sigma_max() -> float:
    return float(SCHEDULE.sigma(torch.tensor(SCHEDULE.t_max, dtype=torch.float64)))


def exact_tilted_mean() -> torch.Tensor:
    """p*(x0) ∝ N(x0; b, s^2 A A^T) exp(w.x0 / beta): mean b + s^2 A A^T w / beta."""
    return B + sigma_max() ** 2 * A @ A.T @ W / BETA


class ExactNoiseTilt:
    """log h(x_T) = w.(A x_T + b)/beta is linear: the input shift s^2 A^T w / beta is exact."""

    needs_model_grad = False
    tilts_input = True

    def input_shift(self, x_t, t, cond):
        return (sigma_max() ** 2 * A.T @ W / BETA).to(x_t.dtype).expand_as(x_t)

    def __call__(self, *args):  # pragma: no cover - GuidedModel uses input_shift
        raise AssertionError


def one_step(model, n=20000, seed=0):
    return sample(model, SCHEDULE, shape=(2,), n=n, steps=1, sampler="ddim", seed=seed, progress=False,
                  dtype=torch.float64)


def test_closed_form_noise_tilt_gives_the_exact_tilted_mean_and_covariance():
    base = one_step(generator)
    tilted = one_step(GuidedModel(generator, SCHEDULE, ExactNoiseTilt()))
    torch.testing.assert_close(base.mean(0), B, atol=0.03, rtol=0)
    torch.testing.assert_close(tilted.mean(0), exact_tilted_mean(), atol=0.03, rtol=0)
    # a shift of the Gaussian input keeps the covariance s^2 A A^T of the exact tilted law
    torch.testing.assert_close(torch.cov(tilted.T), sigma_max() ** 2 * A @ A.T, atol=0.05, rtol=0)


def test_tweedie_noise_tilt_is_the_exact_input_shift_for_a_linear_generator():
    """For x0 = A x_T + b and r = w.x0 the plug-in's noise tilt, s^2 grad r(G(x_T)) / beta by
    back-propagation through the generator, is the exact shift s^2 A^T w / beta."""
    tweedie = TweedieGuidance(QuadraticReward.linear(W), BETA, schedule=SCHEDULE, noise_tilt=True,
                              keep_noise_norm=False)  # the shift itself, exact for a log-linear h
    assert tweedie.tilts_input
    ours = one_step(GuidedModel(generator, SCHEDULE, tweedie), n=200)
    exact = one_step(GuidedModel(generator, SCHEDULE, ExactNoiseTilt()), n=200)
    torch.testing.assert_close(ours, exact)


def test_a_noise_tilt_refuses_a_sampler_with_more_than_one_step():
    with pytest.raises(TiltgenError, match="one-step generator's input noise .* also calls the model at t = "):
        sample(GuidedModel(generator, SCHEDULE, ExactNoiseTilt()), SCHEDULE, shape=(2,), n=4, steps=2,
               sampler="ddim", progress=False, dtype=torch.float64)
    with pytest.raises(TiltgenError, match="one or the other"):
        TweedieGuidance(QuadraticReward.linear(W), BETA, schedule=SCHEDULE, noise_tilt=True, damping=True)
    with pytest.raises(TiltgenError, match="shifts the model input"):
        TweedieGuidance(QuadraticReward.linear(W), BETA, schedule=SCHEDULE, noise_tilt=True)(
            torch.zeros(1, 2), torch.ones(1), None, torch.zeros(1, 2, requires_grad=True))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_noise_tilt_is_the_same_for_every_prediction_kind(prediction):
    from tiltgen.core.conversions import coefficients, from_x0_eps, to_x0_eps

    def model(x_t, t, cond=None):
        c = coefficients(SCHEDULE, t, x_t)
        x0 = generator(x_t, t)
        return from_x0_eps(prediction, x0, (x_t - c.alpha * x0) / c.sigma, c)

    model.prediction = prediction
    tilted = one_step(GuidedModel(model, SCHEDULE, ExactNoiseTilt()), n=200)
    reference = one_step(GuidedModel(generator, SCHEDULE, ExactNoiseTilt()), n=200)
    torch.testing.assert_close(tilted, reference)


@pytest.mark.parametrize("loss", ["logistic", "log-mse"])
def test_learned_noise_tilt_from_reward_values_only(loss):
    reward = QuadraticReward.linear(W)
    config = TrainConfig(beta=BETA, loss=loss, noise_tilt=True, trajectory=True, eta=0.0, sampler="ddim",
                         data_steps=1, steps=300, batch_size=512, n_data=4000, pool_size=4000,
                         data_dtype="float64", seed=1)
    guidance = train_guidance(generator, SCHEDULE, reward, config, shape=(2,), progress=False).guidance
    assert guidance.tilts_input and guidance.keep_noise_norm
    guidance.keep_noise_norm = False  # in 2-D the radius is not concentrated: the shift itself is exact here
    tilted = one_step(GuidedModel(generator, SCHEDULE, guidance), n=8000, seed=5)
    base_mean, exact = B, exact_tilted_mean()
    error = (tilted.mean(0) - exact).norm() / (exact - base_mean).norm()
    assert float(error) < 0.15, f"learned noise tilt misses the exact tilted mean by {float(error):.2f} of the shift"


def test_noise_tilt_config_is_checked():
    with pytest.raises(TiltgenError, match="noise_tilt .* needs trajectory=True"):
        TrainConfig(beta=1.0, noise_tilt=True)
    with pytest.raises(TiltgenError, match="eta=0"):
        TrainConfig(beta=1.0, noise_tilt=True, trajectory=True, eta=1.0)
    # log-mse fits E[log w | x_t]: log h only when the reward is fixed by the state, and is the
    # noise tilt's default loss; an explicit choice is kept
    assert TrainConfig(beta=1.0, noise_tilt=True, trajectory=True, eta=0.0).loss == "log-mse"
    assert TrainConfig(beta=1.0, loss="logistic", noise_tilt=True, trajectory=True, eta=0.0).loss == "logistic"
    assert TrainConfig(beta=1.0).loss == "logistic"
    assert TrainConfig.from_json(TrainConfig(beta=1.0, noise_tilt=True, trajectory=True, eta=0.0).to_json()).loss \
        == "log-mse"
    with pytest.raises(TiltgenError, match="log-mse loss .* noise_tilt"):
        TrainConfig(beta=1.0, loss="log-mse", trajectory=True)


def test_keeping_the_noise_norm_keeps_each_radius_and_the_shifted_direction():
    """keep_noise_norm: the tilted noise is x_T + s rescaled to |x_T|, per sample."""
    tweedie = TweedieGuidance(QuadraticReward.linear(W), BETA, schedule=SCHEDULE, noise_tilt=True)
    assert tweedie.keep_noise_norm  # the default
    seen = {}

    def recording(x_t, t, cond=None):
        seen["input"] = x_t.detach().clone()
        return generator(x_t, t, cond)

    recording.prediction = "x0"
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), SCHEDULE.t_max, dtype=torch.float64)
    GuidedModel(recording, SCHEDULE, tweedie)(x, t)
    kept = seen["input"]
    free = x + sigma_max() ** 2 * (A.T @ W) / BETA
    torch.testing.assert_close(kept.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(kept / kept.norm(dim=1, keepdim=True), free / free.norm(dim=1, keepdim=True))


def test_keeping_the_noise_norm_matches_the_exact_tilts_radius_in_high_dimension():
    """A bounded reward on a 256-D Gaussian input: the exact tilt (self-normalised importance
    sampling of 200 000 base draws) barely moves the noise's radius; the first-order shift by the
    reward's steep gradient moves it far off the base sphere, and keeping the norm restores the
    radius at no cost in reward."""
    dim, beta = 256, 0.05
    direction = torch.zeros(dim, dtype=torch.float64)
    direction[0] = 1.0

    def bounded(x0, cond=None):  # a reward in [0, 1] with a steep slope across x0[0] = 1
        return torch.sigmoid(4 * (x0 @ direction.to(x0.dtype) - 1.0))

    bounded.differentiable = True

    def identity(x_t, t, cond=None):
        return x_t

    identity.prediction = "x0"
    g = torch.Generator().manual_seed(1)
    base = torch.randn(200_000, dim, dtype=torch.float64, generator=g)
    weights = torch.softmax(bounded(base) / beta, 0)
    exact_radius = float((weights * base.norm(dim=1)).sum())
    exact_reward = float((weights * bounded(base)).sum())
    x = torch.randn(2000, dim, dtype=torch.float64, generator=g)
    t = torch.full((2000,), SCHEDULE.t_max, dtype=torch.float64)
    sigma = sigma_max()
    out = {}
    for keep in (False, True):
        tweedie = TweedieGuidance(bounded, beta, schedule=SCHEDULE, noise_tilt=True, keep_noise_norm=keep)
        x0 = GuidedModel(identity, SCHEDULE, tweedie)(x * sigma, t) / sigma  # back to unit-variance noise
        out[keep] = (float(x0.norm(dim=1).mean()), float(bounded(x0).mean()))
    base_radius, base_reward = float(x.norm(dim=1).mean()), float(bounded(x).mean())
    assert abs(exact_radius - base_radius) < 0.2  # the exact tilt barely moves the radius
    assert abs(out[False][0] - exact_radius) > 1.0  # the free shift leaves the sphere
    assert abs(out[True][0] - exact_radius) < 0.2
    # the same reward as the free shift (measured: 0.532 both; base 0.184, exact 0.972)
    assert base_reward + 0.2 < out[True][1] and abs(out[True][1] - out[False][1]) < 0.01 < exact_reward - out[True][1]

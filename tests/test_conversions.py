import itertools

import pytest
import torch

from tiltgen.core import PREDICTIONS, coefficients, convert, from_x0_eps, to_x0_eps
from tiltgen.errors import TiltgenError


def _state(schedule, n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    c = coefficients(schedule, t, x0)
    return x0, eps, t, c.alpha * x0 + c.sigma * eps, c


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_every_kind_recovers_x0_and_eps(schedule, kind):
    x0, eps, t, x_t, c = _state(schedule)
    pred = from_x0_eps(kind, x0, eps, c)
    x0_back, eps_back = to_x0_eps(kind, pred, x_t, c)
    torch.testing.assert_close(x0_back, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_back, eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("a,b", list(itertools.permutations(PREDICTIONS, 2)))
def test_pairwise_round_trip(schedule, a, b):
    x0, eps, t, x_t, c = _state(schedule, seed=1)
    pred_a = from_x0_eps(a, x0, eps, c)
    pred_b = convert(pred_a, a, b, x_t, t, schedule)
    torch.testing.assert_close(pred_b, from_x0_eps(b, x0, eps, c), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(convert(pred_b, b, a, x_t, t, schedule), pred_a, rtol=1e-9, atol=1e-9)


def test_velocity_is_time_derivative_of_the_path(schedule):
    x0, eps, t, _, c = _state(schedule, seed=2)
    h = 1e-6
    path = lambda s: coefficients(schedule, s, x0).alpha * x0 + coefficients(schedule, s, x0).sigma * eps
    numeric = (path(t + h) - path(t - h)) / (2 * h)
    torch.testing.assert_close(from_x0_eps("velocity", x0, eps, c), numeric, rtol=1e-5, atol=1e-6)


def test_rectified_flow_closed_forms():
    from tiltgen.core import RectifiedFlow

    s = RectifiedFlow()
    x0, eps, t, x_t, c = _state(s, seed=3)
    torch.testing.assert_close(from_x0_eps("velocity", x0, eps, c), eps - x0)
    torch.testing.assert_close(convert(eps - x0, "velocity", "x0", x_t, t, s), x0)  # x0 = x - t u


def test_scalar_time_and_image_shapes(schedule):
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = convert(x, "eps", "v", x, 0.5, schedule)
    assert out.shape == x.shape


def test_bad_kind_and_time_shape(schedule):
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(TiltgenError, match="unknown prediction kind 'noise'"):
        convert(x, "noise", "eps", x, 0.5, schedule)
    with pytest.raises(TiltgenError, match="time must be"):
        convert(x, "eps", "x0", x, torch.ones(5), schedule)

"""The image-space oracle's estimators against closed forms."""

import math

import pytest
import torch

from tiltgen.errors import TiltgenError
from tiltgen.eval.oracle import (attribute_tv, effective_sample_size, fraction_of_exact_gain, snis_weights,
                                 tilted_statistics, weighted_histograms)
from tiltgen.world.fidelity import Reading, SeenShape


def test_snis_recovers_the_exact_tilt_of_a_gaussian():
    """p = N(0, 1), r(x) = x: p* ∝ p exp(x / β) = N(1/β, 1), so E*[x] = 1/β and E*[x²] = 1 + 1/β²;
    the ESS of the weights is n exp(-1/β²) in expectation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, generator=g, dtype=torch.float64)
    beta = 2.0
    stats = tilted_statistics("", x, beta, {"x": x, "x2": x ** 2})
    assert stats.tilted["x"] == pytest.approx(1 / beta, abs=0.01)
    assert stats.tilted["x2"] == pytest.approx(1 + 1 / beta ** 2, abs=0.02)
    assert stats.base["x"] == pytest.approx(0.0, abs=0.01)
    assert stats.ess / len(x) == pytest.approx(math.exp(-1 / beta ** 2), rel=0.02)


def test_ess_and_fraction_of_gain():
    assert effective_sample_size(torch.ones(10)) == pytest.approx(10)
    assert effective_sample_size(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1)
    assert snis_weights(torch.tensor([0.0, 0.0]), 0.1).tolist() == [0.5, 0.5]
    assert fraction_of_exact_gain(0.6, 0.4, 0.8) == pytest.approx(0.5)
    assert fraction_of_exact_gain(0.3, 0.4, 0.8) == pytest.approx(-0.25)
    assert fraction_of_exact_gain(0.5, 0.4, 0.4) is None
    with pytest.raises(TiltgenError, match="beta"):
        snis_weights(torch.zeros(3), 0.0)
    with pytest.raises(TiltgenError, match="expected"):
        tilted_statistics("", torch.zeros(3), 1.0, {"gold": torch.zeros(4)})


def _reading(*shapes, background="gray"):
    return Reading(tuple(SeenShape(s, c, "small", p) for s, c, p in shapes), background)


def test_weighted_histograms_and_their_distance():
    readings = [_reading(("circle", "red", "left")), _reading(("square", "blue", "top"), ("ring", "red", "left")),
                _reading(background="white")]
    plain = weighted_histograms(readings)
    assert plain["count"] == pytest.approx({"0": 1 / 3, "1": 1 / 3, "2": 1 / 3})
    assert plain["colour"] == pytest.approx({"blue": 1 / 3, "red": 2 / 3})  # per shape
    tilted = weighted_histograms(readings, torch.tensor([0.0, 1.0, 0.0]))
    assert tilted["count"] == pytest.approx({"0": 0.0, "1": 0.0, "2": 1.0})
    assert tilted["background"] == pytest.approx({"gray": 1.0, "white": 0.0})
    assert attribute_tv(plain, plain) == 0.0
    # count TV 2/3, background 1/3, colour 1/6, shape 1/3, size 0, position 1/6
    assert attribute_tv(plain, tilted) == pytest.approx((2 / 3 + 1 / 3 + 1 / 6 + 1 / 3 + 0 + 1 / 6) / 6)

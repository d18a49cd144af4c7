"""Sample-quality metrics for the analytic benchmark."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import TiltgenError


def _mean_distance(x: Tensor, y: Tensor, exclude_diagonal: bool, chunk: int = 1024) -> float:
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        total += float(torch.cdist(x[start:start + chunk], y).sum())
    pairs = x.shape[0] * y.shape[0] - (x.shape[0] if exclude_diagonal else 0)
    return total / pairs


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistics within samples).

    x [N, d], y [M, d]; flattened if they have more dimensions. Zero in expectation iff the
    distributions agree.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise TiltgenError(f"energy distance needs samples of one dimension, got {x.shape[1]} and {y.shape[1]}")
    if min(x.shape[0], y.shape[0]) < 2:
        raise TiltgenError("energy distance needs at least 2 samples on each side")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        return float("inf")
    return 2 * _mean_distance(x, y, False) - _mean_distance(x, x, True) - _mean_distance(y, y, True)


def energy_floor(draw: Callable[[int], Tensor], n: int, pairs: int = 20, z: float = 1.645) -> float:
    """The level the energy distance between independent exact samples of size n stays below
    95% of the time: ``z`` times the root mean square over ``pairs`` independent pairs.

    ``draw(n)`` returns n fresh exact samples. The U-statistic has mean 0 between exact samples,
    so its RMS estimates its spread; z = 1.645 is the one-sided 95% level of a normal. Unlike an
    empirical quantile of a few pairs (seen below zero on a tight 2-D mixture, which made every
    ED / floor ratio meaningless) it is always positive, and its relative error is about
    1 / sqrt(2 pairs).
    """
    if pairs < 10:
        raise TiltgenError(f"energy_floor needs at least 10 pairs, got {pairs}")
    values = torch.tensor([energy_distance(draw(n), draw(n)) for _ in range(pairs)], dtype=torch.float64)
    return float(z * values.pow(2).mean().sqrt())


def mode_weight_error(responsibilities: Tensor, weights: Tensor) -> float:
    """Total variation between the mean responsibilities of samples and the true weights.

    For exact samples E[p(k | x)] = weights[k], so this is unbiased to zero; it measures
    how much probability mass a sampler puts on each mixture component.
    """
    return 0.5 * float((responsibilities.mean(0) - weights).abs().sum())

"""The analytic benchmark's cases: Gaussian-mixture bases with quadratic rewards.

Each case is closed under tilting, so exact tilted samples, densities and g_t exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends.gaussian_mixture import GaussianMixture, TiltedMixture
from ..core.schedules import RectifiedFlow, Schedule, VPLinear
from ..errors import TiltgenError
from ..rewards.quadratic import QuadraticReward


@dataclass(frozen=True)
class AnalyticCase:
    """A base mixture, a reward and a temperature; ``name`` ends in the beta tag."""

    name: str
    base: GaussianMixture
    reward: QuadraticReward
    beta: float

    @property
    def dim(self) -> int:
        return self.base.dim

    def tilt(self) -> TiltedMixture:
        return self.base.tilt(self.reward, self.beta)


@dataclass(frozen=True)
class Family:
    """A model family of the benchmark: schedule, the base model's output kind, time grid."""

    name: str
    schedule: Schedule
    prediction: str
    spacing: str


FAMILIES: dict[str, Family] = {
    # eps-prediction VP (the Stable Diffusion setting); log-SNR spacing resolves t -> 0
    "vp": Family("vp", VPLinear(), "eps", "logsnr"),
    # velocity-prediction rectified flow (the SD3 / FLUX setting)
    "flow": Family("flow", RectifiedFlow(), "velocity", "uniform"),
}


def ring_mixture(modes: int = 8, radius: float = 4.0, std: float = 0.5) -> GaussianMixture:
    """``modes`` equal isotropic Gaussians on a circle in 2-D."""
    angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    means = radius * torch.stack([angle.cos(), angle.sin()], 1)
    covs = (std**2 * torch.eye(2, dtype=torch.float64)).expand(modes, 2, 2).clone()
    return GaussianMixture(torch.ones(modes, dtype=torch.float64), means, covs)


def anisotropic_mixture(dim: int = 8, seed: int = 1234) -> GaussianMixture:
    """Four unequal components in ``dim`` dimensions with random rotations and eigenvalues 0.05..1."""
    g = torch.Generator().manual_seed(seed)
    k = 4
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * 1.5
    rotations = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(math.log10(0.05), 0, dim, dtype=torch.float64)
    eigen = torch.stack([spectrum[torch.randperm(dim, generator=g)] for _ in range(k)])
    covs = rotations @ torch.diag_embed(eigen) @ rotations.transpose(1, 2)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    return GaussianMixture(torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), means, covs)


def rare_mode_mixture(dim: int = 4, rare_weight: float = 0.05, distance: float = 3.0) -> GaussianMixture:
    """A common mode at 0 and a rare one (weight ``rare_weight``) ``distance`` away along e1,
    both isotropic with std 0.5."""
    means = torch.zeros(2, dim, dtype=torch.float64)
    means[1, 0] = distance
    covs = (0.25 * torch.eye(dim, dtype=torch.float64)).expand(2, dim, dim).clone()
    return GaussianMixture(torch.tensor([1 - rare_weight, rare_weight], dtype=torch.float64), means, covs)


def _cases() -> dict[str, AnalyticCase]:
    ring = ring_mixture()
    linear = QuadraticReward.linear(torch.tensor([1.0, 0.0], dtype=torch.float64), name="linear-x")
    aniso = anisotropic_mixture()
    dim = aniso.dim
    quad = QuadraticReward.centered(0.5 * aniso.means[3], torch.diag(torch.linspace(0.25, 1.0, dim, dtype=torch.float64)),
                                    name="quadratic-aniso")
    # higher dimension: 32-D, a linear reward along the line from the heaviest to the lightest mode
    high = anisotropic_mixture(dim=32, seed=4321)
    direction = high.means[3] - high.means[0]
    high_linear = QuadraticReward.linear(direction / direction.norm(), name="linear-32d")
    # a strong concave quadratic centred outside the ring: the tilt moves the mass far out
    # (at beta = 0.5 the nearest mode's mean goes from radius 4 to 7, six base stds)
    far = QuadraticReward.centered(torch.tensor([10.0, 0.0], dtype=torch.float64),
                                   2.0 * torch.eye(2, dtype=torch.float64), name="quadratic-far")
    # a rare mode (weight 0.05) that the tilt makes dominant at small beta (0.96 at beta = 0.5)
    rare = rare_mode_mixture()
    rare_linear = QuadraticReward.linear(torch.eye(rare.dim, dtype=torch.float64)[0], name="linear-e1")
    cases = {}
    for beta in (2.0, 0.5):
        tag = f"b{beta:g}"
        for name, base, reward in ((f"ring2d-linear-{tag}", ring, linear),
                                   (f"aniso{dim}d-quadratic-{tag}", aniso, quad),
                                   (f"aniso32d-linear-{tag}", high, high_linear),
                                   (f"ring2d-farquad-{tag}", ring, far),
                                   (f"raremode4d-linear-{tag}", rare, rare_linear)):
            cases[name] = AnalyticCase(name, base, reward, beta)
    return cases


CASES: dict[str, AnalyticCase] = _cases()


def get_case(name: str) -> AnalyticCase:
    if name not in CASES:
        raise TiltgenError(f"unknown case {name!r}; choose one of: {', '.join(CASES)}")
    return CASES[name]

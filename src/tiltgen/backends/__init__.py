"""Backends: adapters presenting models in the canonical convention."""

from .gaussian_mixture import GaussianMixture, MixtureModel, MixtureTiltOracle, TiltedMixture

__all__ = ["GaussianMixture", "MixtureModel", "MixtureTiltOracle", "TiltedMixture"]

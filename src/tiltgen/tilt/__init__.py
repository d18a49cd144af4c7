"""The reward-tilted target: the decomposition and the guidance estimators."""

from .base import GuidanceEstimator, GuidedModel
from .decomposition import Tilt, apply_tilt, g_from_x0_shift, guide_prediction, x0_shift_from_g
from .exact import ExactGuidance, TiltOracle
from .tweedie import TweedieGuidance

__all__ = ["GuidanceEstimator", "GuidedModel", "Tilt", "apply_tilt", "g_from_x0_shift", "guide_prediction",
           "x0_shift_from_g", "ExactGuidance", "TiltOracle", "TweedieGuidance"]

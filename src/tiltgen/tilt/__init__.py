"""The reward-tilted target: the decomposition and the guidance estimators."""

from .base import GuidanceEstimator, GuidedModel
from .decomposition import Tilt, apply_tilt, g_from_x0_shift, guide_prediction, x0_shift_from_g
from .exact import ExactGuidance, TiltOracle
from .tweedie import TweedieGuidance

__all__ = ["GuidanceEstimator", "GuidedModel", "Tilt", "apply_tilt", "g_from_x0_shift", "guide_prediction",
           "x0_shift_from_g", "ExactGuidance", "TiltOracle", "TweedieGuidance"]

from .learned import LearnedGuidance, TrainConfig, load_guidance, train_guidance  # noqa: E402

__all__ += ["LearnedGuidance", "TrainConfig", "load_guidance", "train_guidance"]

from .particles import ParticleResult, best_of_n, smc_sample  # noqa: E402  (issue 4)
from .training_free import TrainingFreeGuidance  # noqa: E402  (issue 4)
from .bank import SampleBank  # noqa: E402

__all__ += ["ParticleResult", "best_of_n", "smc_sample", "TrainingFreeGuidance", "SampleBank"]

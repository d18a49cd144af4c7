"""tiltgen: sample pretrained diffusion and flow models from the reward-tilted distribution
p*(x | c) ∝ p(x | c) exp(r(x, c) / beta) without fine-tuning them."""

from .core import (PREDICTIONS, DiscreteVP, RectifiedFlow, Schedule, VPCosine, VPLinear, as_model, as_reward,
                   convert, sample)
from .errors import TiltgenError
from .guiding import GuidedPipeline, guide
from .tilt import ExactGuidance, GuidedModel, Tilt, TweedieGuidance

__version__ = "0.1.0"

__all__ = ["PREDICTIONS", "DiscreteVP", "RectifiedFlow", "Schedule", "VPCosine", "VPLinear", "as_model",
           "as_reward", "convert", "sample", "TiltgenError", "ExactGuidance", "GuidedModel", "Tilt",
           "TweedieGuidance", "GuidedPipeline", "guide", "__version__"]

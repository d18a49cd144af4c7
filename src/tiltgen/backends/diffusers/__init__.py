"""diffusers pipelines (SD, SD-Turbo, SDXL, SDXL-Turbo, SD3/3.5, FLUX) as canonical tiltgen models.

Needs the optional dependencies (``pip install 'tiltgen[diffusers]'``); importing this package
does not import diffusers or transformers — they load when a pipeline is loaded or wrapped.
"""

from .backend import DiffusersBackend, LatentModel, LatentReward, PromptCondition, SampleOutput
from .loading import SUPPORTED_PIPELINES, hf_cache_dir, load_pipeline, resolve_model_path

__all__ = ["DiffusersBackend", "LatentModel", "LatentReward", "PromptCondition", "SampleOutput",
           "SUPPORTED_PIPELINES", "hf_cache_dir", "load_pipeline", "resolve_model_path"]

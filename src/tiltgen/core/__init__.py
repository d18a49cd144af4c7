"""Canonical core: schedules, prediction conversions, samplers, seeding."""

from .conversions import PREDICTIONS, Coefficients, coefficients, convert, from_x0_eps, to_x0_eps
from .model import CallableModel, CountingModel, Denoiser, Model, as_model
from .reward import CountingReward, Reward, as_reward, evaluate_reward, reward_name
from .noise import SeededNoise, seeds_for
from .samplers import SAMPLERS, StepInfo, evals_per_sample, sample, time_grid
from .schedules import (DiscreteVP, RectifiedFlow, Schedule, VPCosine, VPLinear, ddpm_betas,
                        schedule_from_config)

__all__ = [
    "PREDICTIONS", "Coefficients", "coefficients", "convert", "from_x0_eps", "to_x0_eps",
    "CountingReward", "Reward", "as_reward", "evaluate_reward", "reward_name", "CallableModel", "CountingModel", "Denoiser", "Model", "as_model", "SeededNoise", "seeds_for",
    "SAMPLERS", "StepInfo", "evals_per_sample", "sample", "time_grid", "DiscreteVP", "RectifiedFlow",
    "Schedule", "VPCosine", "VPLinear", "ddpm_betas", "schedule_from_config",
]

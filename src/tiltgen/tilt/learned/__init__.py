"""Learned guidance (DESIGN.md §2, estimator 3): a network q_psi(x_t, t, c) ~ h_t / Z trained on
samples of the pretrained model; its x0 shift guides any model family. docs/learned-guidance.md."""

from .calibrate import CalibrationConfig, calibrate_scale, choose_scale, tilted_means
from .data import GuidanceData, Pool, build_pool, generate_data
from .losses import LOSSES, consistency_loss, tilt_loss
from .networks import ConvConfig, MLPConfig, PotentialConvNet, PotentialMLP, build_network
from .potential import GuidancePotential, LearnedGuidance
from .train import TrainConfig, TrainResult, load_guidance, plot_losses, train_guidance
from .pretrained import (check_base_model, from_pretrained, model_card, prompt_encoder, resolve_guidance_path,
                         save_pretrained)
from .anneal import next_lambda, train_annealed

__all__ = ["CalibrationConfig", "calibrate_scale", "choose_scale", "tilted_means", "GuidanceData", "Pool", "build_pool", "generate_data", "LOSSES", "consistency_loss", "tilt_loss",
           "ConvConfig", "MLPConfig", "PotentialConvNet", "PotentialMLP", "build_network", "GuidancePotential",
           "LearnedGuidance", "TrainConfig", "TrainResult", "load_guidance", "plot_losses", "train_guidance",
           "next_lambda", "train_annealed",
           "check_base_model", "prompt_encoder", "from_pretrained", "model_card", "resolve_guidance_path", "save_pretrained"]

"""Fine-tuning baselines, from the same base model, reward and data as guidance:
reward-weighted DSM (``rwdsm``), reward backpropagation through the sampler (``draft``) and
Diffusion-DPO (``dpo``). Each reads a diffusers pipeline folder and writes one."""

from .config import METHODS, FinetuneConfig
from .data import BasePool, base_pool
from .train import finetune
from .weights import TrainableDenoiser, write_pipeline

__all__ = ["METHODS", "FinetuneConfig", "BasePool", "base_pool", "finetune", "TrainableDenoiser", "write_pipeline"]

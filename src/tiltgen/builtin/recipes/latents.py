"""Training data of the latent denoisers: world images encoded once by the VAE, with their
scenes, and training captions drawn afresh every step."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...world import Scene, partial_caption
from .common import as_float, cached, weights_fingerprint, world_bank


def latent_bank(vae: Any, n: int, seed: int, chunk: int = 1024) -> dict[str, Any]:
    """{"mean", "std": [n, 4, 8, 8] posterior moments (unscaled), "scenes": [n] Scene} of ``n``
    world images (held-out pairs excluded) of the stream ``seed``. Cached per VAE."""
    def build() -> dict[str, Any]:
        bank = world_bank(n, seed)
        means, stds = [], []
        with torch.no_grad():
            for i in tqdm(range(0, n, chunk), desc="encode latents", dynamic_ncols=True):
                dist = vae.encode(as_float(bank["images"][i:i + chunk]) * 2 - 1).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        return {"mean": torch.cat(means), "std": torch.cat(stds), "scenes": bank["scenes"]}

    return cached("latent-bank", {"n": n, "seed": seed, "vae": weights_fingerprint(vae), "version": 1}, build)


DATA_VAR_IMAGES = 8192
DATA_VAR_SEED = 97


def latent_channel_variance(vae: Any, n: int = DATA_VAR_IMAGES, seed: int = DATA_VAR_SEED) -> list[float]:
    """Per-channel variance of the model-space latents ((z - shift) * scale, z a VAE posterior
    sample) of ``n`` world images: ``data_var`` of the generator's ``tiltgen.json``, the prior of
    training-free guidance's proxy posterior (docs/training-free-guidance.md)."""
    scale, shift = float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)
    bank = latent_bank(vae, n, seed)
    latents = sample_latents(bank, torch.arange(n), scale, torch.Generator().manual_seed(seed)) - shift * scale
    return [round(float(v), 4) for v in latents.double().var(dim=(0, 2, 3))]


def sample_latents(bank: dict[str, Any], idx: Tensor, scale: float, g: torch.Generator) -> Tensor:
    """Posterior samples of the bank's latents ``idx``, times the VAE's scaling factor."""
    mean, std = bank["mean"][idx], bank["std"][idx]
    return (mean + std * torch.randn(mean.shape, generator=g)) * scale


def training_captions(scenes: Sequence[Scene], seed: int, step: int) -> list[str]:
    """One training caption (attributes dropped at random) per scene, seeded by (seed, step)."""
    g = np.random.default_rng(np.random.SeedSequence([seed, step, 7]))
    return [partial_caption(s, g) for s in scenes]


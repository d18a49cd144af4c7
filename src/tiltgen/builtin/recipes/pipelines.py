"""The built-in generators as real diffusers pipelines: component configs, schedulers, and
writing a complete pipeline folder (``save_pretrained``) with its README and ``tiltgen.json``.

Denoiser and VAE weights are saved in float16 (diffusers loads them as float32); the text
encoders, a few hundred kB, in float32, so a plain ``DiffusionPipeline.from_pretrained(folder)``
gets one dtype throughout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...world import WORDS
from .text import CLIP_MAX_LENGTH, T5_MAX_LENGTH

SD_TEXT_DIM = 64
SD3_CLIP_DIM = 32
SD3_T5_DIM = 64


def sd_unet_config() -> dict:
    """The SD-like UNet on 8x8x4 latents: three resolutions (8, 4, 2), cross-attention at 8 and 4."""
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96, 96),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=SD_TEXT_DIM, attention_head_dim=4, norm_num_groups=16)


def sd_scheduler():
    """DDIM over a cosine ("squaredcos_cap_v2") schedule, v-prediction, trailing spacing (the
    first step starts from pure noise, which one-step generators need)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1)


def sd3_transformer_config(patch_size: int = 2) -> dict:
    """The SD3-like MMDiT on 8x8x4 latents, 4 joint blocks: patch 2 gives 16 image tokens (as SD3),
    patch 1 gives 64 with the same parameters and about 4x the compute per image."""
    if patch_size not in (1, 2):
        raise ValueError(f"patch_size must be 1 or 2 for 8x8 latents, got {patch_size}")
    return dict(sample_size=8, patch_size=patch_size, in_channels=4, out_channels=4, num_layers=4,
                attention_head_dim=32, num_attention_heads=3, joint_attention_dim=SD3_T5_DIM,
                caption_projection_dim=96, pooled_projection_dim=2 * SD3_CLIP_DIM, pos_embed_max_size=8 // patch_size)


def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def save_sd_pipeline(out: Path, *, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=_half(vae), unet=_half(unet), text_encoder=text_encoder.float(),
                                   tokenizer=tokenizer, scheduler=sd_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)


def save_sd3_pipeline(out: Path, *, vae: Any, transformer: Any, text_encoders: tuple[Any, Any, Any],
                      tokenizers: tuple[Any, Any, Any]) -> None:
    from diffusers import StableDiffusion3Pipeline

    vae = _half(vae)
    if vae.config.shift_factor is None:  # the SD3 pipeline adds it when decoding
        vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=_half(transformer), scheduler=sd3_scheduler(), vae=vae,
                                    text_encoder=text_encoders[0].float(), tokenizer=tokenizers[0],
                                    text_encoder_2=text_encoders[1].float(), tokenizer_2=tokenizers[1],
                                    text_encoder_3=text_encoders[2].float(), tokenizer_3=tokenizers[2])
    pipe.save_pretrained(str(out), safe_serialization=True)


def _half(module: Any) -> Any:
    import copy

    return copy.deepcopy(module).to(torch.float16)


def write_info(out: Path, info: dict[str, Any]) -> None:
    """``tiltgen.json``: what tiltgen needs to know beyond the pipeline (defaults, vocabulary)."""
    info = {"kind": "generator", "vocabulary": list(WORDS), "clip_max_length": CLIP_MAX_LENGTH, **info}
    if info.get("family") == "flow":
        info.setdefault("max_sequence_length", T5_MAX_LENGTH)
    (out / "tiltgen.json").write_text(json.dumps(info, indent=2) + "\n")


def load_vae(path: str | Path) -> Any:
    from diffusers import AutoencoderKL

    from ...builtin import resolve_weights

    folder = resolve_weights(path, "VAE")
    if (folder / "vae").is_dir():  # a pipeline folder: take its autoencoder
        folder = folder / "vae"
    return AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval().requires_grad_(False)

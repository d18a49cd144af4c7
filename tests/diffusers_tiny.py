"""Tiny random diffusers pipelines built from configs (no hub, no weights), for the backend tests.

Every builder seeds torch before creating modules, so the same call gives the same weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz"


def clip_tokenizer(max_length: int = 8):
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 8):
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in CHARS] + [("\u2581", -1.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text_config(hidden: int = 16, projection: int = 16, vocab: int = 54):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=24, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=projection,
                          bos_token_id=52, eos_token_id=53, pad_token_id=53)


def tiny_vae(latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    kwargs = dict(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=latent_channels,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, layers_per_block=1, sample_size=16)
    if flow:
        kwargs.update(scaling_factor=1.5, shift_factor=0.06, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(**kwargs)


def tiny_sd(scheduler: str = "ddim", prediction_type: str = "epsilon", seed: int = 0):
    """A Stable-Diffusion-1.x/2.x-shaped pipeline; ``scheduler``: ddim, euler, euler-trailing."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(clip_text_config())
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type)
    if scheduler == "ddim":
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **common)
    elif scheduler == "euler":
        sched = EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1, **common)
    elif scheduler == "euler-trailing":
        sched = EulerDiscreteScheduler(timestep_spacing="trailing", steps_offset=1, **common)
    else:
        raise ValueError(scheduler)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(seed: int = 0):
    """An SDXL(-Turbo)-shaped pipeline: two text encoders, text_time added conditioning, Euler trailing."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4,
                                transformer_layers_per_block=1, use_linear_projection=True)
    vae = tiny_vae()
    te1 = CLIPTextModel(clip_text_config())
    te2 = CLIPTextModelWithProjection(clip_text_config())
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="trailing", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(), unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(seed: int = 0, shift: float = 3.0):
    """An SD3-shaped pipeline (two CLIP encoders, no T5 — as SD3 allows) with flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=16)
    vae = tiny_vae(flow=True)
    te1 = CLIPTextModelWithProjection(clip_text_config())
    te2 = CLIPTextModelWithProjection(clip_text_config())
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=te1,
                                    tokenizer=clip_tokenizer(), text_encoder_2=te2, tokenizer_2=clip_tokenizer(),
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """A FLUX-shaped pipeline: CLIP + T5 encoders, packed latents, dynamic shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    vae = tiny_vae(flow=True)
    te1 = CLIPTextModel(clip_text_config())
    te2 = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_ff=24, d_kv=8, num_layers=1, num_heads=2,
                                  relative_attention_num_buckets=8, decoder_start_token_id=0))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=16, max_image_seq_len=256)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=te1, tokenizer=clip_tokenizer(), text_encoder_2=te2,
                        tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe

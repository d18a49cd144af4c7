"""ImageReward (Xu et al. 2023) on transformers' BLIP modules, loaded from the published ImageReward.pt.

The score follows ImageReward's ``score``: BLIP ViT-L image tokens are the cross-attention
context of the BERT text encoder run on the prompt (max 35 tokens); the [CLS] feature goes
through the MLP head and is standardised with the published mean / std. The checkpoint's
keys (``blip.visual_encoder`` timm ViT, ``blip.text_encoder`` BERT, ``mlp.layers``) are converted
on load (:func:`tiltgen.rewards.checkpoints.image_reward_to_hf`). The tokenizer is
bert-base-uncased with BLIP's added ``[DEC]`` / ``[ENC]`` tokens (vocabulary 30524): give a
local folder holding it (``tokenizer=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import TiltgenError
from .checkpoints import image_reward_to_hf, load_strict, read_state_dict
from .clip_rewards import AestheticMLP, preprocess, prompts_for, resolve_local
from .registry import register_reward

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072


def image_reward_configs(**overrides: Any) -> tuple[Any, Any]:
    """(BlipVisionConfig, BlipTextConfig) of ImageReward's BLIP (ViT-L/16 at 224, BERT-base)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
    text = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=512, encoder_hidden_size=1024, layer_norm_eps=1e-12,
                hidden_act="gelu")
    vision.update(overrides.get("vision", {}))
    text.update(overrides.get("text", {}))
    return BlipVisionConfig(**vision), BlipTextConfig(**text)


class ImageRewardModel(nn.Module):
    """BLIP vision + text encoders and the MLP head; ``forward(pixels, input_ids, attention_mask)``."""

    def __init__(self, vision_config: Any, text_config: Any, head_hidden: tuple[int, ...] = (1024, 128, 64, 16)):
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticMLP(text_config.hidden_size, head_hidden)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, return_dict=True)
        return self.head(out.last_hidden_state[:, 0, :].float()).squeeze(-1)


class ImageReward(nn.Module):
    """Standardised ImageReward score of N (image, prompt) pairs. Differentiable."""

    differentiable = True
    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer: Any, max_length: int = 35):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, tokenizer: str | Path, **config_overrides: Any) -> "ImageReward":
        from transformers import AutoTokenizer

        vision, text = image_reward_configs(**config_overrides)
        model = ImageRewardModel(vision, text)
        load_strict(model, image_reward_to_hf(read_state_dict(checkpoint)), f"ImageReward checkpoint {checkpoint}")
        path = resolve_local(tokenizer, "reward 'imagereward' (tokenizer)")
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise TiltgenError(f"reward 'imagereward': cannot load the tokenizer from {path}: {error}") from None
        if len(tok) < text.vocab_size:  # plain bert-base-uncased: add BLIP's tokens as BLIP does
            tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        return cls(model, tok)

    def forward(self, x0: Tensor, cond: Any = None) -> Tensor:
        prompts = prompts_for(cond, x0.shape[0], self.name)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        size = self.model.vision.config.image_size
        pixels = preprocess(x0, size, dtype=next(self.model.parameters()).dtype).to(device)
        raw = self.model(pixels, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


@register_reward("imagereward")
def _imagereward(checkpoint: str, tokenizer: str = "google-bert/bert-base-uncased") -> ImageReward:
    return ImageReward.from_checkpoint(checkpoint, tokenizer)

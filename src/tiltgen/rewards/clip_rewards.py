"""CLIP-based differentiable rewards on transformers' ``CLIPModel``: CLIP score, PickScore, HPSv2, LAION aesthetic.

Images are NCHW in [0, 1]; preprocessing (resize of the short side, centre crop, CLIP
normalisation) is done with differentiable tensor ops, so gradients reach the pixels.
Prompts come as one string per image (N matched pairs). Weights are read from local paths
or the local Hugging Face cache only; transformers is imported when a reward is built.

* ``clipscore``  ``scale * cos(image, text)`` with any CLIP (default scale 100, like CLIPScore
  without the clamp at 0, which would kill gradients).
* ``pickscore``  PickScore_v1 (a CLIP-H/14 in transformers layout): ``logit_scale.exp() * cos``.
* ``hpsv2``      HPSv2 / HPSv2.1: an open_clip ViT-H/14 checkpoint converted on load into a
  transformers CLIP-H/14 whose config and tokenizer come from ``clip`` (e.g. a local copy of
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K); score ``cos(image, text)`` as hpsv2 reports it.
* ``aesthetic``  LAION improved aesthetic predictor: CLIP ViT-L/14 image embedding, L2-normalised,
  through the linear MLP (``layers.{0,2,4,6,7}``) of sac+logos+ava1-l14-linearMSE.pth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TiltgenError
from ..hub import cached_snapshot, hf_cache_dir, looks_like_model_id
from .checkpoints import load_strict, open_clip_to_hf, read_state_dict
from .registry import register_reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_local(name_or_path: str | Path, what: str) -> Path:
    """A local folder, or a model id resolved in the local Hugging Face cache (never downloaded)."""
    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if looks_like_model_id(name):
        try:
            return cached_snapshot(name)
        except LookupError:
            raise TiltgenError(f"{what}: {name!r} is neither a local path nor in the local Hugging Face cache "
                               f"({hf_cache_dir()}); download it first (huggingface-cli download {name})") from None
    raise TiltgenError(f"{what}: path {path} does not exist")


def prompts_for(cond: Any, n: int, what: str) -> list[str]:
    """The N prompts matched with N images (a single string is repeated)."""
    prompts = getattr(cond, "prompts", cond)
    if isinstance(prompts, str):
        return [prompts] * n
    if prompts is None:
        raise TiltgenError(f"reward {what!r} scores (image, prompt) pairs; no prompts were given")
    prompts = [str(p) for p in prompts]
    if len(prompts) != n:
        raise TiltgenError(f"reward {what!r}: {n} images but {len(prompts)} prompts (need N matched pairs)")
    return prompts


def preprocess(images: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               dtype: torch.dtype | None = None) -> Tensor:
    """Differentiable CLIP preprocessing: bicubic resize of the short side, centre crop, normalise."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise TiltgenError(f"image rewards need RGB images [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    return x if dtype is None else x.to(dtype)


def _processor_settings(path: Path) -> tuple[int, tuple, tuple]:
    import json

    for name in ("preprocessor_config.json", "processor_config.json"):
        f = path / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            cfg = cfg.get("image_processor", cfg)
            crop = cfg.get("crop_size", 224)
            size = crop.get("height", 224) if isinstance(crop, dict) else int(crop)
            return size, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return 0, CLIP_MEAN, CLIP_STD


class ClipReward(nn.Module):
    """Shared machinery: a transformers ``CLIPModel`` and tokenizer, text features cached per prompt.

    ``kind``: ``cos`` (``scale * cos``), ``logit`` (``logit_scale.exp() * cos``).
    """

    differentiable = True

    def __init__(self, model: Any, tokenizer: Any, *, name: str, kind: str = "cos", scale: float = 1.0,
                 image_size: int | None = None, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.kind = kind
        self.scale = float(scale)
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self._text_cache: dict[str, Tensor] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, name: str, dtype: torch.dtype | None = None,
                        **kwargs: Any) -> "ClipReward":
        from transformers import AutoTokenizer, CLIPModel

        path = resolve_local(name_or_path, f"reward {name!r}")
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise TiltgenError(f"reward {name!r}: cannot load a CLIP model and tokenizer from {path}: {error}") from None
        size, mean, std = _processor_settings(path)
        return cls(model, tokenizer, name=name, image_size=size or None, mean=mean, std=std, **kwargs)

    def text_features(self, prompts: list[str]) -> Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            max_len = self.model.config.text_config.max_position_embeddings
            tokens = self.tokenizer(todo, padding="max_length", truncation=True, max_length=max_len,
                                    return_tensors="pt").to(self.model.device)
            with torch.no_grad():
                feats = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                     attention_mask=tokens.get("attention_mask"))
            feats = getattr(feats, "pooler_output", feats)
            for p, f in zip(todo, F.normalize(feats.float(), dim=-1)):
                self._text_cache[p] = f
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_features(self, images: Tensor) -> Tensor:
        pixels = preprocess(images, self.image_size, self.mean, self.std, dtype=self.model.dtype)
        feats = self.model.get_image_features(pixel_values=pixels.to(self.model.device))
        feats = getattr(feats, "pooler_output", feats)
        return F.normalize(feats.float(), dim=-1)

    def forward(self, x0: Tensor, cond: Any = None) -> Tensor:
        prompts = prompts_for(cond, x0.shape[0], self.name)
        cos = (self.image_features(x0) * self.text_features(prompts).to(x0.device)).sum(-1)
        if self.kind == "logit":
            return self.model.logit_scale.exp().float() * cos
        return self.scale * cos


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic head: Linear/Dropout stack, no nonlinearity (keys layers.0..7)."""

    def __init__(self, dim: int = 768, hidden: Sequence[int] = (1024, 128, 64, 16)):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.layers = nn.Sequential(nn.Linear(dim, h1), nn.Dropout(0.2), nn.Linear(h1, h2), nn.Dropout(0.2),
                                    nn.Linear(h2, h3), nn.Dropout(0.1), nn.Linear(h3, h4), nn.Linear(h4, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AestheticReward(nn.Module):
    """LAION aesthetic score (about 1..10) of each image; prompts are ignored. Differentiable."""

    differentiable = True
    name = "aesthetic"

    def __init__(self, clip: Any, head: AestheticMLP, image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.image_size = int(image_size or clip.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_pretrained(cls, clip: str | Path, head: str | Path, dtype: torch.dtype | None = None) -> "AestheticReward":
        from transformers import CLIPModel

        path = resolve_local(clip, "reward 'aesthetic' (clip)")
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as error:
            raise TiltgenError(f"reward 'aesthetic': cannot load CLIP from {path}: {error}") from None
        mlp = AestheticMLP(model.config.projection_dim)
        load_strict(mlp, read_state_dict(head), f"aesthetic head {head}")
        size, mean, std = _processor_settings(path)
        return cls(model, mlp.to(model.device), size or None, mean, std)

    def forward(self, x0: Tensor, cond: Any = None) -> Tensor:
        pixels = preprocess(x0, self.image_size, self.mean, self.std, dtype=self.clip.dtype).to(self.clip.device)
        feats = self.clip.get_image_features(pixel_values=pixels)
        feats = F.normalize(getattr(feats, "pooler_output", feats).float(), dim=-1)
        return self.head(feats.to(next(self.head.parameters()).dtype)).float().squeeze(-1)


def load_hpsv2(checkpoint: str | Path, clip: str | Path, dtype: torch.dtype | None = None) -> ClipReward:
    """HPSv2 / HPSv2.1: open_clip checkpoint -> transformers CLIP with ``clip``'s config and tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    path = resolve_local(clip, "reward 'hpsv2' (clip config/tokenizer)")
    try:
        config = CLIPConfig.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise TiltgenError(f"reward 'hpsv2': cannot read a CLIP config and tokenizer from {path}: {error}") from None
    model = CLIPModel(config)
    load_strict(model, open_clip_to_hf(read_state_dict(checkpoint)), f"HPSv2 checkpoint {checkpoint}")
    if dtype is not None:
        model = model.to(dtype)
    size, mean, std = _processor_settings(path)
    return ClipReward(model, tokenizer, name="hpsv2", kind="cos", image_size=size or None, mean=mean, std=std)


@register_reward("clipscore")
def _clipscore(model: str = "openai/clip-vit-large-patch14", scale: float = 100.0) -> ClipReward:
    return ClipReward.from_pretrained(model, name="clipscore", kind="cos", scale=scale)


@register_reward("pickscore")
def _pickscore(model: str = "yuvalkirstain/PickScore_v1", processor: str | None = None) -> ClipReward:
    reward = ClipReward.from_pretrained(model, name="pickscore", kind="logit")
    if processor is not None:  # PickScore's tokenizer/processor live in laion/CLIP-ViT-H-14-laion2B-s32B-b79K
        from transformers import AutoTokenizer

        reward.tokenizer = AutoTokenizer.from_pretrained(str(resolve_local(processor, "pickscore processor")),
                                                         local_files_only=True)
    return reward


@register_reward("hpsv2")
def _hpsv2(checkpoint: str, clip: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K") -> ClipReward:
    return load_hpsv2(checkpoint, clip)


@register_reward("aesthetic")
def _aesthetic(head: str, clip: str = "openai/clip-vit-large-patch14") -> AestheticReward:
    return AestheticReward.from_pretrained(clip, head)

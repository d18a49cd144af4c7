"""Simple image rewards: brightness, saturation (differentiable) and JPEG compressibility (not).

Images are NCHW in [0, 1] with 3 (RGB) or 1 channels; prompts are ignored.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import Tensor

from ..errors import TiltgenError
from .registry import register_reward

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _check_images(x: Tensor, name: str) -> Tensor:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise TiltgenError(f"reward {name!r} needs images [N, 3 or 1, H, W] in [0, 1], got shape {tuple(x.shape)}")
    return x


class Brightness:
    """Mean luma (BT.601) of the image, in [0, 1]. Differentiable."""

    differentiable = True
    name = "brightness"

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        x = _check_images(x0, self.name)
        if x.shape[1] == 1:
            return x.mean(dim=(1, 2, 3))
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1).mean(dim=(1, 2))


class Saturation:
    """Mean HSV-style saturation (max - min) / (max + eps) over pixels, in [0, 1]. Differentiable.

    ``soft`` > 0 replaces max/min by a log-sum-exp with that temperature so every channel gets
    gradient (the hard max/min pass gradient to one channel per pixel).
    """

    differentiable = True
    name = "saturation"

    def __init__(self, soft: float = 0.0, eps: float = 1e-3):
        self.soft = float(soft)
        self.eps = float(eps)

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        x = _check_images(x0, self.name)
        if x.shape[1] != 3:
            raise TiltgenError("reward 'saturation' needs RGB images")
        if self.soft > 0:
            hi = self.soft * torch.logsumexp(x / self.soft, dim=1) - self.soft * torch.log(torch.tensor(3.0))
            lo = -self.soft * torch.logsumexp(-x / self.soft, dim=1) + self.soft * torch.log(torch.tensor(3.0))
        else:
            hi, lo = x.amax(1), x.amin(1)
        return ((hi - lo) / (hi + self.eps)).mean(dim=(1, 2))


class JpegCompressibility:
    """Negative JPEG file size in kB at ``quality`` (DDPO's compressibility reward). Not differentiable."""

    differentiable = False
    name = "jpeg"

    def __init__(self, quality: int = 95):
        if not 1 <= int(quality) <= 100:
            raise TiltgenError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        from PIL import Image

        x = _check_images(x0, self.name).detach()
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for img in arr:
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float32, device=x0.device)


@register_reward("brightness")
def _brightness() -> Brightness:
    return Brightness()


@register_reward("saturation")
def _saturation(soft: float = 0.0) -> Saturation:
    return Saturation(soft=soft)


@register_reward("jpeg")
def _jpeg(quality: int = 95) -> JpegCompressibility:
    return JpegCompressibility(quality=quality)

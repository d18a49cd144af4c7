"""The gold preference of the shapes world: a programmatic, differentiable stand-in for taste.

It scores what captions usually leave free, so two images of one under-specified prompt can
differ a lot in gold (docs/world-rewards.md):

    gold = clean * (0.35 contrast + 0.30 balance + 0.20 prominence + 0.15 colourfulness)   in [0, 1]

* contrast: mean |luma(shape) - luma(background)| over the foreground, tanh(./0.3). Bright
  shapes on dark backgrounds score high; the prior prefers low-contrast pairs, so the best
  ones are rare.
* balance: the foreground's centre of mass near the image centre, exp(-d^2 / (2 0.12^2)): a
  centred shape, or two shapes on opposite sides (a rare layout under the prior).
* prominence: the foreground's area fraction a, tanh(a / 0.09): large shapes, two shapes.
* colourfulness: Hasler & Suesstrunk's M of the (slightly blurred) image, tanh(M / 0.35):
  saturated colours, complementary pairs.
* clean: exp(-(e / 0.08)^2), e = the RMS residual of the background pixels around the
  background plane: 1 for a plain background, ~0.8 for a textured one, ~0 for noise, blotches
  and artefacts (so a cluttered image is not "vivid", it is bad).

The foreground is found from the image alone: the background is the least-squares plane
through the one-pixel border (so gradients are background), and a pixel's foreground weight
rises smoothly from 0 to 1 as its RGB distance from that plane goes from 0.15 to 0.35.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import TiltgenError
from .attributes import LUMA

GOLD_WEIGHTS: dict[str, float] = {"contrast": 0.35, "balance": 0.30, "prominence": 0.20, "colourfulness": 0.15}
CONTRAST_SCALE = 0.3
BALANCE_SIGMA = 0.12
PROMINENCE_SCALE = 0.09
COLOURFULNESS_SCALE = 0.35
FOREGROUND_DIST = (0.15, 0.35)
CLEAN_SCALE = 0.08


def check_images(x0: Any, name: str) -> Tensor:
    """Raise unless ``x0`` is a float tensor [N, 3, H, W] with H, W >= 8."""
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TiltgenError(f"reward {name!r} needs a float image tensor [N, 3, H, W] in [0, 1], "
                           f"got {type(x0).__name__}")
    if x0.ndim != 4 or x0.shape[1] != 3 or x0.shape[0] < 1 or min(x0.shape[-2:]) < 8:
        raise TiltgenError(f"reward {name!r} needs RGB images [N, 3, H, W] (H, W >= 8) in [0, 1], "
                           f"got shape {tuple(x0.shape)}")
    return x0


def compute_dtype(x: Tensor) -> torch.dtype:
    # half-precision inputs are scored in float32 (the eps terms underflow in half)
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _grid(h: int, w: int, x: Tensor) -> tuple[Tensor, Tensor]:
    ys = ((torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h - 0.5).view(h, 1).expand(h, w)
    xs = ((torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w - 0.5).view(1, w).expand(h, w)
    return xs, ys


def background_plane(x: Tensor) -> Tensor:
    """The least-squares plane a + b x + c y through the border pixels, per channel: [N, 3, H, W]."""
    n, c, h, w = x.shape
    xs, ys = _grid(h, w, x)
    border = torch.ones(h, w, dtype=torch.bool, device=x.device)
    border[1:-1, 1:-1] = False
    design = torch.stack([torch.ones_like(xs), xs, ys], -1)          # [H, W, 3]
    a = design[border]                                               # [B, 3]
    solve = torch.linalg.solve(a.T @ a, a.T)                         # [3, B]: the least-squares map
    coef = x[:, :, border] @ solve.T                                 # [N, C, 3]
    return torch.einsum("nck,hwk->nchw", coef, design)


def _smoothstep(t: Tensor) -> Tensor:
    t = t.clamp(0, 1)
    return t * t * (3 - 2 * t)


def foreground(x: Tensor) -> tuple[Tensor, Tensor]:
    """Soft foreground weights [N, H, W] in [0, 1] and the background plane [N, 3, H, W]."""
    bg = background_plane(x)
    dist = ((x - bg) ** 2).sum(1).add(1e-8).sqrt()
    lo, hi = FOREGROUND_DIST
    return _smoothstep((dist - lo) / (hi - lo)), bg


def colourfulness(x: Tensor) -> Tensor:
    """Hasler & Suesstrunk (2003) colourfulness of RGB images [N, 3, H, W] in [0, 1] -> [N]."""
    r, g, b = x.unbind(1)
    rg, yb = r - g, 0.5 * (r + g) - b
    sd = (rg.var(dim=(1, 2), unbiased=False) + yb.var(dim=(1, 2), unbiased=False) + 1e-8).sqrt()
    mu = (rg.mean(dim=(1, 2)) ** 2 + yb.mean(dim=(1, 2)) ** 2 + 1e-8).sqrt()
    return sd + 0.3 * mu


def gold_terms(x0: Tensor) -> dict[str, Tensor]:
    """The gold's terms of images [N, 3, H, W] in [0, 1], each [N] in [0, 1]: the four weighted
    ones and the ``clean`` factor."""
    x = check_images(x0, "world-gold")
    x = x.to(compute_dtype(x)).clamp(0, 1)
    w, bg = foreground(x)
    mass = w.sum(dim=(1, 2))
    h, wd = x.shape[-2:]
    luma = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    dy = ((x - bg) * luma).sum(1).abs()
    # one pixel of prior mass at the centre / on the background keeps empty images finite (and near 0)
    contrast = torch.tanh((w * dy).sum(dim=(1, 2)) / (mass + 1) / CONTRAST_SCALE)
    xs, ys = _grid(h, wd, x)
    cx, cy = (w * xs).sum(dim=(1, 2)) / (mass + 1), (w * ys).sum(dim=(1, 2)) / (mass + 1)
    balance = mass / (mass + 1) * torch.exp(-(cx ** 2 + cy ** 2) / (2 * BALANCE_SIGMA ** 2))
    prominence = torch.tanh(mass / (h * wd) / PROMINENCE_SCALE)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    colour = torch.tanh(colourfulness(blurred) / COLOURFULNESS_SCALE)
    background = 1 - w
    residual = ((x - bg) ** 2).mean(1)
    rms = ((background * residual).sum(dim=(1, 2)) / (background.sum(dim=(1, 2)) + 1) + 1e-8).sqrt()
    clean = torch.exp(-(rms / CLEAN_SCALE) ** 2)
    return {"contrast": contrast, "balance": balance, "prominence": prominence, "colourfulness": colour,
            "clean": clean}


def gold_reward(x0: Tensor) -> Tensor:
    """Gold preference [N] in [0, 1] (module docstring). Differentiable."""
    terms = gold_terms(x0)
    return (terms["clean"] * sum(GOLD_WEIGHTS[k] * terms[k] for k in GOLD_WEIGHTS)).to(x0.dtype)

"""Image perturbations for training the reward networks: light augmentation (so the classifier
reads generated images, which are softer than rendered ones) and the imperfect images the
proxy preference is fitted on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def blur(x: Tensor) -> Tensor:
    """Separable [1, 2, 1]/4 blur with replicate padding, [N, C, H, W] -> same shape."""
    k = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3).expand(c, 1, 1, 3), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1).expand(c, 1, 3, 1), groups=c)


def uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(x: Tensor, g: torch.Generator, max_noise: float = 0.08, p_noise: float = 0.5, p_blur: float = 0.5
            ) -> Tensor:
    """With probability ``p_blur`` a partial blur (one or two passes), with ``p_noise`` pixel
    noise of std ~ U(0, max_noise), and a small per-channel gain; clamped to [0, 1]."""
    n = x.shape[0]
    once = blur(x)
    soft = torch.where(torch.rand(n, generator=g).view(n, 1, 1, 1) < 0.5, once, blur(once))
    alpha = uniform(n, 0.3, 1.0, g) * (torch.rand(n, generator=g) < p_blur)
    x = x + alpha.view(n, 1, 1, 1) * (soft - x)
    x = x * uniform(3 * n, 0.93, 1.07, g).view(n, 3, 1, 1)
    std = uniform(n, 0.0, max_noise, g) * (torch.rand(n, generator=g) < p_noise)
    return (x + std.view(n, 1, 1, 1) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _shift(x: Tensor, dx: Tensor, dy: Tensor, pad: int = 6) -> Tensor:
    n, _, h, w = x.shape
    big = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    out = torch.empty_like(x)
    for i in range(n):
        top, left = pad - int(dy[i]), pad - int(dx[i])
        out[i] = big[i, :, top:top + h, left:left + w]
    return out


PERTURBATIONS: tuple[str, ...] = ("shift", "blend", "erase", "colour", "desaturate", "blur", "noise")


def perturb(x: Tensor, g: torch.Generator, p: float = 0.18) -> Tensor:
    """Imperfect versions of world images, like what generators produce: each of
    :data:`PERTURBATIONS` applies independently with probability ``p`` (about a quarter of the
    images stay clean): a shift of up to 6 pixels, a blend with another image, an erased
    rectangle, per-channel gain/offset, desaturation, blur, pixel noise."""
    n, _, h, w = x.shape
    x = x.clone()

    def pick() -> Tensor:
        return torch.rand(n, generator=g) < p

    def mix(mask: Tensor, new: Tensor) -> None:
        x[mask] = new[mask]

    d = torch.randint(-6, 7, (2, n), generator=g)
    mix(pick(), _shift(x, d[0], d[1]))
    other = x[torch.randperm(n, generator=g)]
    mix(pick(), x + uniform(n, 0.15, 0.5, g).view(n, 1, 1, 1) * (other - x))
    sel = pick()
    erased = x.clone()
    size = torch.randint(4, 14, (2, n), generator=g)
    corner = torch.stack([torch.randint(0, h - 4, (n,), generator=g), torch.randint(0, w - 4, (n,), generator=g)])
    for i in torch.nonzero(sel).flatten().tolist():
        r, c = int(corner[0, i]), int(corner[1, i])
        erased[i, :, r:r + int(size[0, i]), c:c + int(size[1, i])] = x[i, :, 0, 0].view(3, 1, 1)
    mix(sel, erased)
    gain, offset = uniform(3 * n, 0.7, 1.3, g).view(n, 3, 1, 1), uniform(3 * n, -0.12, 0.12, g).view(n, 3, 1, 1)
    mix(pick(), x * gain + offset)
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    mix(pick(), x + uniform(n, 0.3, 1.0, g).view(n, 1, 1, 1) * (luma - x))
    once = blur(x)
    twice = torch.where(torch.rand(n, generator=g).view(n, 1, 1, 1) < 0.5, once, blur(once))
    mix(pick(), x + uniform(n, 0.4, 1.0, g).view(n, 1, 1, 1) * (twice - x))
    mix(pick(), x + uniform(n, 0.02, 0.15, g).view(n, 1, 1, 1) * torch.randn(x.shape, generator=g))
    return x.clamp(0, 1)

"""Rewards of the built-in shapes world (registered as ``world-gold``, ``world-proxy``,
``world-fidelity`` and ``world-fidelity-match``).

* ``world-gold``: the *gold* preference, a programmatic, differentiable stand-in for human
  taste: colourful, centred, contrasting shapes score high (:func:`gold_reward`).
* ``world-proxy``: a learned *proxy* of it (:class:`~tiltgen.world.reward_nets.ProxyPreference`,
  Bradley-Terry on noisy comparisons); guidance can exploit it, and the gold tells when it does.
* ``world-fidelity`` / ``world-fidelity-match``: prompt fidelity read by the attribute classifier
  (:class:`~tiltgen.world.reward_nets.AttributeClassifier`).

Images are ``[N, 3, H, W]`` in [0, 1] (the networks need H = W = 16, the built-in world);
``cond`` is N captions (a single string is repeated). See docs/world-rewards.md.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TiltgenError
from ..rewards.registry import register_reward
from .reward_nets import ATTRIBUTES, CLASSIFIER_KIND, IMAGE_SIZE, PROXY_KIND, load_network
from .shapes import BACKGROUND_NAMES, COLOUR_NAMES, POSITIONS, SHAPES, SIZES, parse_caption

CLASSIFIER_WEIGHTS = "builtin:attribute-classifier"
PROXY_WEIGHTS = "builtin:proxy-preference"

# Gold reward constants (docs/world-rewards.md gives the formula).
GOLD_WEIGHTS: dict[str, float] = {"colourfulness": 0.4, "centring": 0.3, "contrast": 0.3}
COLOURFULNESS_SCALE = 0.3   # tanh(M / 0.3): world images span M ~ 0.05-0.3
FOREGROUND_DIST = (0.1, 0.35)  # RGB distance from the background: 0 below, 1 above (smoothstep)
CENTRING_SIGMA = 0.15       # Gaussian width of the centring score, units of image width
CONTRAST_SCALE = 0.3        # tanh(|dY| / 0.3)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def check_images(x0: Any, name: str, size: int | None = None) -> Tensor:
    """Raise unless ``x0`` is a float tensor [N, 3, H, W] (H = W = ``size`` if given)."""
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TiltgenError(f"reward {name!r} needs a float image tensor [N, 3, H, W] in [0, 1], "
                           f"got {type(x0).__name__}")
    if x0.ndim != 4 or x0.shape[1] != 3 or x0.shape[0] < 1:
        raise TiltgenError(f"reward {name!r} needs RGB images [N, 3, H, W] in [0, 1], got shape {tuple(x0.shape)}")
    if size is not None and tuple(x0.shape[-2:]) != (size, size):
        raise TiltgenError(f"reward {name!r} needs {size}x{size} images (the built-in world), "
                           f"got {x0.shape[-2]}x{x0.shape[-1]}")
    if size is None and min(x0.shape[-2:]) < 4:
        raise TiltgenError(f"reward {name!r} needs images of at least 4x4 pixels, got {tuple(x0.shape[-2:])}")
    return x0


def prompts_for(cond: Any, n: int, name: str) -> list[str]:
    """The N captions matched with N images (a single string is repeated; objects with a
    ``.prompts`` list, like the diffusers backend's conditions, work too)."""
    prompts = getattr(cond, "prompts", cond)
    if isinstance(prompts, str):
        return [prompts] * n
    if prompts is None:
        raise TiltgenError(f"reward {name!r} scores (image, caption) pairs; no captions were given")
    prompts = list(prompts)
    if len(prompts) != n:
        raise TiltgenError(f"reward {name!r}: {n} images but {len(prompts)} captions (need one caption per image)")
    return [str(p) for p in prompts]


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half-precision inputs are scored in float32 (tiny networks, and the eps terms underflow).
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# --------------------------------------------------------------------------------------------
# Gold preference
# --------------------------------------------------------------------------------------------

def _box_blur(x: Tensor) -> Tensor:
    """3x3 mean filter with replicate padding: the scale at which shapes are seen."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _smoothstep(t: Tensor) -> Tensor:
    t = t.clamp(0, 1)
    return t * t * (3 - 2 * t)


def colourfulness(x: Tensor) -> Tensor:
    """Hasler & Süsstrunk (2003) colourfulness M of RGB images [N, 3, H, W] -> [N]:
    ``sqrt(sd(rg)^2 + sd(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)`` with ``rg = R - G``,
    ``yb = (R + G)/2 - B`` on [0, 1] values (so M is 1/255 of the paper's 0-255 scale)."""
    r, g, b = x.unbind(1)
    rg, yb = r - g, 0.5 * (r + g) - b
    sd = (rg.var(dim=(1, 2), unbiased=False) + yb.var(dim=(1, 2), unbiased=False) + 1e-8).sqrt()
    mu = (rg.mean(dim=(1, 2)) ** 2 + yb.mean(dim=(1, 2)) ** 2 + 1e-8).sqrt()
    return sd + 0.3 * mu


def foreground(x: Tensor) -> tuple[Tensor, Tensor]:
    """Soft foreground weights [N, H, W] in [0, 1] and the background colour [N, 3].

    The background is the mean of the one-pixel border; a pixel's weight rises smoothly from 0
    to 1 as its RGB distance from that colour goes from 0.1 to 0.35 (every world colour is at
    least 0.44 from every background). No tails below 0.1, so faint noise is not "foreground".
    """
    h, w = x.shape[-2:]
    border = torch.ones(h, w, dtype=torch.bool, device=x.device)
    border[1:-1, 1:-1] = False
    bg = x[:, :, border].mean(-1)
    dist = ((x - bg[:, :, None, None]) ** 2).sum(1).add(1e-8).sqrt()
    lo, hi = FOREGROUND_DIST
    return _smoothstep((dist - lo) / (hi - lo)), bg


def gold_terms(x0: Tensor) -> dict[str, Tensor]:
    """The three gold terms of images [N, 3, H, W] in [0, 1], each [N] in [0, 1]:
    ``colourfulness``, ``centring`` and ``contrast`` (see :func:`gold_reward`)."""
    x = check_images(x0, "world-gold")
    x = _box_blur(x.to(_compute_dtype(x)))
    colour = torch.tanh(colourfulness(x) / COLOURFULNESS_SCALE)
    w, bg = foreground(x)
    mass = w.sum(dim=(1, 2))
    h, wd = x.shape[-2:]
    ys = ((torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h - 0.5).view(1, h, 1)
    xs = ((torch.arange(wd, device=x.device, dtype=x.dtype) + 0.5) / wd - 0.5).view(1, 1, wd)
    # One pixel of prior mass at the centre/background keeps empty images finite and scoring ~0.
    cx, cy = (w * xs).sum(dim=(1, 2)) / (mass + 1), (w * ys).sum(dim=(1, 2)) / (mass + 1)
    presence = mass / (mass + 1)
    centring = presence * torch.exp(-(cx ** 2 + cy ** 2) / (2 * CENTRING_SIGMA ** 2))
    luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype)
    y, y_bg = (x * luma.view(1, 3, 1, 1)).sum(1), bg @ luma
    dy = (w * (y - y_bg[:, None, None])).sum(dim=(1, 2)) / (mass + 1)
    contrast = torch.tanh((dy ** 2 + 1e-4).sqrt() / CONTRAST_SCALE)
    return {"colourfulness": colour, "centring": centring, "contrast": contrast}


def gold_reward(x0: Tensor) -> Tensor:
    """Gold preference [N] in [0, 1] of images [N, 3, H, W] in [0, 1]:
    ``0.4 colourfulness + 0.3 centring + 0.3 contrast`` (:func:`gold_terms`). Differentiable."""
    terms = gold_terms(x0)
    return sum(GOLD_WEIGHTS[k] * v for k, v in terms.items()).to(x0.dtype)


class WorldGold:
    """The gold preference of the built-in world (prompt-independent; see :func:`gold_reward`)."""

    differentiable = True
    name = "world-gold"

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        return gold_reward(x0)


# --------------------------------------------------------------------------------------------
# Networks, loaded lazily once per weights folder and kept per device/dtype
# --------------------------------------------------------------------------------------------

_NETWORKS: dict[tuple[str, str, str, torch.dtype], nn.Module] = {}


def _resolve(weights: str | Path, what: str) -> Path:
    from ..builtin import resolve_weights  # tiltgen.builtin imports tiltgen.world: import lazily

    return resolve_weights(weights, what).resolve()


def network(kind: str, path: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The network ``kind`` from the folder ``path``, on ``device`` in ``dtype`` (cached)."""
    key = (kind, str(path), str(device), dtype)
    if key not in _NETWORKS:
        base = (kind, str(path), "cpu", torch.float32)
        if base not in _NETWORKS:
            _NETWORKS[base] = load_network(path, kind)
        _NETWORKS[key] = _NETWORKS[base] if key == base else \
            load_network(path, kind).to(device=device, dtype=dtype)
    return _NETWORKS[key]


class _NetReward:
    """Shared plumbing: resolve the weights now (a bad path fails early), load on first use."""

    kind = ""
    default_weights = ""
    name = ""

    def __init__(self, weights: str | Path | None = None):
        self.weights = _resolve(weights or self.default_weights, f"{self.name} weights")

    def net(self, x: Tensor) -> nn.Module:
        return network(self.kind, self.weights, x.device, _compute_dtype(x))


class WorldProxy(_NetReward):
    """Learned proxy of the gold preference: ``scale * f(x) + shift`` [N] (prompt-independent).
    Differentiable; its gradients can be exploited where it departs from the gold."""

    differentiable = True
    name = "world-proxy"
    kind = PROXY_KIND
    default_weights = PROXY_WEIGHTS

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        x = check_images(x0, self.name, IMAGE_SIZE)
        return self.net(x)(x.to(_compute_dtype(x))).to(x0.dtype)


# --------------------------------------------------------------------------------------------
# Prompt fidelity
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def _caption_target(text: str) -> tuple[int, ...]:
    scene = parse_caption(text)
    if len(scene.shapes) != 1:
        raise TiltgenError(f"world fidelity scores one-shape captions (the built-in world has one shape per "
                           f"image), got {len(scene.shapes)} shapes in {text!r}")
    s = scene.shapes[0]
    return (SHAPES.index(s.shape), COLOUR_NAMES.index(s.colour), SIZES.index(s.size),
            POSITIONS.index(s.position), BACKGROUND_NAMES.index(scene.background))


def caption_targets(prompts: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
    """One-shape captions -> class indices LongTensor [N, 5] (shape, colour, size, position,
    background); a caption outside the grammar or with two shapes raises TiltgenError."""
    return torch.tensor([_caption_target(p) for p in prompts], dtype=torch.long, device=device).view(-1, 5)


def attribute_probabilities(x0: Tensor, weights: str | Path = CLASSIFIER_WEIGHTS,
                            name: str = "attribute classifier") -> dict[str, Tensor]:
    """Classifier probabilities {attribute: [N, classes]} of 16x16 images [N, 3, 16, 16]."""
    x = check_images(x0, name, IMAGE_SIZE)
    dtype = _compute_dtype(x)
    net = network(CLASSIFIER_KIND, _resolve(weights, "attribute classifier weights"), x.device, dtype)
    return {k: v.softmax(dim=1) for k, v in net(x.to(dtype)).items()}


def classify(images: Tensor, weights: str | Path = CLASSIFIER_WEIGHTS) -> dict[str, Tensor]:
    """Predicted class index per attribute {attribute: LongTensor [N]} (indices into
    SHAPES, COLOUR_NAMES, SIZES, POSITIONS, BACKGROUND_NAMES)."""
    with torch.no_grad():
        return {k: p.argmax(1) for k, p in attribute_probabilities(images, weights).items()}


def attribute_agreement(images: Tensor, prompts: Sequence[str] | str,
                        weights: str | Path = CLASSIFIER_WEIGHTS) -> dict[str, float]:
    """Fraction of images whose classified attribute equals the caption's, per attribute
    (``shape``, ``colour``, ``size``, ``position``, ``background``) and ``all`` (every one)."""
    x = check_images(images, "attribute_agreement", IMAGE_SIZE)
    targets = caption_targets(prompts_for(prompts, x.shape[0], "attribute_agreement"), x.device)
    pred = torch.stack(list(classify(x, weights).values()), dim=1)
    hit = (pred == targets).float()
    out = {k: float(hit[:, i].mean()) for i, k in enumerate(ATTRIBUTES)}
    out["all"] = float(hit.min(dim=1).values.mean())
    return out


class WorldFidelity(_NetReward):
    """Prompt fidelity [N] in [0, 1]: the classifier's probability of the caption's value,
    averaged over the five attributes. Differentiable."""

    differentiable = True
    name = "world-fidelity"
    kind = CLASSIFIER_KIND
    default_weights = CLASSIFIER_WEIGHTS

    def probabilities(self, x0: Tensor, cond: Any) -> Tensor:
        """Probability of each caption attribute, [N, 5]."""
        x = check_images(x0, self.name, IMAGE_SIZE)
        targets = caption_targets(prompts_for(cond, x.shape[0], self.name), x.device)
        probs = attribute_probabilities(x, self.weights, self.name)
        return torch.stack([p.gather(1, targets[:, i:i + 1]).squeeze(1) for i, p in enumerate(probs.values())], 1)

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        return self.probabilities(x0, cond).mean(dim=1).to(x0.dtype)


class WorldFidelityMatch(_NetReward):
    """1.0 where the classifier's argmax matches the caption on all five attributes, else 0.0.
    Not differentiable."""

    differentiable = False
    name = "world-fidelity-match"
    kind = CLASSIFIER_KIND
    default_weights = CLASSIFIER_WEIGHTS

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        x = check_images(x0, self.name, IMAGE_SIZE)
        targets = caption_targets(prompts_for(cond, x.shape[0], self.name), x.device)
        pred = torch.stack(list(classify(x.detach(), self.weights).values()), dim=1)
        return (pred == targets).all(dim=1).to(x0.dtype)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@register_reward("world-gold")
def _world_gold() -> WorldGold:
    return WorldGold()


@register_reward("world-proxy")
def _world_proxy(weights: str | None = None) -> WorldProxy:
    return WorldProxy(weights)


@register_reward("world-fidelity")
def _world_fidelity(weights: str | None = None) -> WorldFidelity:
    return WorldFidelity(weights)


@register_reward("world-fidelity-match")
def _world_fidelity_match(weights: str | None = None) -> WorldFidelityMatch:
    return WorldFidelityMatch(weights)

"""Rewards of the shapes world, registered in the reward registry on import:

* ``world-gold``: the programmatic gold preference (:mod:`tiltgen.world.gold`); differentiable,
  prompt-independent; it scores what prompts leave free.
* ``world-proxy``: the learned Bradley-Terry proxy of it (:class:`~tiltgen.world.nets.ProxyPreference`);
  differentiable and exploitable, the way real preference models are.
* ``world-fidelity``: P(the image shows what its caption specifies, and only that) from the
  attribute classifier (:func:`~tiltgen.world.fidelity.match_probability`); differentiable.
* ``world-binary``: GenEval-like 0/1 check of the number of shapes and their colours; not
  differentiable.

Images are [N, 3, 32, 32] in [0, 1]; ``cond`` is N captions (one string is repeated; objects
with a ``.prompts`` list, like the diffusers backend's conditions, work too). The reward layer
finds these names through the ``tiltgen.rewards`` entry point (pyproject.toml); it never
imports the world itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..builtin import resolve_weights
from ..errors import TiltgenError
from ..rewards.registry import register_reward
from .captions import parse_caption
from .fidelity import Reading, attribute_hits, binary_check, match_probability, probabilities, read_images
from .gold import check_images, compute_dtype, gold_reward
from .nets import CLASSIFIER_KIND, IMAGE_SIZE, PROXY_KIND, load_network

CLASSIFIER_WEIGHTS = "builtin:attribute-classifier"
PROXY_WEIGHTS = "builtin:proxy-preference"


def check_world_images(x0: Any, name: str) -> Tensor:
    x = check_images(x0, name)
    if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise TiltgenError(f"reward {name!r} needs {IMAGE_SIZE}x{IMAGE_SIZE} images (the built-in world), "
                           f"got {x.shape[-2]}x{x.shape[-1]}")
    return x


def prompts_for(cond: Any, n: int, name: str) -> list[str]:
    """The N captions matched with N images (one string is repeated)."""
    prompts = getattr(cond, "prompts", cond)
    if isinstance(prompts, str):
        return [prompts] * n
    if prompts is None:
        raise TiltgenError(f"reward {name!r} scores (image, caption) pairs; no captions were given")
    prompts = [str(p) for p in prompts]
    if len(prompts) != n:
        raise TiltgenError(f"reward {name!r}: {n} images but {len(prompts)} captions (need one caption per image)")
    return prompts


# --------------------------------------------------------------------------------------------
# Networks: loaded once per folder, kept per device and dtype
# --------------------------------------------------------------------------------------------

_NETWORKS: dict[tuple[str, str, str, torch.dtype], nn.Module] = {}


def network(kind: str, path: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    key = (kind, str(path), str(device), dtype)
    if key not in _NETWORKS:
        _NETWORKS[key] = load_network(path, kind).to(device=device, dtype=dtype)
    return _NETWORKS[key]


class _NetReward:
    """Shared plumbing: resolve the weights now (a bad path fails early), load on first use."""

    kind = ""
    default_weights = ""
    name = ""

    def __init__(self, weights: str | Path | None = None):
        self.weights = resolve_weights(weights or self.default_weights, f"{self.name} weights").resolve()

    def net(self, x: Tensor) -> nn.Module:
        return network(self.kind, self.weights, x.device, compute_dtype(x))


class WorldGold:
    """The gold preference (see :mod:`tiltgen.world.gold`); prompts are ignored."""

    differentiable = True
    name = "world-gold"

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        return gold_reward(check_world_images(x0, self.name))


class WorldProxy(_NetReward):
    """The learned proxy preference [N]; prompts are ignored. Differentiable."""

    differentiable = True
    name = "world-proxy"
    kind = PROXY_KIND
    default_weights = PROXY_WEIGHTS

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        x = check_world_images(x0, self.name)
        return self.net(x)(x.to(compute_dtype(x))).to(x0.dtype)


class AttributeReader(_NetReward):
    """The attribute classifier as a reader of images: probabilities and hard readings."""

    kind = CLASSIFIER_KIND
    default_weights = CLASSIFIER_WEIGHTS
    name = "attribute classifier"

    def probabilities(self, x0: Tensor) -> dict[str, Tensor]:
        x = check_world_images(x0, self.name)
        return probabilities(self.net(x)(x.to(compute_dtype(x))))

    def read(self, x0: Tensor) -> list[Reading]:
        with torch.no_grad():
            return read_images(self.probabilities(x0.detach()))


class WorldFidelity(AttributeReader):
    """P(image shows what its caption specifies) [N] in [0, 1]; 1 for the empty caption."""

    differentiable = True
    name = "world-fidelity"

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        prompts = prompts_for(cond, x0.shape[0], self.name)
        probs = self.probabilities(x0)
        out = torch.empty(x0.shape[0], dtype=probs["occupied"].dtype, device=x0.device)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=x0.device)
            out = out.index_put((rows,), match_probability({k: v[rows] for k, v in probs.items()},
                                                           parse_caption(prompt)))
        return out.to(x0.dtype)


class WorldBinary(AttributeReader):
    """1.0 when the image has the caption's number of shapes and its colours, else 0.0."""

    differentiable = False
    name = "world-binary"

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        prompts = prompts_for(cond, x0.shape[0], self.name)
        hits = binary_check(self.read(x0), prompts)
        return torch.tensor(hits, dtype=x0.dtype, device=x0.device)


def attribute_fidelity(images: Tensor, prompts: Sequence[str] | str,
                       weights: str | Path = CLASSIFIER_WEIGHTS) -> dict[str, Any]:
    """How often the classifier's reading satisfies what each caption specifies.

    Returns ``per_attribute`` {kind: fraction of the images whose caption specifies it that
    satisfy it}, ``fidelity`` (mean over images of the fraction of their specified attributes
    satisfied; None if no caption specifies anything), ``per_image`` (that fraction per image,
    None where the caption specifies nothing), ``all`` (fraction of those images with every
    specified attribute right) and ``readings``.
    """
    reader = AttributeReader(weights)
    prompts = prompts_for(prompts, images.shape[0], "attribute_fidelity")
    readings = reader.read(images)
    hits = attribute_hits(readings, prompts)
    per: dict[str, list[bool]] = {}
    for h in hits:
        for k, v in h.items():
            per.setdefault(k, []).append(v)
    scored = [h for h in hits if h]
    return {"per_attribute": {k: sum(v) / len(v) for k, v in per.items()},
            "fidelity": sum(sum(h.values()) / len(h) for h in scored) / len(scored) if scored else None,
            "per_image": [sum(h.values()) / len(h) if h else None for h in hits],
            "all": sum(all(h.values()) for h in scored) / len(scored) if scored else None,
            "readings": readings}


@register_reward("world-gold")
def _world_gold() -> WorldGold:
    return WorldGold()


@register_reward("world-proxy")
def _world_proxy(weights: str | None = None) -> WorldProxy:
    return WorldProxy(weights)


@register_reward("world-fidelity")
def _world_fidelity(weights: str | None = None) -> WorldFidelity:
    return WorldFidelity(weights)


@register_reward("world-binary")
def _world_binary(weights: str | None = None) -> WorldBinary:
    return WorldBinary(weights)

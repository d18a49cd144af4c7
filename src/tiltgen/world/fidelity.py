"""Prompt fidelity from the attribute classifier: what an image shows, and whether it shows
what its caption specifies.

* :func:`read_images`: the classifier's hard reading of each image (the shapes it sees, by slot,
  and the background), as a :class:`Reading` that :func:`~tiltgen.world.captions.satisfied`
  checks against a caption like a scene.
* :func:`match_probability`: differentiable P(the image shows exactly what the caption says),
  under the classifier's factorised probabilities: a sum over which slots hold the caption's
  objects (exactly that many occupied) of the probabilities of their named attributes.
* :func:`binary_check`: GenEval-like 0/1: the right number of shapes and the right colours.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .attributes import BACKGROUND_NAMES, COLOUR_NAMES, EDGE_POSITIONS, POSITIONS, SHAPES, SIZES
from .captions import CaptionSpec, ObjectSpec, parse_caption, satisfied

_VALUES = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES}


@dataclass(frozen=True)
class SeenShape:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Reading:
    """What the classifier sees in one image (like a Scene, but any number of shapes)."""

    shapes: tuple[SeenShape, ...]
    background: str


def probabilities(logits: dict[str, Tensor]) -> dict[str, Tensor]:
    """Classifier logits -> probabilities (sigmoid for ``occupied``, softmax for the rest)."""
    return {k: v.sigmoid() if k == "occupied" else v.softmax(dim=-1) for k, v in logits.items()}


def read_images(probs: dict[str, Tensor]) -> list[Reading]:
    """Hard readings: occupied slots (p > 0.5) with their most likely attributes."""
    occupied = (probs["occupied"] > 0.5).cpu()
    best = {k: probs[k].argmax(-1).cpu() for k in (*_VALUES, "background")}
    out = []
    for i in range(occupied.shape[0]):
        shapes = tuple(SeenShape(SHAPES[int(best["shape"][i, p])], COLOUR_NAMES[int(best["colour"][i, p])],
                                 SIZES[int(best["size"][i, p])], POSITIONS[p])
                       for p in range(len(POSITIONS)) if occupied[i, p])
        out.append(Reading(shapes, BACKGROUND_NAMES[int(best["background"][i])]))
    return out


def _object_prob(probs: dict[str, Tensor], objects: Sequence[ObjectSpec], slot: int) -> Tensor:
    """P(slot ``slot`` satisfies every object in ``objects``) [N] (0 if they conflict)."""
    n = probs["occupied"].shape[0]
    p = torch.ones(n, dtype=probs["occupied"].dtype, device=probs["occupied"].device)
    for kind, values in _VALUES.items():
        wanted = {getattr(o, kind) for o in objects} - {None}
        if len(wanted) > 1:
            return torch.zeros_like(p)
        if wanted:
            p = p * probs[kind][:, slot, values.index(wanted.pop())]
    positions = {o.position for o in objects} - {None}
    if len(positions) > 1 or (positions and POSITIONS[slot] not in positions):
        return torch.zeros_like(p)
    return p


def match_probability(probs: dict[str, Tensor], spec: CaptionSpec) -> Tensor:
    """P(image matches ``spec``) [N] from classifier probabilities (module docstring)."""
    occ = probs["occupied"]
    n, slots = occ.shape
    out = torch.ones(n, dtype=occ.dtype, device=occ.device)
    if spec.background is not None:
        out = out * probs["background"][:, BACKGROUND_NAMES.index(spec.background)]
    k = len(spec.objects)
    if k == 0:
        return out
    allowed = range(slots) if k == 1 else [POSITIONS.index(p) for p in EDGE_POSITIONS]
    total = torch.zeros_like(out)
    for chosen in itertools.combinations(allowed, k):
        layout = torch.ones_like(out)
        for s in range(slots):
            layout = layout * (occ[:, s] if s in chosen else 1 - occ[:, s])
        if k == 1:
            fit = _object_prob(probs, spec.objects, chosen[0])
        else:  # either object in either slot: P(A or B) = P(A) + P(B) - P(A and B)
            a, b = spec.objects
            s1, s2 = chosen
            fit = (_object_prob(probs, [a], s1) * _object_prob(probs, [b], s2)
                   + _object_prob(probs, [b], s1) * _object_prob(probs, [a], s2)
                   - _object_prob(probs, [a, b], s1) * _object_prob(probs, [a, b], s2))
        total = total + layout * fit
    return out * total


def attribute_hits(readings: Sequence[Reading], prompts: Sequence[str]) -> list[dict[str, bool]]:
    """Per image, which specified attributes the reading satisfies ({} for the empty caption)."""
    return [satisfied(parse_caption(p), r) for r, p in zip(readings, prompts)]  # type: ignore[arg-type]


def binary_check(readings: Sequence[Reading], prompts: Sequence[str]) -> list[bool]:
    """GenEval-like success: the caption's number of shapes (if it gives one) and its colours."""
    out = []
    for r, p in zip(readings, prompts):
        spec = parse_caption(p)
        colours_only = CaptionSpec(tuple(ObjectSpec(colour=o.colour) for o in spec.objects))
        out.append(all(satisfied(colours_only, r).values()))  # type: ignore[arg-type]
    return out

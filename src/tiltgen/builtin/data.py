"""Training and evaluation prompts of the built-in world, with held-out attribute combinations.

A scene of the built-in world is one (shape, colour, size, position, background) combination:
5 x 7 x 2 x 5 x 4 = 1400 captions. A fixed 10% of them (chosen by a seeded permutation, so
every attribute value still occurs in training) never appear in the base models' training
data; prompt fidelity is measured on those *held-out* prompts.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ..world import (BACKGROUND_NAMES, COLOUR_NAMES, POSITIONS, SHAPES, SIZES, Scene, Shape, batch, caption,
                     parse_caption)
from . import BUILTIN_WORLD

HELD_OUT_FRACTION = 0.1
_HELD_OUT_SEED = 20261128
N_COMBOS = len(SHAPES) * len(COLOUR_NAMES) * len(SIZES) * len(POSITIONS) * len(BACKGROUND_NAMES)

# The demo's prompts: one per shape family, different colours, positions and backgrounds
# (all in the training combinations; the guidance networks are trained on them too).
DEMO_PROMPTS = (
    "a large red circle in the centre on a gray background",
    "a small blue square on the left on a white background",
    "a large yellow triangle at the top on a navy background",
    "a small green ring at the bottom on a black background",
)


def combo_index(scene: Scene) -> int:
    """Index of a one-shape scene's attribute combination in [0, 1400)."""
    s = scene.shapes[0]
    idx = SHAPES.index(s.shape)
    idx = idx * len(COLOUR_NAMES) + COLOUR_NAMES.index(s.colour)
    idx = idx * len(SIZES) + SIZES.index(s.size)
    idx = idx * len(POSITIONS) + POSITIONS.index(s.position)
    return idx * len(BACKGROUND_NAMES) + BACKGROUND_NAMES.index(scene.background)


@lru_cache(maxsize=1)
def held_out_mask() -> Tensor:
    """[1400] bool: the combinations kept out of training."""
    order = np.random.default_rng(_HELD_OUT_SEED).permutation(N_COMBOS)
    mask = torch.zeros(N_COMBOS, dtype=torch.bool)
    mask[torch.from_numpy(order[: int(round(HELD_OUT_FRACTION * N_COMBOS))])] = True
    return mask


def is_held_out(scene: Scene) -> bool:
    return bool(held_out_mask()[combo_index(scene)])


def scene_of_combo(index: int) -> Scene:
    rest, bg = divmod(int(index), len(BACKGROUND_NAMES))
    rest, pos = divmod(rest, len(POSITIONS))
    rest, size = divmod(rest, len(SIZES))
    shape, colour = divmod(rest, len(COLOUR_NAMES))
    return Scene((Shape(SHAPES[shape], COLOUR_NAMES[colour], SIZES[size], POSITIONS[pos]),), BACKGROUND_NAMES[bg])


def held_out_prompts() -> list[str]:
    """The captions of all held-out combinations (140), in combination order."""
    return [caption(scene_of_combo(i)) for i in torch.nonzero(held_out_mask()).flatten().tolist()]


def training_prompts(n: int, seed: int = 1) -> list[str]:
    """``n`` distinct captions of training combinations (for guidance networks), seeded."""
    allowed = torch.nonzero(~held_out_mask()).flatten().numpy()
    picks = np.random.default_rng(seed).choice(allowed, size=min(n, len(allowed)), replace=False)
    return [caption(scene_of_combo(int(i))) for i in picks]


def training_batch(n: int, seed: int, start: int) -> tuple[Tensor, list[str], int]:
    """Up to ``n`` world images and captions from stream position ``start`` with held-out
    combinations dropped; returns (images [m, 3, S, S], captions, next start)."""
    images, captions, labels = batch(n, seed=seed, config=BUILTIN_WORLD, start=start)
    keep = [i for i, scene in enumerate(labels.scenes) if not is_held_out(scene)]
    return images[keep], [captions[i] for i in keep], start + n


def check_prompt(prompt: str) -> Scene:
    """Parse a prompt for the built-in models (one shape); unknown words raise TiltgenError."""
    from ..errors import TiltgenError

    scene = parse_caption(prompt)
    if len(scene.shapes) != 1:
        raise TiltgenError(f"the built-in models draw one shape per image; {prompt!r} describes {len(scene.shapes)}")
    return scene


def world_data_var(n: int = 4096, seed: int = 99) -> float:
    """Per-dimension variance of the training images as model states (2 * image - 1): the
    ``data_var`` of training-free guidance for the built-in models."""
    images, _, _ = training_batch(n, seed, 0)
    return float((images * 2 - 1).var())


def guidance_prompts() -> list[str]:
    """The prompts the shipped guidance networks are trained on: the demo's and 20 more
    training combinations (prompt-conditional networks; held-out combinations excluded)."""
    extra = [p for p in training_prompts(24, seed=1) if p not in DEMO_PROMPTS]
    return list(DEMO_PROMPTS) + extra[:20]

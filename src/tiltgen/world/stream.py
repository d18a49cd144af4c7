"""Unlimited, file-free data: sample ``i`` of the stream ``seed`` depends only on ``(seed, i)``.

``batch(n, seed)`` gives images, captions (fully specified, or partial training captions with
``partial=True``) and exact :class:`Labels`. Labels are laid out by *position slot* (left,
right, top, bottom, centre), the way the attribute classifier reads an image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import TiltgenError
from .attributes import BACKGROUND_NAMES, COLOUR_NAMES, POSITIONS, SHAPES, SIZES
from .captions import KeepProbabilities, caption, partial_caption
from .scene import Nuisance, Scene, WorldConfig, check_seed, sample_nuisance, sample_scene
from .render import render_batch

#: Label value of an empty slot (PyTorch's default ``ignore_index``).
MISSING = -100

#: (shape, colour) pairs that the built-in models and reward networks never see in training;
#: prompt fidelity on captions naming them measures generalisation to unseen combinations.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("triangle", "green"), ("ring", "orange"), ("square", "purple"),
                                               ("circle", "cyan"))


@dataclass(frozen=True)
class Labels:
    """Exact labels of a batch, per position slot (index into :data:`POSITIONS`).

    ``occupied``: BoolTensor [n, 5]; ``shape``, ``colour``, ``size``: LongTensor [n, 5] (class
    indices, :data:`MISSING` for an empty slot); ``background``, ``count``: LongTensor [n].
    """

    scenes: tuple[Scene, ...]
    occupied: Tensor = field(repr=False)
    shape: Tensor = field(repr=False)
    colour: Tensor = field(repr=False)
    size: Tensor = field(repr=False)
    background: Tensor = field(repr=False)
    count: Tensor = field(repr=False)

    def __len__(self) -> int:
        return len(self.scenes)

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene]) -> "Labels":
        scenes = tuple(scenes)
        n, p = len(scenes), len(POSITIONS)
        per = {k: torch.full((n, p), MISSING, dtype=torch.long) for k in ("shape", "colour", "size")}
        occupied = torch.zeros(n, p, dtype=torch.bool)
        for i, scene in enumerate(scenes):
            for s in scene.shapes:
                j = POSITIONS.index(s.position)
                occupied[i, j] = True
                per["shape"][i, j] = SHAPES.index(s.shape)
                per["colour"][i, j] = COLOUR_NAMES.index(s.colour)
                per["size"][i, j] = SIZES.index(s.size)
        background = torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes], dtype=torch.long)
        count = torch.tensor([len(s.shapes) for s in scenes], dtype=torch.long)
        return cls(scenes, occupied, background=background, count=count, **per)


def item_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([check_seed(seed), check_seed(i)]))


def sample_item(seed: int, i: int, config: WorldConfig | None = None) -> tuple[Scene, Nuisance]:
    """Scene and nuisance of sample ``i`` of the stream ``seed``."""
    cfg = config or WorldConfig()
    g = item_rng(seed, i)
    scene = sample_scene(g, cfg)
    return scene, sample_nuisance(scene, g, cfg)


def render(scene: Scene, size: int = 32, rng: int | np.random.Generator | None = None,
           config: WorldConfig | None = None) -> Tensor:
    """One image [3, S, S] of ``scene``; ``rng`` draws its nuisance (None: the nominal drawing)."""
    if not isinstance(scene, Scene):
        raise TiltgenError(f"render needs a tiltgen.world.Scene, got {type(scene).__name__}")
    return render_batch([scene], [sample_nuisance(scene, rng, config)], size)[0][0]


def batch(n: int, seed: int = 0, config: WorldConfig | None = None, start: int = 0, partial: bool = False,
          keep: KeepProbabilities | None = None) -> tuple[Tensor, list[str], Labels]:
    """Samples ``start .. start + n - 1`` of the stream ``seed``: images [n, 3, S, S] in [0, 1],
    captions (fully specified, or training captions with attributes dropped if ``partial``) and
    :class:`Labels`. The same index always gives the same scene, image and caption."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise TiltgenError(f"batch size n must be an integer >= 1, got {n!r}")
    cfg = config or WorldConfig()
    check_seed(seed)
    check_seed(start)
    scenes, nuisances, captions = [], [], []
    for i in range(start, start + int(n)):
        g = item_rng(seed, i)
        scene = sample_scene(g, cfg)
        nuisances.append(sample_nuisance(scene, g, cfg))
        scenes.append(scene)
        captions.append(partial_caption(scene, g, keep) if partial else caption(scene))
    images, _ = render_batch(scenes, nuisances, cfg.size)
    return images, captions, Labels.from_scenes(scenes)

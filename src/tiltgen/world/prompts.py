"""The prompt sets of the built-in world's evaluations, kept apart from guidance training.

* :data:`DEMO_PROMPTS`: ``tiltgen demo``'s under-specified prompts (the empty prompt, one-shape
  prompts that leave most attributes free, a two-shape prompt).
* :data:`TWO_SHAPE_PROMPTS`: two-shape prompts naming colours, for the binary (count and
  colour) check.
* :func:`held_out_prompts`: captions naming a held-out (shape, colour) pair, which the base
  models never saw, for prompt fidelity on unseen combinations.
* :func:`guidance_prompts`: training captions of world scenes for guidance networks, with
  every evaluation prompt above removed, so the demo measures generalisation to unseen prompts.
"""

from __future__ import annotations

import numpy as np

from .captions import CaptionSpec, ObjectSpec, caption_of, parse_caption, partial_caption
from .scene import WorldConfig, sample_scene
from .stream import HELD_OUT_PAIRS

DEMO_PROMPTS: tuple[str, ...] = ("", "a red shape", "a shape on a white background", "two shapes")
TWO_SHAPE_PROMPTS: tuple[str, ...] = (
    "a red shape and a blue shape",
    "a yellow circle and a green shape",
    "a blue square and an orange shape",
    "a purple shape and a cyan shape on a black background",
    "a green shape and a red shape on a white background",
    "an orange circle and a blue triangle",
)


def held_out_prompts() -> list[str]:
    """Captions naming each held-out (shape, colour) pair, at three levels of detail."""
    prompts = []
    for shape, colour in HELD_OUT_PAIRS:
        prompts += [caption_of(CaptionSpec((ObjectSpec(shape, colour),))),
                    caption_of(CaptionSpec((ObjectSpec(shape, colour, "large", "left"),), "gray")),
                    caption_of(CaptionSpec((ObjectSpec(shape, colour, "small", "centre"),), "black"))]
    return prompts


def evaluation_prompts() -> set[str]:
    """Every prompt an evaluation uses (never trained on by guidance networks)."""
    return set(DEMO_PROMPTS) | set(TWO_SHAPE_PROMPTS) | set(held_out_prompts())


def guidance_prompts(n: int, seed: int = 0, two_shapes: bool | None = None) -> list[str]:
    """``n`` distinct training captions of world scenes (held-out pairs excluded), most common
    first as they come, without any evaluation prompt; ``two_shapes`` keeps only prompts naming
    two shapes (True) or one (False)."""
    config = WorldConfig(exclude_pairs=HELD_OUT_PAIRS)
    banned = evaluation_prompts()
    g = np.random.default_rng(np.random.SeedSequence([seed, 97]))
    out: list[str] = []
    for _ in range(200 * n):
        scene = sample_scene(g, config)
        if two_shapes is not None and (len(scene.shapes) == 2) != two_shapes:
            continue
        prompt = partial_caption(scene, g)
        count = parse_caption(prompt).count
        if two_shapes is not None and count != (2 if two_shapes else 1):
            continue
        if prompt not in banned and prompt not in out:
            out.append(prompt)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not draw {n} distinct guidance prompts")

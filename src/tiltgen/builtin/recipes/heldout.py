"""Prompt fidelity of generator folders on held-out (shape, colour) pairs, and what they draw instead.

    python -m tiltgen.builtin.recipes.heldout src/tiltgen/builtin/weights/world-flow runs/wf-p1

The protocol of issue 11's bar (``pytest -m slow -k held_out``): the 12 captions of
:func:`~tiltgen.world.prompts.held_out_prompts`, ``--images`` images each, the folder's default
steps and CFG from ``tiltgen.json``, one generator seeded ``--seed``. Prints the per-attribute
fidelity and, per held-out pair, the shapes the attribute classifier reads: a model that has not
learned to compose draws the shape its colour co-occurs with in training instead.

``--blank PART`` (SD3-like folders) replaces one part of each prompt's encoding by the empty
caption's before sampling: ``pooled`` (the pooled CLIP embedding that modulates every block),
``clip`` (the CLIP token features) or ``t5`` (the T5 token features); what a part carries is what
the images lose without it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from ...builtin import read_info
from ...errors import TiltgenError
from ...world import HELD_OUT_PAIRS, parse_caption
from ...world.fidelity import Reading
from ...world.prompts import held_out_prompts


TEXT_PARTS = ("pooled", "clip", "t5")


def sample_held_out(folder: Path, images_per_prompt: int, seed: int = 0,
                    captions: Sequence[str] | None = None, blank: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """(images [len(captions) * images_per_prompt, 3, 32, 32] in [0, 1], their captions) from a
    plain diffusers load of ``folder`` at its recorded defaults; ``captions`` defaults to the 12
    held-out ones; ``blank``: one of TEXT_PARTS, taken from the empty caption (SD3-like only)."""
    from diffusers import DiffusionPipeline

    info = read_info(folder)
    extra = {"max_sequence_length": info["max_sequence_length"]} if "max_sequence_length" in info else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in (captions or held_out_prompts()) for _ in range(images_per_prompt)]
    text: dict[str, Any] = {"prompt": prompts}
    if blank is not None:
        text = blanked_encoding(pipe, prompts, blank, extra.get("max_sequence_length", 256))
    with torch.no_grad():
        images = pipe(**text, num_inference_steps=info["default_steps"], guidance_scale=info["default_cfg"],
                      output_type="pt", generator=torch.Generator().manual_seed(seed), **extra).images
    return images, prompts


def blanked_encoding(pipe: Any, prompts: Sequence[str], part: str, t5_length: int) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` [N, L_clip + t5_length, D] and ``pooled_prompt_embeds`` [N, P] of an SD3
    pipeline for ``prompts``, with ``part`` (one of TEXT_PARTS) replaced by the empty caption's."""
    if part not in TEXT_PARTS:
        raise TiltgenError(f"unknown text part {part!r}; choose one of: {', '.join(TEXT_PARTS)}")
    if getattr(pipe, "text_encoder_3", None) is None or not hasattr(pipe, "encode_prompt"):
        raise TiltgenError(f"blanking a text part needs an SD3-like pipeline (pooled CLIP, CLIP and T5 "
                           f"features); {type(pipe).__name__} has no T5 encoder")

    def encode(captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(list(captions), None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False, max_sequence_length=t5_length)
        return embeds, pooled

    with torch.no_grad():
        embeds, pooled = encode(prompts)
        empty_embeds, empty_pooled = (v.expand(len(prompts), *v.shape[1:]) for v in encode([""]))
    clip_tokens = embeds.shape[1] - t5_length  # the pipeline joins the CLIP tokens, then the T5 ones
    if part == "pooled":
        pooled = empty_pooled
    elif part == "clip":
        embeds = torch.cat([empty_embeds[:, :clip_tokens], embeds[:, clip_tokens:]], 1)
    else:
        embeds = torch.cat([embeds[:, :clip_tokens], empty_embeds[:, clip_tokens:]], 1)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def shapes_drawn(readings: Sequence[Reading], prompts: Sequence[str],
                 pairs: Sequence[tuple[str, str]] = HELD_OUT_PAIRS) -> dict[str, Counter]:
    """{"colour shape" of each (shape, colour) pair: Counter of the shapes read in the images whose
    caption names it ("+"-joined when several, "" when none)}."""
    drawn: dict[str, Counter] = {f"{colour} {shape}": Counter() for shape, colour in pairs}
    for reading, prompt in zip(readings, prompts, strict=True):
        for shape, colour in _pairs_of(prompt):
            if (shape, colour) in pairs:
                drawn[f"{colour} {shape}"]["+".join(s.shape for s in reading.shapes)] += 1
    return drawn


def named_pairs(captions: Sequence[str]) -> list[tuple[str, str]]:
    """The (shape, colour) pairs that captions name, in order of first appearance."""
    pairs: list[tuple[str, str]] = []
    for caption in captions:
        pairs += [pair for pair in _pairs_of(caption) if pair not in pairs]
    return pairs


def _pairs_of(caption: str) -> list[tuple[str, str]]:
    """The (shape, colour) pairs of the objects a caption names with both (the world's parser)."""
    return [(obj.shape, obj.colour) for obj in parse_caption(caption).objects if obj.shape and obj.colour]


def report(folder: Path, images_per_prompt: int, seed: int = 0,
           captions: Sequence[str] | None = None, blank: str | None = None) -> dict[str, Any]:
    from ...world.rewards import attribute_fidelity

    pairs = named_pairs(captions) if captions else HELD_OUT_PAIRS  # a caption outside the grammar fails here
    images, prompts = sample_held_out(folder, images_per_prompt, seed, captions, blank)
    result = attribute_fidelity(images, prompts)
    return {"per_attribute": result["per_attribute"], "shapes_drawn": shapes_drawn(result["readings"], prompts, pairs)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiltgen.builtin.recipes.heldout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="generator pipeline folders (with tiltgen.json)")
    parser.add_argument("--images", type=int, default=16, help="images per held-out caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", action="append", default=None,
                        help="a caption to use instead of the held-out ones (repeatable), e.g. a training pair")
    parser.add_argument("--blank", choices=TEXT_PARTS, default=None,
                        help="SD3-like folders: take this part of each prompt's encoding from the empty caption")
    args = parser.parse_args(argv)
    for folder in map(Path, args.folders):
        if not (folder / "tiltgen.json").is_file() or not (folder / "model_index.json").is_file():
            print(f"error: {folder} is not a generator folder (needs model_index.json and tiltgen.json)",
                  file=sys.stderr)
            return 2
        try:
            rec = report(folder, args.images, args.seed, args.prompt, args.blank)
        except TiltgenError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{folder}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec["per_attribute"].items()))
        for pair, counts in rec["shapes_drawn"].items():
            total = sum(counts.values())
            print(f"  {pair}: " + ", ".join(f"{name or 'none'} {n}/{total}" for name, n in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

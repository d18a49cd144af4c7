"""Captions at every level of detail: the grammar, its parser, and training-caption sampling.

Grammar (every attribute in brackets may be left out)::

    CAPTION    := "" | OBJECTS [BACKGROUND] | BACKGROUND
    OBJECTS    := OBJECT | OBJECT "and" OBJECT | "two shapes"
    OBJECT     := ("a" | "an") [SIZE] [COLOUR] NOUN [POSITION]
    NOUN       := SHAPE | "shape"
    POSITION   := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the centre"
    BACKGROUND := "on a" BACKGROUND_NAME "background"

A caption that names objects fixes their number (one object phrase = one shape, two = two);
"" and a background-only caption leave the number free. Everything a caption does not name is
free: ``parse_caption`` returns a :class:`CaptionSpec` whose unnamed attributes are None, and
``satisfied`` checks a scene against it attribute by attribute. Training captions come from
``partial_caption``, which drops each attribute at random (``KeepProbabilities``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from ..errors import TiltgenError
from .attributes import BACKGROUND_NAMES, COLOUR_NAMES, EDGE_POSITIONS, SHAPES, SIZES
from .scene import Scene, as_rng

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on", "the", "left"),
    "right": ("on", "the", "right"),
    "top": ("at", "the", "top"),
    "bottom": ("at", "the", "bottom"),
    "centre": ("in", "the", "centre"),
}
_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}
_GRAMMAR_WORDS = ("a", "an", "and", "background", "shape", "shapes", "two")
#: Every word a caption can contain, sorted.
WORDS: tuple[str, ...] = tuple(sorted(set(_GRAMMAR_WORDS) | set(SIZES) | set(COLOUR_NAMES) | set(SHAPES)
                                      | set(BACKGROUND_NAMES) | {w for p in POSITION_PHRASES.values() for w in p}))
#: Longest caption: two full objects joined by "and", plus the background phrase.
MAX_CAPTION_WORDS = 2 * 7 + 1 + 4
#: The attributes a caption can specify and :func:`satisfied` reports.
CHECKED = ("count", "shape", "colour", "size", "position", "background")


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one shape (None = not said)."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    def named(self) -> dict[str, str]:
        return {k: v for k, v in (("shape", self.shape), ("colour", self.colour), ("size", self.size),
                                  ("position", self.position)) if v is not None}


@dataclass(frozen=True)
class CaptionSpec:
    """A parsed caption: the objects it names (empty: the number of shapes is free) and the
    background (None: free)."""

    objects: tuple[ObjectSpec, ...] = ()
    background: str | None = None

    @property
    def count(self) -> int | None:
        return len(self.objects) or None

    def specified(self) -> list[str]:
        """The attribute kinds this caption fixes (a subset of :data:`CHECKED`, in that order)."""
        kinds = set().union(*(o.named() for o in self.objects)) if self.objects else set()
        if self.objects:
            kinds.add("count")
        if self.background is not None:
            kinds.add("background")
        return [k for k in CHECKED if k in kinds]


def _object_words(o: ObjectSpec) -> list[str]:
    words = [w for w in (o.size, o.colour) if w is not None] + [o.shape or "shape"]
    article = "an" if words[0][0] in "aeiou" else "a"
    return [article] + words + (list(POSITION_PHRASES[o.position]) if o.position is not None else [])


def caption_of(spec: CaptionSpec) -> str:
    """The caption text of a spec (inverse of :func:`parse_caption` up to object order)."""
    parts = []
    if spec.objects:
        if len(spec.objects) == 2 and all(not o.named() for o in spec.objects):
            parts.append("two shapes")
        else:
            parts.append(" and ".join(" ".join(_object_words(o)) for o in spec.objects))
    if spec.background is not None:
        parts.append(f"on a {spec.background} background")
    return " ".join(parts)


def full_spec(scene: Scene) -> CaptionSpec:
    """The caption spec naming every attribute of ``scene``."""
    return CaptionSpec(tuple(ObjectSpec(s.shape, s.colour, s.size, s.position) for s in scene.shapes),
                       scene.background)


def caption(scene: Scene) -> str:
    """The fully specified caption, e.g. ``"a large red circle at the top on a gray background"``."""
    return caption_of(full_spec(scene))


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

def caption_words(text: str) -> list[str]:
    """Lower-cased words of a caption; a word outside the world's vocabulary raises, naming it."""
    if not isinstance(text, str):
        raise TiltgenError(f"a caption must be a string, got {type(text).__name__}")
    words = text.strip().lower().rstrip(".").split()
    unknown = [w for w in words if w not in WORDS]
    if unknown:
        raise TiltgenError(f"unknown word {unknown[0]!r} in prompt {text!r}: the built-in world's vocabulary is "
                           f"{', '.join(WORDS)}")
    return words


@lru_cache(maxsize=65536)
def parse_caption(text: str) -> CaptionSpec:
    """Read a caption of the grammar (module docstring) into a :class:`CaptionSpec`.

    Case and a final full stop are ignored. Unknown words, text outside the grammar and
    impossible scenes (two shapes in one place, or a centred shape beside another) raise
    :class:`TiltgenError` naming the problem.
    """
    words = caption_words(text)
    parser = _Parser(text, words)
    return parser.caption()


class _Parser:
    def __init__(self, text: str, words: list[str]):
        self.text, self.words, self.pos = text, words, 0

    def peek(self, k: int = 0) -> str | None:
        i = self.pos + k
        return self.words[i] if i < len(self.words) else None

    def fail(self, expected: str) -> TiltgenError:
        got = self.peek()
        where = f"at word {self.pos + 1}, got {got!r}" if got is not None else "but the caption ends"
        return TiltgenError(f"prompt {self.text!r} is outside the world's grammar: expected {expected} {where} "
                            "(e.g. 'a red shape', 'a circle on the left', 'two shapes', "
                            "'a small blue square and a red ring on a white background')")

    def take(self, choices: Sequence[str]) -> str | None:
        w = self.peek()
        if w in choices:
            self.pos += 1
            return w
        return None

    def expect(self, choices: Sequence[str], what: str) -> str:
        w = self.take(choices)
        if w is None:
            raise self.fail(what)
        return w

    def caption(self) -> CaptionSpec:
        objects: list[ObjectSpec] = []
        if self.peek() == "two":
            self.pos += 1
            self.expect(("shapes",), "'shapes' after 'two'")
            objects = [ObjectSpec(), ObjectSpec()]
        elif self.peek() in ("a", "an"):
            objects.append(self.object())
            if self.take(("and",)):
                objects.append(self.object())
        background = None
        if self.peek() == "on" and self.peek(1) == "a":
            self.pos += 2
            background = self.expect(BACKGROUND_NAMES, "a background colour (" + ", ".join(BACKGROUND_NAMES) + ")")
            self.expect(("background",), "'background'")
        if self.pos != len(self.words):
            raise self.fail("'and', a position or 'on a ... background'" if objects else "'a', 'an', 'two' or 'on a'")
        return _checked(self.text, CaptionSpec(tuple(objects), background))

    def object(self) -> ObjectSpec:
        self.expect(("a", "an"), "'a'")
        size = self.take(SIZES)
        colour = self.take(COLOUR_NAMES)
        noun = self.expect(SHAPES + ("shape",), "a shape (" + ", ".join(SHAPES) + ") or 'shape'")
        position = None
        phrase = tuple(self.words[self.pos:self.pos + 3])
        if phrase in _PHRASE_TO_POSITION:
            position = _PHRASE_TO_POSITION[phrase]
            self.pos += 3
        return ObjectSpec(None if noun == "shape" else noun, colour, size, position)


def _checked(text: str, spec: CaptionSpec) -> CaptionSpec:
    positions = [o.position for o in spec.objects if o.position is not None]
    if len(positions) != len(set(positions)):
        raise TiltgenError(f"prompt {text!r} puts two shapes in the same place")
    if len(spec.objects) == 2 and "centre" in positions:
        raise TiltgenError(f"prompt {text!r}: two-shape scenes place their shapes at the edges "
                           f"({', '.join(EDGE_POSITIONS)}), not in the centre")
    return spec


# --------------------------------------------------------------------------------------------
# Checking a scene against a caption
# --------------------------------------------------------------------------------------------

def _object_hits(o: ObjectSpec, s: object) -> dict[str, bool]:
    return {k: getattr(s, k) == v for k, v in o.named().items()}


def satisfied(spec: CaptionSpec, scene: Scene) -> dict[str, bool]:
    """Which specified attributes ``scene`` satisfies: {kind: bool} for ``spec.specified()``.

    Objects are matched to shapes by the assignment that satisfies the most attributes (a
    caption's object order carries no meaning). With the wrong number of shapes, ``count`` is
    False and the objects are matched to as many shapes as there are.
    """
    out: dict[str, bool] = {}
    kinds = spec.specified()
    if spec.objects:
        out["count"] = len(scene.shapes) == len(spec.objects)
        best: dict[str, list[bool]] | None = None
        for perm in itertools.permutations(range(len(scene.shapes)), min(len(scene.shapes), len(spec.objects))):
            per: dict[str, list[bool]] = {}
            for o_index, s_index in enumerate(perm):
                for k, hit in _object_hits(spec.objects[o_index], scene.shapes[s_index]).items():
                    per.setdefault(k, []).append(hit)
            for o in spec.objects[len(perm):]:  # objects left without a shape miss everything
                for k in o.named():
                    per.setdefault(k, []).append(False)
            if best is None or sum(map(sum, per.values())) > sum(map(sum, best.values())):
                best = per
        for k, hits in (best or {}).items():
            out[k] = all(hits)
    if spec.background is not None:
        out["background"] = scene.background == spec.background
    return {k: out[k] for k in kinds}


# --------------------------------------------------------------------------------------------
# Training captions: drop attributes at random
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeepProbabilities:
    """How often a training caption keeps each attribute (docs/world.md, "Captions")."""

    unconditional: float = 0.1   # the empty caption (classifier-free guidance)
    two_shapes: float = 0.15     # a two-shape scene described only as "two shapes"
    background_only: float = 0.03
    shape: float = 0.65
    colour: float = 0.7
    size: float = 0.45
    position: float = 0.45
    background: float = 0.45


def partial_spec(scene: Scene, rng: int | np.random.Generator, keep: KeepProbabilities | None = None
                 ) -> CaptionSpec:
    """A caption spec for ``scene`` with attributes dropped at random (``keep``); objects are
    listed in random order."""
    k = keep or KeepProbabilities()
    g = as_rng(rng)
    u = g.random()
    if u < k.unconditional:
        return CaptionSpec()
    background = scene.background if g.random() < k.background else None
    if u < k.unconditional + k.background_only:
        return CaptionSpec((), scene.background)
    if len(scene.shapes) == 2 and g.random() < k.two_shapes:
        return CaptionSpec((ObjectSpec(), ObjectSpec()), background)
    objects = []
    for s in scene.shapes:
        draws = g.random(4)
        objects.append(ObjectSpec(s.shape if draws[0] < k.shape else None, s.colour if draws[1] < k.colour else None,
                                  s.size if draws[2] < k.size else None,
                                  s.position if draws[3] < k.position else None))
    if len(objects) == 2 and g.random() < 0.5:
        objects.reverse()
    return CaptionSpec(tuple(objects), background)


def partial_caption(scene: Scene, rng: int | np.random.Generator, keep: KeepProbabilities | None = None) -> str:
    """A training caption of ``scene``: :func:`partial_spec` as text."""
    return caption_of(partial_spec(scene, rng, keep))

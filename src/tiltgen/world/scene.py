"""Scenes of the shapes world: exact attributes, their skewed prior, and continuous nuisance.

A :class:`Scene` is what a caption can talk about: one or two shapes (shape, colour, size,
position) on a named background. A :class:`Nuisance` is everything a caption never names:
position and size jitter, rotation, the exact hue/saturation/value within a colour name, and
a plain, gradient or textured background. ``sample_scene`` draws both from a seeded numpy
generator, so sample ``i`` of a stream depends only on ``(seed, i)``.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import TiltgenError
from .attributes import (BACKGROUND_NAMES, BACKGROUND_PRIOR, BACKGROUNDS, COLOUR_NAMES, COLOUR_PRIOR, COLOURS,
                         CONTRAST_AVERSION, P_SAME_COLOUR, P_TWO, PAIR_PRIOR, POSITION_PRIOR,
                         POSITIONS, SHAPE_PRIOR, SHAPES, SIZE_PRIOR, SIZES, luma)

MAX_SHAPES = 2
MIN_SIZE = 16
BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "texture")
STYLE_PRIOR = (0.4, 0.35, 0.25)
#: Shapes whose look changes under rotation (circles and rings are symmetric).
ROTATING = ("square", "triangle", "cross")


def check_name(kind: str, name: str, choices: Sequence[str]) -> str:
    if not isinstance(name, str) or name not in choices:
        raise TiltgenError(f"unknown {kind} {name!r}; choose one of: {', '.join(choices)}")
    return name


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: its exact attribute labels."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        check_name("shape", self.shape, SHAPES)
        check_name("colour", self.colour, COLOUR_NAMES)
        check_name("size", self.size, SIZES)
        check_name("position", self.position, POSITIONS)


@dataclass(frozen=True)
class Scene:
    """One or two shapes on a named background; two shapes take distinct edge positions and
    are stored in :data:`POSITIONS` order."""

    shapes: tuple[Shape, ...]
    background: str

    def __post_init__(self) -> None:
        shapes = tuple(self.shapes)
        if not 1 <= len(shapes) <= MAX_SHAPES:
            raise TiltgenError(f"a scene has 1 to {MAX_SHAPES} shapes, got {len(shapes)}")
        if not all(isinstance(s, Shape) for s in shapes):
            raise TiltgenError("scene shapes must be tiltgen.world.Shape instances")
        positions = [s.position for s in shapes]
        if len(set(positions)) != len(positions):
            raise TiltgenError(f"the shapes of a scene need distinct positions, got {positions}")
        if len(shapes) == 2 and "centre" in positions:
            raise TiltgenError("two-shape scenes use edge positions (left, right, top, bottom), not the centre")
        shapes = tuple(sorted(shapes, key=lambda s: POSITIONS.index(s.position)))
        object.__setattr__(self, "shapes", shapes)
        check_name("background", self.background, BACKGROUND_NAMES)


@dataclass(frozen=True)
class Nuisance:
    """The continuous part of an image, per shape (in the scene's shape order) and background.

    ``offset``: centre jitter (dx, dy), units of image width; ``scale``: radius multiplier;
    ``angle``: rotation in radians; ``rgb``: the shape's exact colour; ``background_rgb``:
    the exact background colour; ``style``: plain, gradient or texture; ``direction`` and
    ``amplitude``: the gradient's (or texture's) orientation and strength; ``waves``: the
    texture's (fx, fy, phase) components.
    """

    offset: tuple[tuple[float, float], ...]
    scale: tuple[float, ...]
    angle: tuple[float, ...]
    rgb: tuple[tuple[float, float, float], ...]
    background_rgb: tuple[float, float, float]
    style: str = "plain"
    direction: float = 0.0
    amplitude: float = 0.0
    waves: tuple[tuple[float, float, float], ...] = field(default=())


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are sampled and drawn.

    ``size``: image side in pixels (>= 16). ``p_two``: probability of a two-shape scene.
    ``exclude_pairs``: (shape, colour) pairs never drawn (held-out combinations).
    ``jitter`` (units of image width), ``scale_jitter`` (relative), ``max_angle`` (degrees),
    ``hue_jitter`` (fraction of the colour wheel), ``sv_jitter`` (relative saturation/value)
    and ``styles`` (background styles allowed) set the nuisance; zeros and ``("plain",)``
    give the nominal drawing of every scene.
    """

    size: int = 32
    p_two: float = P_TWO
    exclude_pairs: tuple[tuple[str, str], ...] = ()
    jitter: float = 0.03
    scale_jitter: float = 0.1
    max_angle: float = 20.0
    hue_jitter: float = 0.02
    sv_jitter: float = 0.08
    styles: tuple[str, ...] = BACKGROUND_STYLES

    def __post_init__(self) -> None:
        check_size(self.size)
        if not 0.0 <= float(self.p_two) <= 1.0:
            raise TiltgenError(f"p_two must be a probability in [0, 1], got {self.p_two!r}")
        limits = {"jitter": 0.04, "scale_jitter": 0.15, "max_angle": 30.0, "hue_jitter": 0.04, "sv_jitter": 0.15}
        for name, hi in limits.items():
            if not 0.0 <= float(getattr(self, name)) <= hi:
                raise TiltgenError(f"{name} must be in [0, {hi}], got {getattr(self, name)!r}")
        styles = tuple(self.styles)
        if not styles:
            raise TiltgenError("WorldConfig needs at least one background style")
        for s in styles:
            check_name("background style", s, BACKGROUND_STYLES)
        object.__setattr__(self, "styles", styles)
        pairs = tuple((check_name("shape", s, SHAPES), check_name("colour", c, COLOUR_NAMES))
                      for s, c in self.exclude_pairs)
        object.__setattr__(self, "exclude_pairs", pairs)
        if len(set(pairs)) == len(SHAPES) * len(COLOUR_NAMES):
            raise TiltgenError("exclude_pairs excludes every (shape, colour) pair")


def check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TiltgenError(f"image size must be an integer >= {MIN_SIZE}, got {size!r}")
    if size < MIN_SIZE:
        raise TiltgenError(f"image size must be >= {MIN_SIZE} pixels, got {size}")
    return int(size)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TiltgenError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(np.random.SeedSequence([check_seed(rng)]))


def _choice(g: np.random.Generator, weights: dict) -> object:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(g.choice(len(keys), p=p / p.sum()))]


def _shape_and_colour(g: np.random.Generator, cfg: WorldConfig, copy_colour: str | None) -> tuple[str, str]:
    excluded = set(cfg.exclude_pairs)
    for _ in range(100):  # rejection: held-out pairs are a small fraction
        shape = _choice(g, SHAPE_PRIOR)
        colour = copy_colour if copy_colour is not None else _choice(g, COLOUR_PRIOR)
        if (shape, colour) not in excluded:
            return shape, colour  # type: ignore[return-value]
        copy_colour = None
    raise TiltgenError("cannot draw a shape/colour pair outside exclude_pairs")


def _background(g: np.random.Generator, colours: Sequence[str]) -> str:
    weights = {}
    for name, prior in BACKGROUND_PRIOR.items():
        contrast = np.mean([abs(luma(COLOURS[c]) - luma(BACKGROUNDS[name])) for c in colours])
        weights[name] = prior * math.exp(-CONTRAST_AVERSION * contrast)
    return _choice(g, weights)  # type: ignore[return-value]


def sample_scene(rng: int | np.random.Generator = 0, config: WorldConfig | None = None) -> Scene:
    """Draw a scene from the skewed prior (a seed or a numpy ``Generator``)."""
    cfg = config or WorldConfig()
    g = as_rng(rng)
    if g.random() < cfg.p_two:
        positions = list(_choice(g, PAIR_PRIOR))  # type: ignore[arg-type]
    else:
        positions = [_choice(g, POSITION_PRIOR)]
    shapes, first = [], None
    for i, position in enumerate(positions):
        copy = first if i == 1 and g.random() < P_SAME_COLOUR else None
        shape, colour = _shape_and_colour(g, cfg, copy)
        first = first or colour
        shapes.append(Shape(shape, colour, _choice(g, SIZE_PRIOR), position))  # type: ignore[arg-type]
    return Scene(tuple(shapes), _background(g, [s.colour for s in shapes]))


def _jitter_colour(g: np.random.Generator, rgb: tuple[float, float, float], hue: float, sv: float
                   ) -> tuple[float, float, float]:
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    h = (h + hue * g.uniform(-1, 1)) % 1.0
    s = min(1.0, max(0.0, s * (1 + sv * g.uniform(-1, 1))))
    v = min(1.0, max(0.0, v * (1 + sv * g.uniform(-1, 1))))
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def sample_nuisance(scene: Scene, rng: int | np.random.Generator | None = None,
                    config: WorldConfig | None = None) -> Nuisance:
    """The continuous part of one image of ``scene`` (None: the nominal drawing)."""
    cfg = config or WorldConfig()
    if rng is None:
        return Nuisance(offset=tuple((0.0, 0.0) for _ in scene.shapes), scale=tuple(1.0 for _ in scene.shapes),
                        angle=tuple(0.0 for _ in scene.shapes), rgb=tuple(COLOURS[s.colour] for s in scene.shapes),
                        background_rgb=BACKGROUNDS[scene.background])
    g = as_rng(rng)
    offset, scale, angle, rgb = [], [], [], []
    for s in scene.shapes:
        dx, dy, ds, da = g.uniform(-1.0, 1.0, size=4)
        offset.append((float(cfg.jitter * dx), float(cfg.jitter * dy)))
        scale.append(float(1 + cfg.scale_jitter * ds))
        angle.append(float(math.radians(cfg.max_angle) * da) if s.shape in ROTATING else 0.0)
        rgb.append(_jitter_colour(g, COLOURS[s.colour], cfg.hue_jitter, cfg.sv_jitter))
    base = np.array(BACKGROUNDS[scene.background])
    background = tuple(float(c) for c in np.clip(base + 0.03 * g.uniform(-1, 1), 0, 1))
    style = BACKGROUND_STYLES[int(g.choice(len(BACKGROUND_STYLES), p=STYLE_PRIOR))]
    if style not in cfg.styles:
        style = cfg.styles[0]
    direction, amplitude, waves = float(g.uniform(0, 2 * math.pi)), 0.0, ()
    if style == "gradient":
        amplitude = float(g.uniform(0.05, 0.11))
    elif style == "texture":
        amplitude = float(g.uniform(0.025, 0.05))
        waves = tuple((float(g.uniform(1, 4)) * float(g.choice([-1, 1])), float(g.uniform(1, 4)),
                       float(g.uniform(0, 2 * math.pi))) for _ in range(3))
    return Nuisance(tuple(offset), tuple(scale), tuple(angle), tuple(rgb), background, style, direction, amplitude,
                    waves)

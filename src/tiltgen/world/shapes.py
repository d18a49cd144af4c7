"""A deterministic procedural world of captioned RGB images of one or two shapes.

Every image is drawn from a *scene*: one or two shapes, each with a shape, colour, size and
position, on a named background. Scenes are sampled from a seed, rendered with torch ops
(antialiased edges from signed distance functions), and described by a caption in a tiny
fixed grammar that :func:`parse_caption` inverts exactly. ``batch(n, seed)`` gives unlimited,
file-free data: sample ``i`` depends only on ``(seed, i)``.

Coordinates are in units of the image width: ``x`` grows to the right, ``y`` grows
downwards, the image spans ``[0, 1]²`` and pixel ``(i, j)`` has its centre at
``((j + 0.5) / size, (i + 0.5) / size)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import TiltgenError

# --------------------------------------------------------------------------------------------
# Attributes (the order of each tuple defines its integer class indices)
# --------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.80),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "gray": (0.50, 0.50, 0.50),
    "white": (1.00, 1.00, 1.00),
    "black": (0.00, 0.00, 0.00),
    "navy": (0.05, 0.08, 0.30),  # dark blue
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

#: Positions a shape may take in a two-shape scene (``centre`` would overlap the other shape).
EDGE_POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
#: The phrase each position takes in a caption.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on", "the", "left"),
    "right": ("on", "the", "right"),
    "top": ("at", "the", "top"),
    "bottom": ("at", "the", "bottom"),
    "centre": ("in", "the", "centre"),
}
#: Spellings accepted by the parser and tokenizer and mapped to the canonical word.
ALIASES: dict[str, str] = {"grey": "gray", "center": "centre", "middle": "centre"}

#: Shape "radius" (units of image width) per size, before size jitter.
SIZE_RADIUS: dict[str, float] = {"small": 0.10, "large": 0.17}
#: Distance of an edge position's centre from the image centre (units of image width).
POSITION_OFFSET = 0.26
POSITION_XY: dict[str, tuple[float, float]] = {
    "left": (0.5 - POSITION_OFFSET, 0.5),
    "right": (0.5 + POSITION_OFFSET, 0.5),
    "top": (0.5, 0.5 - POSITION_OFFSET),
    "bottom": (0.5, 0.5 + POSITION_OFFSET),
    "centre": (0.5, 0.5),
}

MIN_SIZE = 16
MAX_SHAPES = 2
#: Label value of an absent second shape (PyTorch's default ``ignore_index``).
MISSING = -100

_GRAMMAR_WORDS = ("a", "and", "on", "background")
#: Sorted list of every word a caption can contain.
WORDS: tuple[str, ...] = tuple(sorted(set(_GRAMMAR_WORDS) | set(SIZES) | set(COLOURS) | set(SHAPES)
                                      | set(BACKGROUNDS) | {w for p in POSITION_PHRASES.values() for w in p}))
PAD = "<pad>"
#: Token vocabulary: ``<pad>`` (id 0) then :data:`WORDS`; the tuple is itself sorted.
VOCAB: tuple[str, ...] = (PAD,) + WORDS
PAD_ID = 0
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
#: Longest caption: 2 × (a size colour shape + 3-word position) + "and" + "on a BG background".
MAX_CAPTION_WORDS = 2 * 7 + 1 + 4
#: Default padded token length (a little headroom over :data:`MAX_CAPTION_WORDS`).
MAX_TOKENS = 24


def vocabulary() -> list[str]:
    """The token vocabulary as a list (index = token id; ``<pad>`` is 0)."""
    return list(VOCAB)


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------

def _check_name(kind: str, name: str, choices: Sequence[str]) -> str:
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
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, COLOUR_NAMES)
        _check_name("size", self.size, SIZES)
        _check_name("position", self.position, POSITIONS)

    def indices(self) -> dict[str, int]:
        """Integer class indices of the attributes (into SHAPES, COLOUR_NAMES, SIZES, POSITIONS)."""
        return {"shape": SHAPES.index(self.shape), "colour": COLOUR_NAMES.index(self.colour),
                "size": SIZES.index(self.size), "position": POSITIONS.index(self.position)}


@dataclass(frozen=True)
class Scene:
    """One or two shapes (distinct positions) on a named background."""

    shapes: tuple[Shape, ...]
    background: str

    def __post_init__(self) -> None:
        shapes = tuple(self.shapes)
        object.__setattr__(self, "shapes", shapes)
        if not 1 <= len(shapes) <= MAX_SHAPES:
            raise TiltgenError(f"a scene has 1 to {MAX_SHAPES} shapes, got {len(shapes)}")
        if not all(isinstance(s, Shape) for s in shapes):
            raise TiltgenError("scene shapes must be tiltgen.world.Shape instances")
        positions = [s.position for s in shapes]
        if len(set(positions)) != len(positions):
            raise TiltgenError(f"the shapes of a scene need distinct positions, got {positions}")
        _check_name("background", self.background, BACKGROUND_NAMES)

    def indices(self) -> dict[str, object]:
        """Class indices: per-shape lists (``shape``, ``colour``, ``size``, ``position``),
        ``background`` and ``num_shapes``."""
        per = [s.indices() for s in self.shapes]
        out: dict[str, object] = {k: [p[k] for p in per] for k in ("shape", "colour", "size", "position")}
        out["background"] = BACKGROUND_NAMES.index(self.background)
        out["num_shapes"] = len(self.shapes)
        return out


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are sampled and drawn.

    ``size``: image side in pixels (≥ 16). ``max_shapes``: 1 or 2. ``p_two``: probability of a
    two-shape scene when ``max_shapes == 2``. ``jitter``: uniform position jitter (units of image
    width, per axis). ``scale_jitter``: relative uniform size jitter. ``shapes``, ``colours``,
    ``backgrounds``: the attribute values sampled (subsets allow held-out combinations; class
    indices always refer to the full lists).
    """

    size: int = 32
    max_shapes: int = 2
    p_two: float = 0.3
    jitter: float = 0.03
    scale_jitter: float = 0.08
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOUR_NAMES
    backgrounds: tuple[str, ...] = BACKGROUND_NAMES

    def __post_init__(self) -> None:
        _check_size(self.size)
        if self.max_shapes not in (1, 2) or isinstance(self.max_shapes, bool):
            raise TiltgenError(f"max_shapes must be 1 or 2, got {self.max_shapes!r}")
        if not 0.0 <= float(self.p_two) <= 1.0:
            raise TiltgenError(f"p_two must be a probability in [0, 1], got {self.p_two!r}")
        if not 0.0 <= float(self.jitter) <= 0.05:
            raise TiltgenError(f"jitter must be in [0, 0.05] (units of image width), got {self.jitter!r}")
        if not 0.0 <= float(self.scale_jitter) <= 0.2:
            raise TiltgenError(f"scale_jitter must be in [0, 0.2], got {self.scale_jitter!r}")
        for kind, values, choices in (("shape", self.shapes, SHAPES), ("colour", self.colours, COLOUR_NAMES),
                                      ("background", self.backgrounds, BACKGROUND_NAMES)):
            values = tuple(values)
            if not values:
                raise TiltgenError(f"WorldConfig needs at least one {kind}")
            for v in values:
                _check_name(kind, v, choices)
            object.__setattr__(self, kind + "s", values)


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TiltgenError(f"image size must be an integer ≥ {MIN_SIZE}, got {size!r}")
    if size < MIN_SIZE:
        raise TiltgenError(f"image size must be ≥ {MIN_SIZE} pixels, got {size}")
    return int(size)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TiltgenError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(np.random.SeedSequence([_check_seed(rng)]))


def _pick(rng: np.random.Generator, values: Sequence[str]) -> str:
    return values[int(rng.integers(len(values)))]


def sample_scene(rng: int | np.random.Generator = 0, config: WorldConfig | None = None) -> Scene:
    """Draw a scene from a seed (int ≥ 0) or a numpy ``Generator``.

    Two-shape scenes take two distinct edge positions (never ``centre``), listed in
    :data:`POSITIONS` order, so shape slot 0/1 is determined by position.
    """
    cfg = config or WorldConfig()
    g = _as_rng(rng)
    two = cfg.max_shapes == 2 and g.random() < cfg.p_two
    if two:
        idx = sorted(g.choice(len(EDGE_POSITIONS), size=2, replace=False).tolist())
        positions = [EDGE_POSITIONS[i] for i in idx]
    else:
        positions = [_pick(g, POSITIONS)]
    shapes = tuple(Shape(_pick(g, cfg.shapes), _pick(g, cfg.colours), _pick(g, SIZES), p) for p in positions)
    return Scene(shapes, _pick(g, cfg.backgrounds))


# --------------------------------------------------------------------------------------------
# Captions and tokens
# --------------------------------------------------------------------------------------------

def caption(scene: Scene) -> str:
    """``"a large red circle at the top on a gray background"``; two shapes are joined by "and"."""
    parts = [" ".join(("a", s.size, s.colour, s.shape) + POSITION_PHRASES[s.position]) for s in scene.shapes]
    return " and ".join(parts) + f" on a {scene.background} background"


def _words(text) -> list[str]:
    if not isinstance(text, str):
        raise TiltgenError(f"a caption must be a string, got {type(text).__name__}")
    words = [ALIASES.get(w, w) for w in text.strip().lower().rstrip(".").split()]
    if not words:
        raise TiltgenError("empty caption; write e.g. 'a large red circle at the top on a gray background'")
    for w in words:
        if w not in WORD_TO_ID or w == PAD:
            raise TiltgenError(
                f"unknown word {w!r} in caption {text!r}; shapes: {', '.join(SHAPES)}; colours: "
                f"{', '.join(COLOUR_NAMES)}; sizes: {', '.join(SIZES)}; backgrounds: {', '.join(BACKGROUND_NAMES)}")
    return words


_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}


def parse_caption(text: str) -> Scene:
    """Inverse of :func:`caption`: read the grammar back into a :class:`Scene`.

    Grammar: ``OBJ ["and" OBJ] "on a" BACKGROUND "background"`` with
    ``OBJ = "a" SIZE COLOUR SHAPE POSITION`` and ``POSITION`` one of "on the left",
    "on the right", "at the top", "at the bottom", "in the centre". Case, a final full stop,
    "grey" and "center" are tolerated. Raises :class:`TiltgenError` on unknown words or
    malformed text.
    """
    words = _words(text)
    pos = 0

    def expect(kind: str, choices: Sequence[str]) -> str:
        nonlocal pos
        if pos >= len(words):
            raise TiltgenError(f"caption {text!r} ends early: expected {kind} ({', '.join(choices)})")
        w = words[pos]
        if w not in choices:
            raise TiltgenError(f"malformed caption {text!r}: expected {kind} ({', '.join(choices)}) "
                               f"at word {pos + 1}, got {w!r}")
        pos += 1
        return w

    shapes = []
    while True:
        expect("'a'", ("a",))
        size = expect("a size", SIZES)
        colour = expect("a colour", COLOUR_NAMES)
        shape = expect("a shape", SHAPES)
        phrase = tuple(words[pos:pos + 3])
        if phrase not in _PHRASE_TO_POSITION:
            raise TiltgenError(f"malformed caption {text!r}: expected a position ("
                               + ", ".join(" ".join(p) for p in POSITION_PHRASES.values())
                               + f") at word {pos + 1}, got {' '.join(phrase)!r}")
        pos += 3
        shapes.append(Shape(shape, colour, size, _PHRASE_TO_POSITION[phrase]))
        if pos < len(words) and words[pos] == "and":
            pos += 1
            if len(shapes) >= MAX_SHAPES:
                raise TiltgenError(f"caption {text!r} describes more than {MAX_SHAPES} shapes")
            continue
        break
    expect("'on'", ("on",))
    expect("'a'", ("a",))
    background = expect("a background", BACKGROUND_NAMES)
    expect("'background'", ("background",))
    if pos != len(words):
        raise TiltgenError(f"malformed caption {text!r}: unexpected words after 'background': "
                           f"{' '.join(words[pos:])!r}")
    return Scene(tuple(shapes), background)


def tokenize(text: str, length: int = MAX_TOKENS) -> list[int]:
    """Caption → word ids (into :data:`VOCAB`), right-padded with ``PAD_ID`` to ``length``."""
    words = _words(text)
    if len(words) > length:
        raise TiltgenError(f"caption has {len(words)} words, more than the token length {length}")
    return [WORD_TO_ID[w] for w in words] + [PAD_ID] * (length - len(words))


def tokenize_batch(texts: Sequence[str], length: int = MAX_TOKENS) -> torch.Tensor:
    """Captions → ``LongTensor[n, length]`` of word ids."""
    if isinstance(texts, str):
        texts = [texts]
    return torch.tensor([tokenize(t, length) for t in texts], dtype=torch.long).reshape(len(texts), length)


def detokenize(ids) -> str:
    """Word ids → caption text (padding dropped)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    out = []
    for i in ids:
        if not isinstance(i, (int, np.integer)) or not 0 <= i < len(VOCAB):
            raise TiltgenError(f"token id {i!r} is outside the vocabulary (0..{len(VOCAB) - 1})")
        if i != PAD_ID:
            out.append(VOCAB[i])
    return " ".join(out)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_SQRT3 = math.sqrt(3.0)
#: Per-shape extent relative to the size radius r: square half-side (equal area to the circle),
#: triangle half-side, cross arm half-width, ring inner/outer radius.
SQUARE_HALF = math.sqrt(math.pi) / 2
TRIANGLE_HALF_SIDE = 1.15
CROSS_HALF_WIDTH = 0.36
RING_INNER = 0.44


def _sd_box(px, py, hx, hy):
    qx = px.abs() - hx
    qy = py.abs() - hy
    outside = torch.hypot(qx.clamp(min=0), qy.clamp(min=0))
    inside = torch.maximum(qx, qy).clamp(max=0)
    return outside + inside


def _sd_circle(px, py, r):
    return torch.hypot(px, py) - r


def _sd_square(px, py, r):
    h = SQUARE_HALF * r
    return _sd_box(px, py, h, h)


def _sd_triangle(px, py, r):
    # Equilateral, pointing up, bounding box centred on the position (iq's exact 2D SDF).
    a = TRIANGLE_HALF_SIDE * r
    h = _SQRT3 * a
    x = px.abs() - a
    y = (-py + h / 6) + a / _SQRT3  # y up, relative to the centroid (h/6 below the box centre)
    fold = (x + _SQRT3 * y) > 0
    x, y = torch.where(fold, (x - _SQRT3 * y) / 2, x), torch.where(fold, (-_SQRT3 * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * a), torch.zeros_like(x))
    return -torch.hypot(x, y) * torch.sign(y)


def _sd_cross(px, py, r):
    w = CROSS_HALF_WIDTH * r
    return torch.minimum(_sd_box(px, py, r, w), _sd_box(px, py, w, r))


def _sd_ring(px, py, r):
    mid = (1 + RING_INNER) / 2 * r
    half = (1 - RING_INNER) / 2 * r
    return (torch.hypot(px, py) - mid).abs() - half


_SDF = {"circle": _sd_circle, "square": _sd_square, "triangle": _sd_triangle, "cross": _sd_cross,
        "ring": _sd_ring}
assert tuple(_SDF) == SHAPES

_COLOUR_T = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32)
_BG_T = torch.tensor([BACKGROUNDS[b] for b in BACKGROUND_NAMES], dtype=torch.float32)


@dataclass(frozen=True)
class _Layout:
    """Continuous placement of each shape: centre (x, y) and radius, units of image width."""

    xy: tuple[tuple[float, float], ...]
    radius: tuple[float, ...]


def layout(scene: Scene, rng: int | np.random.Generator | None = None,
           config: WorldConfig | None = None) -> _Layout:
    """Where each shape goes: nominal positions/sizes, jittered from ``rng`` (None: no jitter)."""
    cfg = config or WorldConfig()
    xy, radius = [], []
    g = None if rng is None else _as_rng(rng)
    for s in scene.shapes:
        x, y = POSITION_XY[s.position]
        r = SIZE_RADIUS[s.size]
        if g is not None:
            dx, dy, ds = g.uniform(-1.0, 1.0, size=3)
            x, y, r = x + cfg.jitter * dx, y + cfg.jitter * dy, r * (1 + cfg.scale_jitter * ds)
        xy.append((float(x), float(y)))
        radius.append(float(r))
    return _Layout(tuple(xy), tuple(radius))


def _render_many(scenes: Sequence[Scene], layouts: Sequence[_Layout], size: int):
    """Vectorised rendering: returns images ``[n, 3, H, W]`` and per-slot masks ``[n, 2, H, W]``."""
    n, S = len(scenes), MAX_SHAPES
    cx = torch.zeros(n, S)
    cy = torch.zeros(n, S)
    rad = torch.zeros(n, S)
    kind = torch.full((n, S), -1, dtype=torch.long)
    colour = torch.zeros(n, S, dtype=torch.long)
    bg = torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes], dtype=torch.long)
    for i, (scene, lay) in enumerate(zip(scenes, layouts)):
        for j, s in enumerate(scene.shapes):
            cx[i, j], cy[i, j] = lay.xy[j]
            rad[i, j] = lay.radius[j]
            kind[i, j] = SHAPES.index(s.shape)
            colour[i, j] = COLOUR_NAMES.index(s.colour)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    px = coords.view(1, 1, 1, size) - cx[:, :, None, None]  # [n, S, 1, W]
    py = coords.view(1, 1, size, 1) - cy[:, :, None, None]  # [n, S, H, 1]
    px, py = torch.broadcast_tensors(px, py)
    r = rad[:, :, None, None].expand_as(px)
    dist = torch.full_like(px, float("inf"))
    for k, name in enumerate(SHAPES):
        sel = kind == k
        if bool(sel.any()):
            dist[sel] = _SDF[name](px[sel], py[sel], r[sel])
    masks = (0.5 - dist * size).clamp(0.0, 1.0)  # soft edge one pixel wide
    img = _BG_T[bg][:, :, None, None].expand(n, 3, size, size)
    for j in range(S):
        a = masks[:, j:j + 1]
        img = img * (1 - a) + _COLOUR_T[colour[:, j]][:, :, None, None] * a
    return img.clamp(0.0, 1.0).contiguous(), masks


def render(scene: Scene, size: int = 32, rng: int | np.random.Generator | None = None,
           config: WorldConfig | None = None) -> torch.Tensor:
    """Draw a scene as a float tensor ``[3, size, size]`` in [0, 1].

    ``rng`` (seed or numpy Generator) jitters position and size; None draws the nominal layout.
    """
    return render_with_masks(scene, size, rng, config)[0]


def render_with_masks(scene: Scene, size: int = 32, rng: int | np.random.Generator | None = None,
                      config: WorldConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`render`, also returning each shape's coverage mask ``[num_shapes, size, size]``
    in [0, 1] (1 inside, soft at the edge; before occlusion by later shapes)."""
    size = _check_size(size)
    if not isinstance(scene, Scene):
        raise TiltgenError(f"render needs a tiltgen.world.Scene, got {type(scene).__name__}")
    img, masks = _render_many([scene], [layout(scene, rng, config)], size)
    return img[0], masks[0, :len(scene.shapes)]


def render_from_caption(text: str, size: int = 32, seed: int = 0,
                        config: WorldConfig | None = None) -> torch.Tensor:
    """Parse a prompt and draw it (``[3, size, size]``), with position/size jitter from ``seed``."""
    scene = parse_caption(text)
    return render(scene, size, np.random.default_rng(np.random.SeedSequence([_check_seed(seed)])), config)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Labels:
    """Exact labels of a batch: the scenes, and integer class indices as LongTensors.

    ``shape``, ``colour``, ``size``, ``position``: ``[n, 2]`` (slot 1 is :data:`MISSING` in
    one-shape scenes); ``background``, ``num_shapes``: ``[n]``. Indices refer to
    :data:`SHAPES`, :data:`COLOUR_NAMES`, :data:`SIZES`, :data:`POSITIONS`, :data:`BACKGROUND_NAMES`.
    """

    scenes: tuple[Scene, ...]
    shape: torch.Tensor = field(repr=False)
    colour: torch.Tensor = field(repr=False)
    size: torch.Tensor = field(repr=False)
    position: torch.Tensor = field(repr=False)
    background: torch.Tensor = field(repr=False)
    num_shapes: torch.Tensor = field(repr=False)

    def __len__(self) -> int:
        return len(self.scenes)

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene]) -> "Labels":
        scenes = tuple(scenes)
        n = len(scenes)
        per = {k: torch.full((n, MAX_SHAPES), MISSING, dtype=torch.long)
               for k in ("shape", "colour", "size", "position")}
        for i, scene in enumerate(scenes):
            for j, s in enumerate(scene.shapes):
                for k, v in s.indices().items():
                    per[k][i, j] = v
        bg = torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes], dtype=torch.long)
        num = torch.tensor([len(s.shapes) for s in scenes], dtype=torch.long)
        return cls(scenes, background=bg, num_shapes=num, **per)


def sample_item(seed: int, i: int, config: WorldConfig | None = None) -> tuple[Scene, _Layout]:
    """Scene and layout of sample ``i`` of the stream with ``seed`` (depends only on both)."""
    cfg = config or WorldConfig()
    g = np.random.default_rng(np.random.SeedSequence([_check_seed(seed), _check_seed(i)]))
    scene = sample_scene(g, cfg)
    return scene, layout(scene, g, cfg)


def batch(n: int, seed: int = 0, config: WorldConfig | None = None, start: int = 0,
          ) -> tuple[torch.Tensor, list[str], Labels]:
    """``n`` samples ``start .. start+n-1`` of the stream ``seed``:
    images ``[n, 3, H, W]`` in [0, 1], captions, and :class:`Labels`.

    Sample ``i`` depends only on ``(seed, i)``, so batches of different sizes agree and the data
    is unlimited.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise TiltgenError(f"batch size n must be an integer ≥ 1, got {n!r}")
    cfg = config or WorldConfig()
    _check_seed(seed)
    _check_seed(start)
    items = [sample_item(seed, start + i, cfg) for i in range(int(n))]
    scenes = [s for s, _ in items]
    images, _ = _render_many(scenes, [lay for _, lay in items], cfg.size)
    return images, [caption(s) for s in scenes], Labels.from_scenes(scenes)

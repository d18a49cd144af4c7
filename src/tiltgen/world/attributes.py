"""The attributes of the shapes world, their names, colours and (skewed) prior frequencies.

The order of every tuple defines the attribute's integer class indices. Priors are deliberately
uneven, as in real captioned data: small shapes, edge positions, warm colours, light
backgrounds and low-contrast colour/background pairs are common; large centred shapes, cyan,
crosses, dark backgrounds with bright shapes and complementary colour pairs are rare
(docs/world.md, "Priors").
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
#: Positions a shape may take in a two-shape scene (``centre`` would overlap the other shape).
EDGE_POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")

#: Nominal RGB of each colour name; images jitter hue, saturation and value around it.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.96, 0.88, 0.12),
    "green": (0.12, 0.68, 0.22),
    "cyan": (0.10, 0.82, 0.88),
    "blue": (0.16, 0.30, 0.95),
    "purple": (0.62, 0.22, 0.82),
}
#: Nominal RGB of each background name; gradients and textures vary it within the name.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "gray": (0.52, 0.52, 0.52),
    "white": (0.95, 0.95, 0.93),
    "black": (0.04, 0.04, 0.05),
    "navy": (0.06, 0.09, 0.32),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

#: Marginal prior weights (normalised when sampled).
SHAPE_PRIOR: dict[str, float] = {"circle": 0.34, "square": 0.28, "triangle": 0.18, "ring": 0.12, "cross": 0.08}
COLOUR_PRIOR: dict[str, float] = {"red": 0.24, "blue": 0.19, "green": 0.16, "yellow": 0.12, "orange": 0.11,
                                  "purple": 0.10, "cyan": 0.08}
SIZE_PRIOR: dict[str, float] = {"small": 0.62, "large": 0.38}
POSITION_PRIOR: dict[str, float] = {"left": 0.23, "right": 0.23, "top": 0.17, "bottom": 0.17, "centre": 0.20}
BACKGROUND_PRIOR: dict[str, float] = {"gray": 0.38, "white": 0.32, "black": 0.18, "navy": 0.12}
#: Probability of a two-shape scene.
P_TWO = 0.3
#: Prior weight of each unordered pair of edge positions in a two-shape scene: adjacent corners
#: are common, balanced (opposite) layouts rare.
PAIR_PRIOR: dict[tuple[str, str], float] = {
    ("left", "right"): 0.07, ("top", "bottom"): 0.05,
    ("left", "top"): 0.23, ("left", "bottom"): 0.20, ("right", "top"): 0.23, ("right", "bottom"): 0.22,
}
#: Probability that the second shape of a scene copies the first one's colour.
P_SAME_COLOUR = 0.35
#: Strength of the background's preference for low contrast with the shapes: the background
#: prior is multiplied by exp(-CONTRAST_AVERSION * |luma(shape) - luma(background)|).
CONTRAST_AVERSION = 2.5

#: Shape "radius" (units of image width) per size, before size jitter.
SIZE_RADIUS: dict[str, float] = {"small": 0.095, "large": 0.14}
#: Distance of an edge position's centre from the image centre (units of image width).
POSITION_OFFSET = 0.245
POSITION_XY: dict[str, tuple[float, float]] = {
    "left": (0.5 - POSITION_OFFSET, 0.5),
    "right": (0.5 + POSITION_OFFSET, 0.5),
    "top": (0.5, 0.5 - POSITION_OFFSET),
    "bottom": (0.5, 0.5 + POSITION_OFFSET),
    "centre": (0.5, 0.5),
}

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def luma(rgb: tuple[float, float, float]) -> float:
    """BT.601 luma of an RGB triple in [0, 1]."""
    return sum(w * c for w, c in zip(LUMA, rgb))


#: Every attribute, by name, with its values (the slot attributes, then the background).
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "position": POSITIONS, "background": BACKGROUND_NAMES,
}

"""The built-in shapes world: captioned 32x32 images of one or two shapes, a miniature of
text-to-image data (under-specified captions, skewed priors, continuous nuisance).

Data and ground truth live here (attributes, scenes, captions, rendering, the data stream);
the world's rewards in :mod:`tiltgen.world.rewards` (registered as ``world-*`` rewards).
See docs/world.md.
"""

from .attributes import (ATTRIBUTE_VALUES, BACKGROUND_NAMES, BACKGROUNDS, COLOUR_NAMES, COLOURS, EDGE_POSITIONS,
                         POSITIONS, SHAPES, SIZES)
from .captions import (CHECKED, MAX_CAPTION_WORDS, WORDS, CaptionSpec, KeepProbabilities, ObjectSpec, caption,
                       caption_of, caption_words, full_spec, parse_caption, partial_caption, partial_spec, satisfied)
from .render import render_batch
from .scene import MAX_SHAPES, Nuisance, Scene, Shape, WorldConfig, sample_nuisance, sample_scene
from .stream import HELD_OUT_PAIRS, MISSING, Labels, batch, render, sample_item

__all__ = ["ATTRIBUTE_VALUES", "BACKGROUND_NAMES", "BACKGROUNDS", "COLOUR_NAMES", "COLOURS", "EDGE_POSITIONS",
           "POSITIONS", "SHAPES", "SIZES", "CHECKED", "MAX_CAPTION_WORDS", "WORDS", "CaptionSpec",
           "KeepProbabilities", "ObjectSpec", "caption", "caption_of", "caption_words", "full_spec", "parse_caption",
           "partial_caption", "partial_spec", "satisfied", "render_batch", "MAX_SHAPES", "Nuisance", "Scene", "Shape",
           "WorldConfig", "sample_nuisance", "sample_scene", "HELD_OUT_PAIRS", "MISSING", "Labels", "batch", "render",
           "sample_item"]

"""The built-in procedural text-to-image world (captioned images of one or two shapes)."""

from .shapes import (ALIASES, BACKGROUND_NAMES, BACKGROUNDS, COLOUR_NAMES, COLOURS, EDGE_POSITIONS, MAX_CAPTION_WORDS,
                     MAX_SHAPES, MAX_TOKENS, MIN_SIZE, MISSING, PAD, PAD_ID, POSITION_PHRASES, POSITIONS, SHAPES,
                     SIZES, VOCAB, WORD_TO_ID, WORDS, Labels, Scene, Shape, WorldConfig, batch, caption, detokenize,
                     layout, parse_caption, render, render_from_caption, render_with_masks, sample_item,
                     sample_scene, tokenize, tokenize_batch, vocabulary)

__all__ = ["ALIASES", "BACKGROUND_NAMES", "BACKGROUNDS", "COLOUR_NAMES", "COLOURS", "EDGE_POSITIONS",
           "MAX_CAPTION_WORDS", "MAX_SHAPES", "MAX_TOKENS", "MIN_SIZE", "MISSING", "PAD", "PAD_ID",
           "POSITION_PHRASES", "POSITIONS", "SHAPES", "SIZES", "VOCAB", "WORD_TO_ID", "WORDS", "Labels", "Scene",
           "Shape", "WorldConfig", "batch", "caption", "detokenize", "layout", "parse_caption", "render",
           "render_from_caption", "render_with_masks", "sample_item", "sample_scene", "tokenize",
           "tokenize_batch", "vocabulary"]

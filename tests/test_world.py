"""The world v2 data: captions at every level of detail, skewed priors, nuisance, exact labels."""

from collections import Counter

import numpy as np
import pytest
import torch

from tiltgen.errors import TiltgenError
from tiltgen.world import (HELD_OUT_PAIRS, MISSING, POSITIONS, WORDS, CaptionSpec, KeepProbabilities, ObjectSpec,
                           Scene, Shape, WorldConfig, batch, caption, caption_of, full_spec, parse_caption,
                           partial_caption, render, sample_item, sample_scene, satisfied)
from tiltgen.world.prompts import DEMO_PROMPTS, TWO_SHAPE_PROMPTS, evaluation_prompts, guidance_prompts, \
    held_out_prompts


def test_full_captions_round_trip():
    for i in range(300):
        scene, _ = sample_item(4, i)
        assert parse_caption(caption(scene)) == full_spec(scene)
        assert all(satisfied(full_spec(scene), scene).values())


def test_partial_captions_parse_and_are_satisfied_by_their_scene():
    g = np.random.default_rng(0)
    kinds = Counter()
    for i in range(400):
        scene, _ = sample_item(5, i)
        text = partial_caption(scene, g)
        spec = parse_caption(text)
        assert caption_of(spec) == text
        hits = satisfied(spec, scene)
        assert all(hits.values()), (text, scene)
        kinds[len(hits)] += 1
    assert kinds[0] > 10            # "" and background-free, count-free captions occur
    assert kinds[6] > 0 or kinds[5] > 0  # and (nearly) fully specified ones
    assert sum(v for k, v in kinds.items() if k <= 4) > 240  # most captions leave two or more attributes free


@pytest.mark.parametrize("text, objects, background", [
    ("", 0, None), ("a red shape", 1, None), ("two shapes", 2, None), ("a circle on the left", 1, None),
    ("a shape on a white background", 1, "white"), ("on a navy background", 0, "navy"),
    ("an orange ring and a small blue square at the top on a black background", 2, "black"),
])
def test_grammar(text, objects, background):
    spec = parse_caption(text)
    assert len(spec.objects) == objects and spec.background == background
    assert spec.count == (objects or None)


def test_specified_attributes_and_matching_ignores_object_order():
    spec = parse_caption("a red circle and a blue shape on the left")
    assert spec.specified() == ["count", "shape", "colour", "position"]
    scene = Scene((Shape("square", "blue", "small", "left"), Shape("circle", "red", "large", "top")), "gray")
    assert all(satisfied(spec, scene).values())
    wrong = Scene((Shape("square", "blue", "small", "right"), Shape("circle", "red", "large", "top")), "gray")
    hits = satisfied(spec, wrong)
    assert hits["colour"] and hits["shape"] and not hits["position"]
    one = Scene((Shape("circle", "red", "large", "top"),), "gray")
    assert satisfied(spec, one)["count"] is False
    assert satisfied(CaptionSpec(), one) == {}


@pytest.mark.parametrize("text, word", [("a red zebra", "zebra"), ("a grey circle", "grey"), ("draw me", "draw")])
def test_unknown_words_are_named(text, word):
    with pytest.raises(TiltgenError, match=repr(word)):
        parse_caption(text)


@pytest.mark.parametrize("text, match", [
    ("red a shape", "outside the world's grammar"), ("a red", "a shape"),
    ("a circle on the left and a square on the left", "same place"),
    ("a circle in the centre and a square on the left", "edges"),
    ("a circle and a square and a ring", "outside the world's grammar"),
])
def test_malformed_captions(text, match):
    with pytest.raises(TiltgenError, match=match):
        parse_caption(text)


def test_priors_are_skewed_and_held_out_pairs_can_be_excluded():
    config = WorldConfig(exclude_pairs=HELD_OUT_PAIRS)
    g = np.random.default_rng(1)
    scenes = [sample_scene(g, config) for _ in range(4000)]
    shapes = [s for scene in scenes for s in scene.shapes]
    colours = Counter(s.colour for s in shapes)
    assert colours["red"] > 2 * colours["cyan"]
    assert Counter(s.size for s in shapes)["small"] > 1.3 * Counter(s.size for s in shapes)["large"]
    assert 0.2 < sum(len(s.shapes) == 2 for s in scenes) / len(scenes) < 0.4
    assert not any((s.shape, s.colour) in HELD_OUT_PAIRS for s in shapes)
    # bright shapes on dark backgrounds (high contrast) are rarer than their marginals would make them
    yellow = [sc for sc in scenes if all(s.colour == "yellow" for s in sc.shapes)]
    assert sum(sc.background == "white" for sc in yellow) > sum(sc.background in ("black", "navy") for sc in yellow)


def test_batches_are_deterministic_and_labels_are_per_slot():
    x1, c1, l1 = batch(16, seed=3)
    x2, c2, l2 = batch(8, seed=3, start=8)
    assert torch.equal(x1[8:], x2) and c1[8:] == c2
    assert x1.shape == (16, 3, 32, 32) and 0 <= float(x1.min()) and float(x1.max()) <= 1
    for i, scene in enumerate(l1.scenes):
        assert int(l1.count[i]) == len(scene.shapes) == int(l1.occupied[i].sum())
        for s in scene.shapes:
            assert l1.occupied[i, POSITIONS.index(s.position)]
        empty = ~l1.occupied[i]
        assert (l1.shape[i][empty] == MISSING).all()
    _, partial, _ = batch(16, seed=3, partial=True)
    assert partial != c1


def test_nuisance_varies_images_of_one_scene():
    scene = Scene((Shape("square", "red", "large", "centre"),), "white")
    a, b = render(scene, rng=1), render(scene, rng=2)
    assert (a - b).abs().max() > 0.1
    assert torch.equal(render(scene), render(scene))


def test_prompt_sets_are_disjoint_from_guidance_training():
    train = guidance_prompts(100, seed=0)
    assert len(set(train)) == 100 and not set(train) & evaluation_prompts()
    assert "" in DEMO_PROMPTS and any(parse_caption(p).count == 2 for p in DEMO_PROMPTS)
    assert all(parse_caption(p).count == 2 for p in TWO_SHAPE_PROMPTS)
    assert all(any(pair[0] in p and pair[1] in p for pair in HELD_OUT_PAIRS) for p in held_out_prompts())
    assert all(parse_caption(p).count == 2 for p in guidance_prompts(20, two_shapes=True))


def test_vocabulary_and_keep_probabilities():
    assert "an" in WORDS and "shape" in WORDS and len(WORDS) == len(set(WORDS))
    scene = Scene((Shape("ring", "orange", "small", "left"),), "gray")
    everything = KeepProbabilities(unconditional=0, two_shapes=0, background_only=0, shape=1, colour=1, size=1,
                                   position=1, background=1)
    assert partial_caption(scene, 0, everything) == caption(scene) == \
        "a small orange ring on the left on a gray background"
    assert caption_of(CaptionSpec((ObjectSpec(colour="orange"),))) == "an orange shape"

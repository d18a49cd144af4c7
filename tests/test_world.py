import time

import numpy as np
import pytest
import torch

from tiltgen.errors import TiltgenError
from tiltgen.world import (BACKGROUNDS, COLOURS, MAX_TOKENS, MISSING, PAD_ID, POSITIONS, SHAPES, VOCAB, WORDS,
                           Scene, Shape, WorldConfig, batch, caption, detokenize, parse_caption, render,
                           render_from_caption, render_with_masks, sample_scene, tokenize, tokenize_batch,
                           vocabulary)


def test_batch_is_deterministic_and_per_sample():
    x1, c1, l1 = batch(10, seed=7)
    x2, c2, l2 = batch(10, seed=7)
    assert torch.equal(x1, x2) and c1 == c2 and l1.scenes == l2.scenes
    x5, c5, l5 = batch(5, seed=7)
    assert torch.equal(x5, x1[:5]) and c5 == c1[:5] and l5.scenes == l1.scenes[:5]
    xs, cs, _ = batch(5, seed=7, start=5)
    assert torch.equal(xs, x1[5:]) and cs == c1[5:]
    x3, c3, _ = batch(10, seed=8)
    assert not torch.equal(x1, x3)
    assert sample_scene(3) == sample_scene(3)


def test_batch_shapes_ranges_and_labels():
    x, caps, labels = batch(64, seed=1, config=WorldConfig(size=24))
    assert x.shape == (64, 3, 24, 24) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert len(caps) == len(labels) == 64
    assert labels.shape.shape == (64, 2) and labels.background.shape == (64,)
    for i, scene in enumerate(labels.scenes):
        assert caption(scene) == caps[i]
        assert labels.num_shapes[i] == len(scene.shapes)
        assert labels.background[i] == list(BACKGROUNDS).index(scene.background)
        for j in range(2):
            if j < len(scene.shapes):
                assert SHAPES[labels.shape[i, j]] == scene.shapes[j].shape
                assert POSITIONS[labels.position[i, j]] == scene.shapes[j].position
            else:
                assert labels.colour[i, j] == MISSING
    assert (labels.num_shapes == 2).any() and (labels.num_shapes == 1).any()


def test_caption_parse_round_trip():
    rng = np.random.default_rng(0)
    seen_two = 0
    for _ in range(200):
        scene = sample_scene(rng)
        seen_two += len(scene.shapes) == 2
        text = caption(scene)
        assert parse_caption(text) == scene
        assert set(text.split()) <= set(WORDS)
    assert seen_two > 20
    scene = parse_caption("A large red circle at the top on a grey background.")
    assert scene == Scene((Shape("circle", "red", "large", "top"),), "gray")
    assert caption(scene) == "a large red circle at the top on a gray background"


def test_tokenizer_round_trip():
    assert vocabulary()[0] == "<pad>" and list(VOCAB) == sorted(VOCAB) and PAD_ID == 0
    _, caps, _ = batch(50, seed=2)
    ids = tokenize_batch(caps)
    assert ids.shape == (50, MAX_TOKENS)
    for text, row in zip(caps, ids):
        assert detokenize(row) == text
        assert tokenize(text) == row.tolist()
    assert tokenize("a small blue ring in the centre on a navy background", length=12)[-1] == PAD_ID


def test_red_shape_pixels_and_background():
    scene = Scene((Shape("square", "red", "large", "centre"),), "gray")
    img, masks = render_with_masks(scene, 32)
    inside, outside = masks[0] > 0.999, masks[0] < 1e-6
    assert inside.sum() > 30 and outside.sum() > 500
    red = img[:, inside]
    assert (red[0] > 0.8).all() and (red[1] < 0.2).all() and (red[2] < 0.2).all()
    assert torch.allclose(img[:, outside], torch.full_like(img[:, outside], 0.5))


def _centre_of_mass(mask):
    h, w = mask.shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    m = mask.sum()
    return float((mask.sum(0) * xs).sum() / m), float((mask.sum(1) * ys).sum() / m)


@pytest.mark.parametrize("shape", SHAPES)
def test_positions_and_sizes(shape):
    for seed in range(3):
        for pos in POSITIONS:
            _, masks = render_with_masks(Scene((Shape(shape, "blue", "large", pos),), "white"), 32, rng=seed)
            x, y = _centre_of_mass(masks[0])
            assert {"left": x < 0.4 and abs(y - 0.5) < 0.15, "right": x > 0.6 and abs(y - 0.5) < 0.15,
                    "top": y < 0.4 and abs(x - 0.5) < 0.15, "bottom": y > 0.6 and abs(x - 0.5) < 0.15,
                    "centre": abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1}[pos], (pos, x, y)
        small = render_with_masks(Scene((Shape(shape, "blue", "small", "left"),), "white"), 32, rng=seed)[1]
        large = render_with_masks(Scene((Shape(shape, "blue", "large", "left"),), "white"), 32, rng=seed)[1]
        assert large.sum() > 1.8 * small.sum()


def test_two_shapes_distinct_positions_and_caption():
    scene = parse_caption("a small blue square on the left and a large yellow triangle on the right "
                          "on a white background")
    assert [s.position for s in scene.shapes] == ["left", "right"]
    img, masks = render_with_masks(scene, 32)
    assert masks.shape == (2, 32, 32)
    assert _centre_of_mass(masks[0])[0] < 0.5 < _centre_of_mass(masks[1])[0]
    for s in sample_scene(0, WorldConfig(p_two=1.0)).shapes:
        assert s.position != "centre"
    scenes = [sample_scene(i, WorldConfig(p_two=1.0)) for i in range(30)]
    assert all(len(s.shapes) == 2 and s.shapes[0].position != s.shapes[1].position for s in scenes)


def test_render_from_caption_jitters_by_seed():
    text = "a large green circle in the centre on a black background"
    a, b, c = (render_from_caption(text, 20, seed=s) for s in (0, 0, 1))
    assert a.shape == (3, 20, 20) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(render(parse_caption(text), 20)[:, 0, 0], torch.tensor(BACKGROUNDS["black"]))
    assert COLOURS["green"][1] > 0.5


def test_batch_speed():
    start = time.perf_counter()
    x, _, _ = batch(1000, seed=0)
    assert x.shape == (1000, 3, 32, 32)
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("text, word", [
    ("a large pink circle at the top on a gray background", "pink"),
    ("a large red hexagon at the top on a gray background", "hexagon"),
    ("a large red circle at the top on a beige background", "beige"),
])
def test_unknown_words_raise(text, word):
    with pytest.raises(TiltgenError, match=word):
        parse_caption(text)
    with pytest.raises(TiltgenError, match=word):
        tokenize(text)


@pytest.mark.parametrize("call", [
    lambda: parse_caption(""),
    lambda: parse_caption("a red large circle at the top on a gray background"),  # wrong order
    lambda: parse_caption("a large red circle at the top"),  # no background
    lambda: parse_caption("a large red circle at the top and a small red square at the top on a gray background"),
    lambda: parse_caption("a large red circle at the top on a gray background and"),
    lambda: tokenize("a large red circle at the top on a gray background", length=5),
    lambda: detokenize([999]),
    lambda: render(sample_scene(0), 15),
    lambda: WorldConfig(size=8),
    lambda: WorldConfig(max_shapes=3),
    lambda: WorldConfig(p_two=1.5),
    lambda: WorldConfig(colours=("red", "pink")),
    lambda: batch(0, seed=0),
    lambda: batch(3, seed=-1),
    lambda: Shape("circle", "mauve", "large", "top"),
    lambda: Scene((), "gray"),
])
def test_bad_inputs_raise(call):
    with pytest.raises(TiltgenError):
        call()

"""World rewards v2: a gold with real within-prompt spread, a proxy that tracks it on world images,
fidelity and the binary check from the attribute classifier, registered without an import."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from tiltgen.errors import TiltgenError
from tiltgen.rewards import get_reward
from tiltgen.world import HELD_OUT_PAIRS, WorldConfig, batch, full_spec, parse_caption, satisfied
from tiltgen.world.gold import gold_reward, gold_terms


@pytest.fixture(scope="module")
def world():
    return batch(6000, seed=123)


def test_gold_spreads_on_under_specified_prompts_and_not_on_full_ones(world):
    images, captions, labels = world
    gold = gold_reward(images)
    assert 0 <= float(gold.min()) and float(gold.max()) <= 1
    for prompt in ("", "a red shape", "two shapes", "a shape on a white background", "a large shape"):
        spec = parse_caption(prompt)
        rows = [i for i, s in enumerate(labels.scenes) if all(satisfied(spec, s).values())]
        assert len(rows) > 200 and float(gold[rows].std()) >= 0.1, prompt
    # one fully specified scene, drawn many times: only the nuisance varies
    scene = labels.scenes[0]
    rows = [i for i, s in enumerate(labels.scenes) if s == scene]
    from tiltgen.world import render
    same = torch.stack([render(scene, rng=i) for i in range(64)])
    assert float(gold_reward(same).std()) < 0.06 and len(rows) >= 1


def test_gold_prefers_what_the_prior_makes_rare():
    from tiltgen.world import Scene, Shape, render

    dull = render(Scene((Shape("circle", "yellow", "small", "left"),), "white"))
    bold = render(Scene((Shape("circle", "yellow", "large", "centre"),), "navy"))
    balanced = render(Scene((Shape("square", "blue", "large", "left"), Shape("square", "orange", "large", "right")),
                            "black"))
    g = gold_reward(torch.stack([dull, bold, balanced]))
    assert g[1] > g[0] + 0.3 and g[2] > g[0] + 0.3
    x = bold[None].clone().requires_grad_(True)
    gold_reward(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert set(gold_terms(x.detach())) == {"contrast", "balance", "prominence", "colourfulness", "clean"}
    noisy = (bold + 0.3 * torch.randn(bold.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert gold_reward(noisy[None]) < 0.2 < g[1]  # clutter is not vividness


def test_proxy_tracks_the_gold_on_world_images(world):
    images, captions, _ = world
    proxy = get_reward("world-proxy")
    with torch.no_grad():
        p, g = proxy(images[:2000], captions[:2000]), gold_reward(images[:2000])
    agree = ((p[:, None] - p[None]) * (g[:, None] - g[None]) > 0).float().mean() * 2000 / 1999
    assert float(torch.corrcoef(torch.stack([p, g]))[0, 1]) > 0.85 and float(agree) > 0.8
    x = images[:4].clone().requires_grad_(True)
    proxy(x, captions[:4]).sum().backward()
    assert x.grad.abs().sum() > 0


def test_classifier_reads_world_images_including_unseen_pairs():
    from tiltgen.world.rewards import AttributeReader

    images, _, labels = batch(1500, seed=7, config=WorldConfig(exclude_pairs=()))
    readings = AttributeReader().read(images)
    hits = [satisfied(full_spec(s), r) for s, r in zip(labels.scenes, readings)]
    for kind in ("count", "shape", "colour", "size", "position", "background"):
        assert np.mean([h[kind] for h in hits]) > 0.95, kind
    held = [h for s, h in zip(labels.scenes, hits) if any((x.shape, x.colour) in HELD_OUT_PAIRS for x in s.shapes)]
    assert len(held) > 20 and np.mean([all(h.values()) for h in held]) > 0.8


def test_fidelity_and_binary_rewards(world):
    images, captions, labels = world
    fidelity, binary = get_reward("world-fidelity"), get_reward("world-binary")
    assert fidelity.differentiable and not binary.differentiable
    x, caps = images[:200], captions[:200]
    with torch.no_grad():
        right = fidelity(x, caps)
        wrong = fidelity(x, ["a small purple cross on the right and a large cyan ring at the top on a gray background"]
                         * 200)
    assert float(right.mean()) > 0.8 and float(wrong.mean()) < 0.05
    assert float(binary(x, caps).mean()) > 0.9
    assert float(binary(x, ["two shapes"] * 200).mean()) == pytest.approx(
        float((labels.count[:200] == 2).float().mean()), abs=0.05)
    assert torch.equal(fidelity(x[:3], ""), torch.ones(3))


def test_bad_input():
    gold = get_reward("world-gold")
    with pytest.raises(TiltgenError, match="32x32"):
        gold(torch.rand(2, 3, 16, 16))
    with pytest.raises(TiltgenError, match="2 images but 3 captions"):
        get_reward("world-fidelity")(torch.rand(2, 3, 32, 32), ["a", "b", "c"])
    with pytest.raises(TiltgenError, match="'zebra'"):
        get_reward("world-binary")(torch.rand(1, 3, 32, 32), ["a zebra"])
    with pytest.raises(TiltgenError, match="does not exist"):
        get_reward("world-proxy", weights="/no/such/folder")
    with pytest.raises(TiltgenError, match="unknown reward"):
        get_reward("world-nonsense")


def test_reward_layer_does_not_import_the_world():
    code = ("import sys, tiltgen.rewards as r; assert 'tiltgen.world' not in sys.modules; "
            "r.get_reward('world-gold'); assert 'tiltgen.world.rewards' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

"""Rewards of the built-in shapes world: gold, proxy, prompt fidelity (shipped weights, no retraining)."""

import pytest
import torch

from tiltgen.builtin import BUILTIN_WORLD
from tiltgen.core.reward import evaluate_reward, reward_gradient
from tiltgen.errors import TiltgenError
from tiltgen.rewards import available_rewards, get_reward
from tiltgen.world import COLOUR_NAMES, Scene, Shape, batch, caption, render
from tiltgen.world import reward_nets
from tiltgen.world.rewards import (WorldFidelity, WorldFidelityMatch, WorldGold, WorldProxy, attribute_agreement,
                                   caption_targets, classify, gold_reward, gold_terms)

SEED = 4242  # a stream neither network was trained or evaluated on


def _render(shape="circle", colour="red", size="large", position="centre", background="gray"):
    return render(Scene((Shape(shape, colour, size, position),), background), size=16)[None]


def _wrong_colour(text):
    for c in COLOUR_NAMES:
        if f" {c} " in text:
            other = COLOUR_NAMES[(COLOUR_NAMES.index(c) + 3) % len(COLOUR_NAMES)]
            return text.replace(f" {c} ", f" {other} ", 1)
    raise AssertionError(text)


@pytest.fixture(scope="module")
def world():
    return batch(400, seed=SEED, config=BUILTIN_WORLD)


# --------------------------------------------------------------------------------------------
# gold
# --------------------------------------------------------------------------------------------

def test_gold_prefers_centred_colourful_contrasting_shapes():
    centred, left = _render(position="centre"), _render(position="left")
    assert gold_reward(centred) > gold_reward(left) + 0.1
    assert gold_terms(centred)["centring"] > 0.85 > 0.4 > gold_terms(left)["centring"]
    # same luminance everywhere, only the colour removed: colourfulness alone decides
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    gray = (centred * luma).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    assert gold_reward(centred) > gold_reward(gray) + 0.1
    assert gold_terms(gray)["colourfulness"] < 0.01
    # yellow on black contrasts more than yellow on white
    assert gold_terms(_render(colour="yellow", background="black"))["contrast"] > \
        gold_terms(_render(colour="yellow", background="white"))["contrast"] + 0.3
    # an empty image scores near zero on centring and contrast
    blank = torch.full((1, 3, 16, 16), 0.5)
    terms = gold_terms(blank)
    assert terms["centring"] < 0.05 and terms["contrast"] < 0.05


def test_gold_range_gradients_dtype_and_noise_robustness(world):
    x, _, _ = world
    r = gold_reward(x)
    assert r.shape == (400,) and r.min() >= 0 and r.max() <= 1
    assert 0.05 < float(r.std()) < 0.3
    xg = x[:8].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gold_reward(xg).sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.isfinite(reward_gradient(WorldGold(), torch.full((2, 3, 16, 16), 0.5))).all()  # flat images too
    assert gold_reward(x.double()).dtype == torch.float64
    assert torch.allclose(gold_reward(x[:8].to(torch.bfloat16)).float(), r[:8], atol=0.02)
    # pixel noise is not mistaken for colour or foreground (the terms use a 3x3-blurred image)
    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert abs(float(gold_reward(noisy).mean() - r.mean())) < 0.03


# --------------------------------------------------------------------------------------------
# attribute classifier and fidelity
# --------------------------------------------------------------------------------------------

def test_classifier_accuracy_on_fresh_world_images(world):
    x, captions, labels = world
    agreement = attribute_agreement(x, captions)
    assert set(agreement) == {"shape", "colour", "size", "position", "background", "all"}
    for name in ("shape", "colour", "size", "position", "background"):
        assert agreement[name] >= 0.95, agreement
    pred = classify(x[:10])
    assert pred["colour"].dtype == torch.long and torch.equal(pred["colour"], labels.colour[:10, 0])


def test_fidelity_prefers_the_true_caption(world):
    x, captions, _ = world
    reward = get_reward("world-fidelity")
    true = reward(x[:100], captions[:100])
    wrong = reward(x[:100], [_wrong_colour(c) for c in captions[:100]])
    assert true.min() >= 0 and true.max() <= 1
    assert float(true.mean()) > 0.9 and float((true > wrong).float().mean()) >= 0.95
    assert float(true.mean() - wrong.mean()) > 0.15  # one attribute of five: at most 0.2
    # a single caption is repeated for every image
    one = reward(x[:3], captions[0])
    assert torch.allclose(one[0], true[0])
    grad = reward_gradient(reward, x[:4], captions[:4])
    assert grad.shape == x[:4].shape and grad.abs().sum() > 0


def test_fidelity_match_is_zero_one_and_not_differentiable(world):
    x, captions, _ = world
    match = get_reward("world-fidelity-match")
    assert match.differentiable is False and isinstance(match, WorldFidelityMatch)
    values = match(x[:100], captions[:100])
    assert set(values.unique().tolist()) <= {0.0, 1.0}
    assert float(values.mean()) >= 0.9
    assert float(match(x[:100], [_wrong_colour(c) for c in captions[:100]]).mean()) <= 0.05


def test_caption_targets_follow_the_world_indices(world):
    _, captions, labels = world
    t = caption_targets(captions[:20])
    assert torch.equal(t[:, 0], labels.shape[:20, 0]) and torch.equal(t[:, 4], labels.background[:20])


# --------------------------------------------------------------------------------------------
# proxy
# --------------------------------------------------------------------------------------------

def test_proxy_agrees_with_gold_on_held_out_pairs(world):
    x, _, _ = world
    g = torch.Generator().manual_seed(SEED)
    images = torch.cat([x, reward_nets.perturb(x, g)])
    proxy = get_reward("world-proxy")
    assert proxy.differentiable is True and isinstance(proxy, WorldProxy)
    with torch.no_grad():
        p = proxy(images)
    gold = gold_reward(images)
    metrics = reward_nets.preference_metrics(p, gold, pairs=4000, seed=SEED)
    assert metrics["pairwise_agreement"] >= 0.75, metrics
    assert metrics["spearman"] > 0.6, metrics
    # normalised to gold's scale on world images, so one beta tilts both alike
    assert 0.6 < float(p[:400].std() / gold[:400].std()) < 1.6
    assert abs(float(p[:400].mean() - gold[:400].mean())) < 0.1
    grad = reward_gradient(proxy, x[:4], None)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert proxy(x[:4].double()).dtype == torch.float64


# --------------------------------------------------------------------------------------------
# registry and errors
# --------------------------------------------------------------------------------------------

def test_registry_names_resolve(world):
    x, captions, _ = world
    names = {"world-gold": True, "world-proxy": True, "world-fidelity": True, "world-fidelity-match": False}
    assert set(names) <= set(available_rewards())
    for name, differentiable in names.items():
        reward = get_reward(name)
        assert reward.differentiable is differentiable and reward.name == name
        assert evaluate_reward(reward, x[:5], captions[:5]).shape == (5,)
    assert get_reward("jpeg").differentiable is False  # the compressibility reward of the docs table


def test_bad_input_raises_clear_errors(world, tmp_path):
    x, captions, _ = world
    fid = WorldFidelity()
    with pytest.raises(TiltgenError, match="16x16"):
        fid(torch.rand(2, 3, 32, 32), captions[:2])
    with pytest.raises(TiltgenError, match=r"RGB images \[N, 3, H, W\]"):
        WorldGold()(torch.rand(2, 1, 16, 16))
    with pytest.raises(TiltgenError, match="RGB images"):
        get_reward("world-proxy")(torch.rand(3, 16, 16))
    with pytest.raises(TiltgenError, match="2 images but 3 captions"):
        fid(x[:2], captions[:3])
    with pytest.raises(TiltgenError, match="no captions"):
        fid(x[:2], None)
    with pytest.raises(TiltgenError, match="unknown word 'dog'"):
        fid(x[:1], ["a large red dog in the centre on a gray background"])
    with pytest.raises(TiltgenError, match="malformed caption"):
        WorldFidelityMatch()(x[:1], ["a large red circle on a gray background"])
    two = caption(Scene((Shape("circle", "red", "large", "left"), Shape("ring", "blue", "small", "right")), "gray"))
    with pytest.raises(TiltgenError, match="one-shape captions"):
        fid(x[:1], [two])
    with pytest.raises(TiltgenError, match="one-shape captions"):
        attribute_agreement(x[:1], [two])
    with pytest.raises(TiltgenError, match="does not exist"):
        get_reward("world-proxy", weights=str(tmp_path / "missing"))
    with pytest.raises(TiltgenError, match="lacks"):
        WorldFidelity(weights=tmp_path)(x[:1], captions[:1])
    with pytest.raises(TiltgenError, match="unknown built-in"):
        WorldFidelity(weights="builtin:no-such-net")


# --------------------------------------------------------------------------------------------
# training code (a few steps only; the shipped weights are not retrained here)
# --------------------------------------------------------------------------------------------

def test_training_smoke_is_deterministic_and_round_trips(tmp_path):
    runs = [reward_nets.train_classifier(seed=1, steps=3, batch_size=16, eval_n=40, progress=False)
            for _ in range(2)]
    (m1, cfg), (m2, _) = runs
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert set(cfg["metrics"]["accuracy"]["clean"]) == {"shape", "colour", "size", "position", "background", "all"}
    reward_nets.save_network(m1, cfg, tmp_path / "cls")
    x, captions, _ = batch(4, seed=SEED, config=BUILTIN_WORLD)
    with torch.no_grad():
        expected = _fidelity_of(m1, x, captions)
    assert torch.allclose(WorldFidelity(weights=tmp_path / "cls")(x, captions), expected, atol=1e-5)

    proxy, pcfg = reward_nets.train_proxy(seed=1, steps=3, batch_pairs=8, pool=200, num_pairs=400, eval_n=100,
                                          progress=False)
    t = pcfg["training"]
    assert 0.7 < t["label_agreement_with_gold"] < 0.9  # tau makes ~20 % of the labels contradict gold
    reward_nets.save_network(proxy, pcfg, tmp_path / "proxy")
    loaded = WorldProxy(weights=tmp_path / "proxy")
    with torch.no_grad():
        assert torch.allclose(loaded(x), proxy(x), atol=1e-5)
    with pytest.raises(TiltgenError, match="expected 'attribute-classifier'"):
        WorldFidelity(weights=tmp_path / "proxy")(x, captions)


def _fidelity_of(model, x, captions):
    targets = caption_targets(captions)
    probs = [p.softmax(1) for p in model(x).values()]
    return torch.stack([p.gather(1, targets[:, i:i + 1]).squeeze(1) for i, p in enumerate(probs)], 1).mean(1)

"""The image reward zoo on tiny configs: shapes, gradients, loading, key conversion round trips, errors."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tiltgen import TiltgenError  # noqa: E402
from tiltgen.rewards import get_reward, reward_from_spec, WeightedReward  # noqa: E402
from tiltgen.rewards.checkpoints import (hf_to_image_reward, hf_to_open_clip, image_reward_to_hf,  # noqa: E402
                                         load_strict, open_clip_to_hf)
from tiltgen.rewards.simple import Brightness, JpegCompressibility, Saturation  # noqa: E402

IMAGES = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a cat", "a dog", "a red cat"]


def _grad_ok(reward, prompts=None):
    x = IMAGES.clone().requires_grad_(True)
    r = reward(x, prompts)
    assert r.shape == (3,) and torch.isfinite(r).all()
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    return r


def test_simple_rewards():
    b = _grad_ok(Brightness())
    assert float(Brightness()(torch.ones(1, 3, 4, 4))) == pytest.approx(1.0)
    assert float(Brightness()(torch.zeros(1, 3, 4, 4))) == 0.0
    _grad_ok(Saturation())
    _grad_ok(Saturation(soft=0.05))
    gray = torch.full((1, 3, 4, 4), 0.5)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    assert float(Saturation()(gray)) == pytest.approx(0.0) and float(Saturation()(red)) > 0.99
    jpeg = JpegCompressibility()
    assert not jpeg.differentiable
    flat, noisy = torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32)
    assert float(jpeg(flat)) > float(jpeg(noisy))  # smaller file = higher reward
    assert b.dtype == torch.float32
    with pytest.raises(TiltgenError, match="images"):
        Brightness()(torch.zeros(2, 5))


def test_weighted_spec():
    r = reward_from_spec("brightness:2, saturation(soft=0.1):-0.5")
    assert isinstance(r, WeightedReward) and r.differentiable
    expected = 2 * Brightness()(IMAGES) - 0.5 * Saturation(soft=0.1)(IMAGES)
    torch.testing.assert_close(r(IMAGES, None), expected)
    assert set(r.last_terms) == {"brightness", "saturation"}
    assert not reward_from_spec("brightness:1,jpeg:0.1").differentiable
    assert isinstance(reward_from_spec("brightness"), Brightness)
    with pytest.raises(TiltgenError, match="unknown reward 'pickscor'"):
        reward_from_spec("pickscor:1")
    with pytest.raises(TiltgenError, match="cannot parse"):
        reward_from_spec("brightness:abc")
    with pytest.raises(TiltgenError, match="saturation"):
        reward_from_spec("saturation(sfot=1)")


# ---- CLIP family --------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
import diffusers_tiny as tiny  # noqa: E402


def _tiny_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=54, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=8, bos_token_id=52, eos_token_id=53, pad_token_id=53, hidden_act="gelu")
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=16, hidden_act="gelu")
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    _tiny_clip().save_pretrained(path)
    tiny.clip_tokenizer(8).save_pretrained(path)
    return path


def test_clipscore_and_pickscore_from_a_local_folder(clip_dir):
    clip = get_reward("clipscore", model=str(clip_dir))
    r = _grad_ok(clip, PROMPTS)
    assert float(r.detach().abs().max()) <= 100 + 1e-3
    pick = get_reward("pickscore", model=str(clip_dir))
    rp = _grad_ok(pick, PROMPTS)
    scale = float(pick.model.logit_scale.exp())
    torch.testing.assert_close(rp, r / 100 * scale, rtol=1e-4, atol=1e-5)
    # a single prompt is shared; a count mismatch is an error
    assert clip(IMAGES, "a cat").shape == (3,)
    with pytest.raises(TiltgenError, match="3 images but 2 prompts"):
        clip(IMAGES, ["a", "b"])
    with pytest.raises(TiltgenError, match="no prompts"):
        clip(IMAGES, None)


def test_open_clip_conversion_round_trip_and_hpsv2_load(clip_dir, tmp_path):
    model = _tiny_clip()
    hf = model.state_dict()
    oc = hf_to_open_clip(hf)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in oc and "text_projection" in oc
    assert not any(k.startswith(("vision_model", "text_model")) for k in oc)
    back = open_clip_to_hf(oc)
    assert set(back) == set(hf)
    for k in hf:
        torch.testing.assert_close(back[k], hf[k], rtol=0, atol=0)
    torch.save(oc, tmp_path / "hps.pt")
    hps = get_reward("hpsv2", checkpoint=str(tmp_path / "hps.pt"), clip=str(clip_dir))
    ref = get_reward("clipscore", model=str(clip_dir), scale=1.0)
    torch.testing.assert_close(hps(IMAGES, PROMPTS), ref(IMAGES, PROMPTS), rtol=1e-5, atol=1e-6)
    _grad_ok(hps, PROMPTS)


def test_open_clip_attention_split_matches_multihead_attention():
    """open_clip's fused in_proj (nn.MultiheadAttention) equals transformers' q/k/v projections."""
    from transformers.models.clip.modeling_clip import CLIPAttention

    model = _tiny_clip()
    attn: CLIPAttention = model.vision_model.encoder.layers[0].self_attn
    oc = hf_to_open_clip(model.state_dict())
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    prefix = "visual.transformer.resblocks.0.attn."
    mha.load_state_dict({"in_proj_weight": oc[prefix + "in_proj_weight"], "in_proj_bias": oc[prefix + "in_proj_bias"],
                         "out_proj.weight": oc[prefix + "out_proj.weight"], "out_proj.bias": oc[prefix + "out_proj.bias"]})
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ours = attn(x)[0]
        theirs = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_unexpected_and_missing_keys_are_named(clip_dir, tmp_path):
    oc = hf_to_open_clip(_tiny_clip().state_dict())
    oc["visual.extra_head.weight"] = torch.zeros(2)
    del oc["ln_final.bias"]
    torch.save(oc, tmp_path / "bad.pt")
    with pytest.raises(TiltgenError, match=r"unexpected keys: visual\.extra_head\.weight.*missing keys: "
                                           r"text_model\.final_layer_norm\.bias"):
        get_reward("hpsv2", checkpoint=str(tmp_path / "bad.pt"), clip=str(clip_dir))
    with pytest.raises(TiltgenError, match="does not exist"):
        get_reward("hpsv2", checkpoint=str(tmp_path / "missing.pt"), clip=str(clip_dir))
    with pytest.raises(TiltgenError, match="'org/not-cached' is neither a local path nor in the local"):
        get_reward("clipscore", model="org/not-cached")


def test_aesthetic_head(clip_dir, tmp_path):
    from safetensors.torch import save_file

    from tiltgen.rewards.clip_rewards import AestheticMLP

    torch.manual_seed(1)
    head = AestheticMLP(8)
    assert sorted({k.split(".")[1] for k in head.state_dict()}) == ["0", "2", "4", "6", "7"]
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    reward = get_reward("aesthetic", head=str(tmp_path / "head.safetensors"), clip=str(clip_dir))
    r = _grad_ok(reward)
    from tiltgen.rewards.clip_rewards import preprocess

    with torch.no_grad():
        feats = reward.clip.get_image_features(pixel_values=preprocess(IMAGES, 32))
        feats = torch.nn.functional.normalize(getattr(feats, "pooler_output", feats), dim=-1)
        torch.testing.assert_close(r.detach(), head.eval()(feats).squeeze(-1), rtol=1e-5, atol=1e-6)
    bad = dict(head.state_dict())
    bad["layers.1.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad_head.pth")
    with pytest.raises(TiltgenError, match=r"unexpected keys: layers\.1\.weight"):
        get_reward("aesthetic", head=str(tmp_path / "bad_head.pth"), clip=str(clip_dir))


# ---- BLIP / ImageReward ----------------------------------------------------------------------------
def _tiny_image_reward():
    from tiltgen.rewards.blip import ImageRewardModel, image_reward_configs

    torch.manual_seed(0)
    vision, text = image_reward_configs(
        vision=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                    patch_size=16),
        text=dict(vocab_size=54, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=40, encoder_hidden_size=16, pad_token_id=53, bos_token_id=52,
                  sep_token_id=53))
    return ImageRewardModel(vision, text, head_hidden=(12, 8, 6, 4)).eval()


def test_image_reward_conversion_round_trip_and_score(tmp_path):
    from tiltgen.rewards.blip import ImageReward

    model = _tiny_image_reward()
    hf = model.state_dict()
    published = hf_to_image_reward(hf)
    assert "blip.visual_encoder.blocks.0.attn.qkv.weight" in published and "mlp.layers.7.bias" in published
    assert "blip.visual_encoder.cls_token" in published and "blip.text_encoder.embeddings.word_embeddings.weight" in published
    published["blip.vision_proj.weight"] = torch.zeros(3, 3)  # pre-training leftovers are dropped
    back = image_reward_to_hf(published)
    assert set(back) == set(hf)
    torch.manual_seed(123)
    from tiltgen.rewards.blip import ImageRewardModel

    other = ImageRewardModel(model.vision.config, model.text.config, head_hidden=(12, 8, 6, 4)).eval()
    load_strict(other, back, "test")
    reward = ImageReward(other, tiny.clip_tokenizer(40), max_length=10)
    ref = ImageReward(model, tiny.clip_tokenizer(40), max_length=10)
    torch.testing.assert_close(reward(IMAGES, PROMPTS), ref(IMAGES, PROMPTS))
    _grad_ok(reward, PROMPTS)
    published["blip.surprise.weight"] = torch.zeros(1)
    with pytest.raises(TiltgenError, match=r"unexpected keys: blip\.surprise\.weight"):
        load_strict(other, image_reward_to_hf(published), "ImageReward checkpoint")

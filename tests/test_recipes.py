"""The recipes' shared training loop: an interrupted run resumes exactly, a changed configuration
is refused with the differing keys named; the caption and cache helpers are deterministic."""

import argparse

import pytest
import torch

from tiltgen.builtin.recipes.common import CHECKPOINT, Trainer, cached, differing_keys
from tiltgen.builtin.recipes.latents import training_captions
from tiltgen.errors import TiltgenError
from tiltgen.world import parse_caption, sample_item


def _args(**kw):
    base = dict(out="x", steps=6, batch_size=4, lr=1e-2, seed=0, threads=0, checkpoint_every=2, resume=False)
    base.update(kw)
    return argparse.Namespace(**base)


def _loss(module):
    def loss_at(step, g):
        x = torch.randn(4, 3, generator=g)
        return (module(x) - x.sum(1, keepdim=True)).pow(2).mean()
    return loss_at


def _trainer(args):
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    return Trainer({"m": module}, args), module


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    full, module = _trainer(_args())
    (tmp_path / "a").mkdir()
    full.run(_loss(module), tmp_path / "a", "full")

    first, m1 = _trainer(_args(steps=6))
    work = tmp_path / "b"
    work.mkdir()
    def interrupting(step, g):
        if step == 4:
            raise KeyboardInterrupt
        return _loss(m1)(step, g)

    with pytest.raises(KeyboardInterrupt):
        first.run(interrupting, work, "interrupted")
    assert (work / CHECKPOINT).is_file()
    second, m2 = _trainer(_args(resume=True))
    second.run(_loss(m2), work, "resumed")
    assert second.step == 6 and len(second.losses) == 6
    assert torch.allclose(m2.weight, module.weight) and torch.allclose(second.ema["m"].weight, full.ema["m"].weight)


def test_resume_with_other_settings_is_refused(tmp_path):
    trainer, module = _trainer(_args(steps=2))
    trainer.run(_loss(module), tmp_path, "short")
    other, m = _trainer(_args(steps=2, lr=0.5, resume=True))
    with pytest.raises(TiltgenError, match="lr"):
        other.run(_loss(m), tmp_path, "other")
    assert differing_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b", "c"]


def test_training_captions_and_cache(tmp_path, monkeypatch):
    scenes = [sample_item(0, i)[0] for i in range(50)]
    a, b = training_captions(scenes, 0, 3), training_captions(scenes, 0, 3)
    assert a == b and a != training_captions(scenes, 0, 4)
    for text in a:
        parse_caption(text)
    monkeypatch.setenv("TILTGEN_RECIPE_CACHE", str(tmp_path))
    calls = []
    build = lambda: calls.append(1) or {"x": torch.arange(3)}  # noqa: E731
    assert torch.equal(cached("t", {"k": 1}, build)["x"], cached("t", {"k": 1}, build)["x"])
    assert len(calls) == 1


def test_weights_fingerprint_follows_the_weights():
    from tiltgen.builtin.recipes.common import weights_fingerprint

    _, a = _trainer(_args())
    _, b = _trainer(_args())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-3
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_v_loss_weight_is_min_snr_with_a_floor():
    """gamma = 0 is the unweighted v loss; otherwise min(SNR, gamma) / (SNR + 1), never below the floor."""
    from tiltgen.builtin.recipes.diffusion import v_loss_weight
    from tiltgen.builtin.recipes.pipelines import sd_scheduler

    scheduler = sd_scheduler()
    k = torch.tensor([0, 100, 500, 900, 999])
    assert torch.equal(v_loss_weight(scheduler, k, 0.0, 0.3), torch.ones(5))
    abar = scheduler.alphas_cumprod[k].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    torch.testing.assert_close(v_loss_weight(scheduler, k, 5.0, 0.0), expected.float())
    floored = v_loss_weight(scheduler, k, 5.0, 0.3)
    assert floored.min() >= 0.3 and floored[0] == pytest.approx(0.3) and floored[-1] == pytest.approx(0.3)
    # at the timestep whose SNR is nearest gamma the weight peaks at about gamma / (gamma + 1)
    every = torch.arange(1000)
    snr_all = scheduler.alphas_cumprod.double() / (1 - scheduler.alphas_cumprod.double())
    peak = v_loss_weight(scheduler, every, 5.0, 0.3)
    assert int(peak.argmax()) == int((snr_all - 5).abs().argmin())
    assert float(peak.max()) == pytest.approx(5 / 6, abs=0.01)


def test_timestep_range_of_a_second_phase():
    from tiltgen.builtin.recipes.diffusion import timestep_range
    from tiltgen.errors import TiltgenError

    assert timestep_range(None, 1000) == (0, 1000)
    assert timestep_range("500,1000", 1000) == (500, 1000)
    for bad in ("500", "a,b", "600,500", "0,1001", "-1,10"):
        with pytest.raises(TiltgenError, match="--timesteps"):
            timestep_range(bad, 1000)


def test_teacher_velocity_routes_each_timestep_to_its_teacher(tmp_path):
    """--teachers HIGH,LOW: rows at k >= switch get HIGH's v (with HIGH's text encoder), rows below LOW's."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from tiltgen.builtin.recipes.diffusion import encode_prompts, load_teachers, teacher_velocity
    from tiltgen.builtin.recipes.pipelines import SD_TEXT_DIM, sd_unet_config
    from tiltgen.builtin.recipes.text import clip_text_config, clip_tokenizer
    from tiltgen.errors import TiltgenError

    tokenizer = clip_tokenizer()
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append((UNet2DConditionModel(**sd_unet_config()).eval(),
                         CLIPTextModel(clip_text_config(len(tokenizer), SD_TEXT_DIM)).eval()))
    z_t = torch.randn(4, 4, 8, 8)
    k = torch.tensor([900, 100, 500, 499])
    prompts = ["a red shape", "", "two shapes", "a circle on the left"]
    got = teacher_velocity(teachers, tokenizer, z_t, k, prompts, switch=500)
    with torch.no_grad():
        for i, j in enumerate([0, 1, 0, 1]):
            unet, text_encoder = teachers[j]
            want = unet(z_t[i:i + 1], k[i:i + 1], encoder_hidden_states=encode_prompts(tokenizer, text_encoder,
                                                                                    prompts[i:i + 1])).sample
            torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)
    assert load_teachers(None) == []
    with pytest.raises(TiltgenError, match="--teachers takes HIGH,LOW"):
        load_teachers("only-one")
    with pytest.raises(TiltgenError, match="teacher pipeline"):
        load_teachers(f"{tmp_path / 'missing'},{tmp_path / 'missing'}")


def test_flow_loss_weight_is_min_snr_on_the_x0_error():
    """gamma = 0: unweighted. Otherwise min(SNR, gamma) t^2 (the velocity error is the x0 error
    over t), scaled to mean 1 under the logit-normal times the recipe samples."""
    from tiltgen.builtin.recipes.flow import flow_loss_weight

    t = torch.tensor([0.1, 0.3, 0.5, 0.9])
    assert torch.equal(flow_loss_weight(t, 0.0), torch.ones(4))
    w = flow_loss_weight(t, 5.0).double()
    snr = ((1 - t.double()) / t.double()) ** 2
    ratio = w / (torch.clamp(snr, max=5.0) * t.double() ** 2)
    torch.testing.assert_close(ratio, ratio[0].expand(4))  # one normalising constant
    g = torch.Generator().manual_seed(0)
    assert float(flow_loss_weight(torch.sigmoid(torch.randn(400_000, generator=g)), 5.0).mean()) == pytest.approx(1, abs=0.01)
    grid = torch.linspace(0.01, 0.99, 981)
    assert float(grid[flow_loss_weight(grid, 5.0).argmax()]) == pytest.approx(1 / (1 + 5 ** 0.5), abs=0.002)


def test_teacher_flow_velocity_is_exact_for_an_exact_vp_teacher():
    """A VP v-prediction teacher that is exact for a point mass x0 (in its own, shifted latent
    space) must give the flow velocity eps - x0 of that point mass, at flow times snapped to the
    teacher's grid of equal SNR; the snapped times are the grid points nearest to the asked ones."""
    from tiltgen.builtin.recipes.flow import snap_times, teacher_flow_velocity, teacher_times
    from tiltgen.builtin.recipes.pipelines import sd_scheduler

    abar = sd_scheduler().alphas_cumprod
    grid = teacher_times(abar)
    assert bool((grid[1:] > grid[:-1]).all())
    snr_flow = ((1 - grid) / grid) ** 2
    torch.testing.assert_close(snr_flow, abar.double() / (1 - abar.double()), rtol=1e-9, atol=0)
    t_asked = torch.tensor([0.01, 0.2, 0.5, 0.77, 0.999], dtype=torch.float64)
    k, t = snap_times(t_asked, grid)
    assert torch.equal(k, (grid.view(1, -1) - t_asked.view(-1, 1)).abs().argmin(1))
    torch.testing.assert_close(t, grid[k])

    offset = 0.7
    g = torch.Generator().manual_seed(0)
    x0_flow = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64).expand(5, -1, -1, -1)
    eps = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0_flow + tt * eps

    class ExactUNet:
        """v = alpha eps - sigma x0 for the point mass x0_flow + offset (the teacher's latents)."""

        def __call__(self, z, k, encoder_hidden_states):
            a = abar.double()[k].sqrt().view(-1, 1, 1, 1)
            s = (1 - abar.double()[k]).sqrt().view(-1, 1, 1, 1)
            x0 = x0_flow + offset
            noise = (z.double() - a * x0) / s
            return argparse.Namespace(sample=(a * noise - s * x0).float())

    teacher = (ExactUNet(), lambda ids: (torch.zeros(ids.shape[0], ids.shape[1], 8),))
    from tiltgen.builtin.recipes.text import clip_tokenizer

    got = teacher_flow_velocity(teacher, clip_tokenizer(), abar, x_t.float(), k, t, [""] * 5, offset)
    torch.testing.assert_close(got.double(), eps - x0_flow, atol=1e-4, rtol=1e-4)  # float32 UNet input


def test_flow_transformer_patch_size_keeps_the_parameters_and_the_latent_shape():
    """Patch 1 gives 64 image tokens on the 8x8 latents instead of 16, with the same weights
    count up to the patch embedding and output projection; other sizes are refused."""
    from diffusers import SD3Transformer2DModel

    from tiltgen.builtin.recipes.pipelines import sd3_transformer_config

    torch.manual_seed(0)
    counts = {}
    for patch in (1, 2):
        model = SD3Transformer2DModel(**sd3_transformer_config(patch))
        counts[patch] = sum(p.numel() for p in model.parameters())
        text = torch.randn(2, 5, model.config.joint_attention_dim)
        pooled = torch.randn(2, model.config.pooled_projection_dim)
        with torch.no_grad():
            out = model(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([10.0, 900.0]),
                        encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert abs(counts[1] - counts[2]) / counts[2] < 0.01
    with pytest.raises(ValueError, match="patch_size"):
        sd3_transformer_config(4)


def test_disabled_pooled_projection_leaves_the_prompt_to_joint_attention_only():
    """After ``disable_pooled_projection`` the output ignores the pooled embedding, still follows the
    token sequence, and a training step leaves the projection at zero."""
    from diffusers import SD3Transformer2DModel

    from tiltgen.builtin.recipes.flow import disable_pooled_projection
    from tiltgen.builtin.recipes.pipelines import sd3_transformer_config

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**sd3_transformer_config())
    disable_pooled_projection(model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    text = torch.randn(2, 5, model.config.joint_attention_dim)

    def run(text, pooled):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                     return_dict=False)[0]

    pooled = torch.randn(2, model.config.pooled_projection_dim)
    with torch.no_grad():
        base = run(text, pooled)
        assert torch.equal(base, run(text, 10 * torch.randn_like(pooled)))
        assert not torch.allclose(base, run(torch.randn_like(text), pooled))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    run(text, pooled).pow(2).mean().backward()
    opt.step()
    projection = model.time_text_embed.text_embedder
    assert all(not p.requires_grad and p.abs().max() == 0 for p in projection.parameters())


def test_context_free_text_encoders_give_each_word_its_own_features():
    """The token features the SD3 pipeline takes (CLIP penultimate state, T5 last state) of
    "square" are the same after "purple" as after "red" with ``context_free``, not without;
    the pooled CLIP output still reads the whole caption."""
    from tiltgen.builtin.recipes.flow import text_encoders
    from tiltgen.builtin.recipes.text import clip_tokenizer, t5_tokenizer

    torch.manual_seed(0)
    tokenizers = (clip_tokenizer(), clip_tokenizer(), t5_tokenizer())
    captions = ["a purple square", "a red square"]
    for context_free in (True, False):
        clip, _, t5 = text_encoders(tokenizers, context_free)
        ids = tokenizers[0](captions, padding="max_length", max_length=8, return_tensors="pt").input_ids
        with torch.no_grad():
            out = clip(ids, output_hidden_states=True)
            t5_ids = tokenizers[2](captions, padding="max_length", max_length=8, return_tensors="pt").input_ids
            t5_out = t5(t5_ids).last_hidden_state
        square = int((ids[0] != ids[1]).nonzero()[0]) + 1  # the word after the colour
        assert ids[0, square] == ids[1, square]
        same_clip = torch.allclose(out.hidden_states[-2][0, square], out.hidden_states[-2][1, square])
        t5_square = int((t5_ids[0] != t5_ids[1]).nonzero()[-1]) + 1
        assert t5_ids[0, t5_square] == t5_ids[1, t5_square]
        same_t5 = torch.allclose(t5_out[0, t5_square], t5_out[1, t5_square])
        assert same_clip == context_free and same_t5 == context_free
        assert not torch.allclose(out.text_embeds[0], out.text_embeds[1])


def test_context_free_text_with_an_initial_folder_is_refused(capsys):
    """--init brings its own text encoders, so --context-free-text beside it would be ignored."""
    from tiltgen.builtin.recipes.flow import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--vae", "v", "--out", "o", "--init", "f", "--context-free-text"])
    assert exit_info.value.code == 2 and "--context-free-text" in capsys.readouterr().err


def test_held_out_report_counts_the_shapes_drawn_for_each_pair():
    """Each image counts once, under the held-out pair its caption names; several shapes are
    joined and an empty reading is counted as ""."""
    from tiltgen.builtin.recipes.heldout import shapes_drawn
    from tiltgen.world import HELD_OUT_PAIRS
    from tiltgen.world.fidelity import Reading, SeenShape

    def reading(*shapes):
        return Reading(tuple(SeenShape(s, "purple", "small", "centre") for s in shapes), "white")

    shape, colour = HELD_OUT_PAIRS[2]
    prompts = [f"a {colour} {shape}", f"a small {colour} {shape} in the centre on a black background",
               f"a {colour} {shape}", "a red circle", f"a {colour} circle and a red {shape}"]
    readings = [reading("circle"), reading("circle", "square"), reading(), reading("circle"), reading("circle")]
    drawn = shapes_drawn(readings, prompts)
    assert set(drawn) == {f"{c} {s}" for s, c in HELD_OUT_PAIRS}
    assert drawn[f"{colour} {shape}"] == {"circle": 1, "circle+square": 1, "": 1}
    assert sum(sum(c.values()) for c in drawn.values()) == 3  # the two-shape caption names neither held-out pair


def test_blanked_encoding_replaces_exactly_one_part_by_the_empty_captions():
    """pooled / clip / t5: that part equals the empty caption's encoding, the rest the prompt's;
    an unknown part and a pipeline without T5 are refused by name."""
    from diffusers import DiffusionPipeline

    from tiltgen.builtin import builtin_path
    from tiltgen.builtin.recipes.heldout import blanked_encoding

    pipe = DiffusionPipeline.from_pretrained(str(builtin_path("world-flow")))
    prompts, length = ["a purple square", "a red circle on the left"], 24

    def encode(captions):
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False, max_sequence_length=length)
        return embeds, pooled

    (embeds, pooled), (empty, empty_pooled) = encode(prompts), encode([""] * 2)
    clip = embeds.shape[1] - length
    expected = {"pooled": (embeds, empty_pooled),
                "clip": (torch.cat([empty[:, :clip], embeds[:, clip:]], 1), pooled),
                "t5": (torch.cat([embeds[:, :clip], empty[:, clip:]], 1), pooled)}
    for part, (want_embeds, want_pooled) in expected.items():
        got = blanked_encoding(pipe, prompts, part, length)
        torch.testing.assert_close(got["prompt_embeds"], want_embeds)
        torch.testing.assert_close(got["pooled_prompt_embeds"], want_pooled)
        assert not torch.equal(got["prompt_embeds"], embeds) or not torch.equal(got["pooled_prompt_embeds"], pooled)
    with pytest.raises(TiltgenError, match="unknown text part 'vae'.*pooled, clip, t5"):
        blanked_encoding(pipe, prompts, "vae", length)
    sd = DiffusionPipeline.from_pretrained(str(builtin_path("world-diffusion")))
    with pytest.raises(TiltgenError, match="SD3-like.*StableDiffusionPipeline"):
        blanked_encoding(sd, prompts, "t5", length)


def test_held_out_report_refuses_a_folder_that_is_not_a_generator(tmp_path, capsys):
    from tiltgen.builtin.recipes.heldout import main

    assert main([str(tmp_path)]) == 2
    assert "not a generator folder" in capsys.readouterr().err


def test_held_out_report_names_the_pairs_of_given_captions():
    from tiltgen.builtin.recipes.heldout import named_pairs

    assert named_pairs(["a purple circle", "a small cyan square on the left", "a red shape", "two shapes",
                        "a purple circle", ""]) == [("circle", "purple"), ("square", "cyan")]


def test_held_out_report_refuses_a_caption_outside_the_world_before_sampling(capsys):
    from tiltgen.builtin import builtin_path
    from tiltgen.builtin.recipes.heldout import main

    assert main([str(builtin_path("world-flow")), "--prompt", "a purple dragon"]) == 2
    assert "dragon" in capsys.readouterr().err


def test_diffusion_context_free_text_encoder_gives_each_word_its_own_features(capsys):
    """The SD pipeline reads the CLIP's last (layer-normed) state: without layers it is the same
    for "square" after "purple" as after "red"; --init beside the option is refused."""
    from transformers import CLIPTextModel

    from tiltgen.builtin.recipes.diffusion import SD_TEXT_DIM, main
    from tiltgen.builtin.recipes.text import clip_text_config, clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    ids = tokenizer(["a purple square", "a red square"], padding="max_length", max_length=8,
                    return_tensors="pt").input_ids
    square = int((ids[0] != ids[1]).nonzero()[0]) + 1
    for layers in (0, 2):
        with torch.no_grad():
            hidden = CLIPTextModel(clip_text_config(len(tokenizer), SD_TEXT_DIM, layers=layers))(ids)[0]
        assert torch.allclose(hidden[0, square], hidden[1, square]) == (layers == 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["--vae", "v", "--out", "o", "--init", "f", "--context-free-text"])
    assert exit_info.value.code == 2 and "--context-free-text" in capsys.readouterr().err



def test_uniform_pairs_spread_the_teachers_captions_over_every_allowed_pairing():
    """The one-step recipe's --uniform-pairs: the chosen scenes get (shape, colour) pairs drawn
    uniformly over the allowed ones, held-out pairs never; other attributes and the rest stay."""
    import collections

    import numpy as np

    from tiltgen.builtin.recipes.onestep import uniform_pairs
    from tiltgen.world import HELD_OUT_PAIRS, WorldConfig
    from tiltgen.world.scene import sample_scene

    g = np.random.default_rng(0)
    scenes = [sample_scene(g, WorldConfig(exclude_pairs=HELD_OUT_PAIRS)) for _ in range(3000)]
    assert uniform_pairs(scenes, 0.0, 1) == scenes
    redrawn = uniform_pairs(scenes, 1.0, 1)
    assert uniform_pairs(scenes, 1.0, 1) == redrawn  # seeded
    pairs = collections.Counter((s.shape, s.colour) for scene in redrawn for s in scene.shapes)
    assert not set(HELD_OUT_PAIRS) & set(pairs) and len(pairs) == 31
    assert max(pairs.values()) < 1.6 * min(pairs.values())  # the world's own draws: 14x apart
    skewed = collections.Counter((s.shape, s.colour) for scene in scenes for s in scene.shapes)
    assert max(skewed.values()) > 5 * min(skewed.values())
    for before, after in zip(scenes, redrawn):
        assert before.background == after.background
        assert [(s.size, s.position) for s in before.shapes] == [(s.size, s.position) for s in after.shapes]
    half = uniform_pairs(scenes, 0.5, 1)
    changed = sum(a != b for a, b in zip(scenes, half)) / len(scenes)
    assert 0.4 < changed < 0.55  # a redraw may repeat the pair it replaces
    for caption in training_captions(half[:200], 0, 0):
        parse_caption(caption)

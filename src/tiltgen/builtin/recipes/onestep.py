"""Distil the SD-like built-in model into an SD-Turbo-like one-step generator.

    python -m tiltgen.builtin.recipes.onestep --teacher src/tiltgen/builtin/weights/world-diffusion \
        --out src/tiltgen/builtin/weights/world-onestep --seed 0

Knowledge distillation of the teacher's deterministic sampler (Luhman & Luhman 2021): the
teacher pipeline (DDIM, ``--teacher-steps`` steps, its default CFG) turns ``--pairs`` initial
noises into latents for training captions; the student, a copy of the teacher's UNet, learns
to reach the same latent in one step from t = 1 (v-prediction read at timestep 999, where
x0 = -v up to the cosine schedule's tiny alpha). The text encoder, tokenizer, VAE and
scheduler are the teacher's, so the folder is a ``StableDiffusionPipeline`` that samples with
``num_inference_steps=1, guidance_scale=0``. The EMA of the student is saved.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...builtin import read_info, resolve_weights
from .common import Trainer, base_parser, cached, finish, setup, weights_fingerprint, world_bank, write_readme
from .diffusion import encode_prompts
from .latents import latent_channel_variance, training_captions
from .pipelines import save_sd_pipeline, write_info


def uniform_pairs(scenes: Sequence[Any], fraction: float, seed: int) -> list[Any]:
    """``scenes`` with the (shape, colour) of every shape redrawn uniformly over the pairs the world
    allows (held-out pairs stay excluded) in a seeded ``fraction`` of them: captions in which each
    allowed pairing is as common as any other, instead of following the skewed marginal priors."""
    from dataclasses import replace

    import numpy as np

    from ...world import HELD_OUT_PAIRS
    from ...world.attributes import COLOUR_NAMES, SHAPES

    allowed = [(s, c) for s in SHAPES for c in COLOUR_NAMES if (s, c) not in set(HELD_OUT_PAIRS)]
    g = np.random.default_rng(np.random.SeedSequence([seed, 211]))
    out = []
    for scene in scenes:
        picks = g.integers(len(allowed), size=len(scene.shapes))
        if g.random() < fraction:
            scene = replace(scene, shapes=tuple(replace(shape, shape=allowed[i][0], colour=allowed[i][1])
                                                for shape, i in zip(scene.shapes, picks)))
        out.append(scene)
    return out


def teacher_pairs(pipe: Any, n: int, steps: int, cfg: float, seed: int, chunk: int = 256,
                  uniform: float = 0.0) -> dict[str, Any]:
    """{"noise": [n, 4, 8, 8], "latents": teacher endpoints (scaled), "prompts": [n]} for
    training captions of world scenes (stream ``seed``; a ``uniform`` fraction with their shapes'
    (shape, colour) redrawn uniformly, :func:`uniform_pairs`), sampled by the teacher pipeline."""
    scenes = world_bank(n, seed)["scenes"]
    if uniform > 0:
        scenes = uniform_pairs(scenes, uniform, seed)
    noise, latents, prompts = [], [], []
    for start in tqdm(range(0, n, chunk), desc="teacher samples", dynamic_ncols=True):
        part = training_captions(scenes[start:start + chunk], seed, start)
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)
        x_t = torch.randn(len(part), 4, 8, 8, generator=g)
        with torch.no_grad():
            out = pipe(part, latents=x_t * pipe.scheduler.init_noise_sigma, num_inference_steps=steps,
                       guidance_scale=cfg, output_type="latent").images
        noise.append(x_t)
        latents.append(out)
        prompts += part
    return {"noise": torch.cat(noise), "latents": torch.cat(latents), "prompts": prompts}


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m tiltgen.builtin.recipes.onestep", __doc__, steps=3000, batch_size=128, lr=2e-4)
    parser.add_argument("--teacher", required=True, help="the SD-like pipeline folder (recipes.diffusion)")
    parser.add_argument("--pairs", type=int, default=16384, help="teacher (noise, latent) pairs")
    parser.add_argument("--teacher-steps", type=int, default=20)
    parser.add_argument("--uniform-pairs", type=float, default=0.0,
                        help="fraction of the teacher's captions whose shapes' (shape, colour) are drawn uniformly "
                             "over the allowed pairs instead of from the world's skewed priors (default 0)")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    work = setup(args)
    from diffusers import StableDiffusionPipeline

    folder = resolve_weights(args.teacher, "teacher")
    teacher = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    teacher.set_progress_bar_config(disable=True)
    cfg = float(read_info(folder).get("default_cfg", 3.0))
    tick = time.perf_counter()
    if not 0.0 <= args.uniform_pairs <= 1.0:
        parser.error(f"--uniform-pairs must be a fraction in [0, 1], got {args.uniform_pairs}")
    key = {"unet": weights_fingerprint(teacher.unet), "text_encoder": weights_fingerprint(teacher.text_encoder),
           "n": args.pairs, "steps": args.teacher_steps, "cfg": cfg, "seed": args.seed}
    if args.uniform_pairs:  # left out at 0, so the pairs cached by earlier runs still match
        key["uniform_pairs"] = args.uniform_pairs
    pairs = cached("teacher-pairs", key, lambda: teacher_pairs(teacher, args.pairs, args.teacher_steps, cfg,
                                                               args.seed + 51, uniform=args.uniform_pairs))
    teacher_wall = time.perf_counter() - tick
    tokenizer, text_encoder = teacher.tokenizer, teacher.text_encoder.requires_grad_(False)
    with torch.no_grad():
        hidden = torch.cat([encode_prompts(tokenizer, text_encoder, pairs["prompts"][i:i + 1024])
                            for i in range(0, args.pairs, 1024)])
    import copy

    student = copy.deepcopy(teacher.unet).requires_grad_(True)
    scheduler = teacher.scheduler
    t_max = scheduler.config.num_train_timesteps - 1
    abar = scheduler.alphas_cumprod[t_max].float()
    trainer = Trainer({"unet": student}, args)

    def loss_at(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, args.pairs, (args.batch_size,), generator=g)
        x_t = pairs["noise"][idx]
        v = student(x_t, torch.full((len(idx),), t_max), encoder_hidden_states=hidden[idx]).sample
        x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * v
        return (x0 - pairs["latents"][idx]).pow(2).mean()

    try:
        trainer.run(loss_at, work, "distil one-step UNet")
    except KeyboardInterrupt:
        return 130
    out = Path(args.out)
    save_sd_pipeline(out, vae=teacher.vae, unet=trainer.ema["unet"], text_encoder=text_encoder, tokenizer=tokenizer)
    write_info(out, {"name": out.name, "family": "onestep", "pipeline": "StableDiffusionPipeline", "default_steps": 1,
                     "default_cfg": 1.0, "seed": args.seed, "distilled_from": str(args.teacher),
                     "teacher_steps": args.teacher_steps, "teacher_cfg": cfg, "pairs": args.pairs,
                     "teacher_wall_s": round(teacher_wall, 1), "data_var": latent_channel_variance(teacher.vae),
                     "train_wall_s": round(trainer.wall, 1)})
    write_readme(out, out.name, f"SD-Turbo-like one-step generator of the built-in world, distilled from "
                 f"`{args.teacher}` ({args.pairs} pairs of its {args.teacher_steps}-step DDIM sampler with CFG "
                 f"{cfg:g}): a complete `StableDiffusionPipeline` folder. Plain diffusers:\n\n"
                 "```python\nfrom diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained(folder)\n"
                 "images = pipe(\"a red shape\", num_inference_steps=1, guidance_scale=0.0, output_type=\"pil\").images\n```",
                 ["tiltgen.builtin.recipes.onestep"] + argv,
                 f"seed {args.seed}; {trainer.step} steps of batch {args.batch_size}, AdamW lr {args.lr}, EMA 0.999; "
                 f"training wall time {trainer.wall / 60:.1f} min, plus {teacher_wall / 60:.1f} min of teacher sampling "
                 "(0 when they were cached); final loss "
                 f"{trainer.final_loss():.4f}.")
    finish(work)
    print(f"pipeline written to {out} ({trainer.step} steps, {trainer.wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

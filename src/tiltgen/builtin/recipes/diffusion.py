"""Train the SD-like built-in model: a ``StableDiffusionPipeline`` folder (CLIP tokenizer and
text encoder over the world's words, UNet on 8x8x4 latents, the world VAE, DDIM).

    python -m tiltgen.builtin.recipes.diffusion --vae runs/world-vae --out src/tiltgen/builtin/weights/world-diffusion --seed 0

The UNet and the text encoder are trained together from scratch by denoising score matching
with v-prediction on the cosine schedule, unweighted MSE on v over uniform timesteps, on VAE
latents of world images (held-out (shape, colour) pairs excluded) with a fresh training
caption per image and step: attributes dropped at random, the empty caption 10% of the time,
so classifier-free guidance works. The EMA of the weights is saved.

Why unweighted: where a shape goes is decided at high noise, where the input carries almost no
signal and only the prompt says "on the left". Min-SNR weighting (Hang et al. 2023) gives those
steps weight ~SNR ~ 0; a model trained with it learned shape, colour, size and background
but placed shapes regardless of the position words (held-out position fidelity 0.19).
``--min-snr GAMMA --snr-floor F`` weights the v loss by max(min(SNR, GAMMA) / (SNR + 1), F): the
min-SNR emphasis on mid noise, with the high-noise steps kept at weight F. ``--init FOLDER``
starts from a trained folder's UNet and text encoder (a second training phase).

``--teachers HIGH,LOW --switch K`` distils two trained folders into one UNet + text encoder: the v
target of a noised training latent is HIGH's prediction at timesteps >= K and LOW's below,
instead of the data's v. A teacher's output is the conditional mean the data's v only samples, so
the target has no irreducible noise; this merges a model that places shapes (unweighted) with one
that draws them sharply (min-SNR) into a single standard UNet (docs/builtin-world.md).

``--context-free-text`` builds a CLIP without layers, so the state the pipeline reads is each
word's own layer-normed token and position embedding; measured, one unweighted run reached
held-out shape 0.83 and position 1.00, about what the three-run merge gives (not shipped).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ...builtin import resolve_weights
from ...errors import TiltgenError
from .common import Trainer, base_parser, finish, setup, write_readme
from .latents import latent_bank, latent_channel_variance, sample_latents, training_captions
from .pipelines import SD_TEXT_DIM, load_vae, save_sd_pipeline, sd_scheduler, sd_unet_config, write_info
from .text import clip_text_config, clip_tokenizer

DEFAULT_STEPS = 30
DEFAULT_CFG = 3.0


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> Tensor:
    """Hidden states [N, L, D] as ``StableDiffusionPipeline.encode_prompt`` computes them."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def v_loss_weight(scheduler, k: Tensor, gamma: float, floor: float) -> Tensor:
    """Per-sample weight [B] of the v loss at integer timesteps ``k``: 1 when ``gamma`` is 0, else
    max(min(SNR, gamma) / (SNR + 1), floor) (min-SNR-gamma for v-prediction, bounded below)."""
    if gamma <= 0:
        return torch.ones(k.shape)
    abar = scheduler.alphas_cumprod[k].double()
    snr = abar / (1 - abar)
    return (snr.clamp(max=gamma) / (snr + 1)).clamp(min=floor).float()


def timestep_range(text: str | None, total: int) -> tuple[int, int]:
    """``--timesteps LO,HI`` as integers with 0 <= LO < HI <= total (default: every timestep)."""
    if text is None:
        return 0, total
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise TiltgenError(f"--timesteps takes LO,HI (two integers), got {text!r}") from None
    if not 0 <= lo < hi <= total:
        raise TiltgenError(f"--timesteps needs 0 <= LO < HI <= {total}, got {text!r}")
    return lo, hi


def load_teachers(text: str | None) -> list[tuple[Any, Any]]:
    """``HIGH,LOW`` world-diffusion folders as frozen (UNet, text encoder) pairs (empty: no teachers)."""
    if text is None:
        return []
    folders = text.split(",")
    if len(folders) != 2:
        raise TiltgenError(f"--teachers takes HIGH,LOW (two pipeline folders), got {text!r}")
    return [load_teacher(folder) for folder in folders]


def load_teacher(folder: str) -> tuple[Any, Any]:
    """A world-diffusion folder's UNet and text encoder, frozen, in float32."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    path = resolve_weights(folder, "teacher pipeline")
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(str(path / "text_encoder"), torch_dtype=torch.float32).eval()
    return unet.requires_grad_(False), text_encoder.requires_grad_(False)


@torch.no_grad()
def teacher_velocity(teachers: list[tuple[Any, Any]], tokenizer, z_t: Tensor, k: Tensor, prompts: Sequence[str],
                     switch: int) -> Tensor:
    """v [B, C, H, W] of the high-noise teacher where ``k`` >= ``switch``, of the low-noise one below."""
    target = torch.empty_like(z_t)
    for (unet, text_encoder), rows in zip(teachers, (k >= switch, k < switch)):
        if rows.any():
            idx = rows.nonzero().squeeze(1)
            hidden = encode_prompts(tokenizer, text_encoder, [prompts[i] for i in idx.tolist()])
            target[idx] = unet(z_t[idx], k[idx], encoder_hidden_states=hidden).sample
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m tiltgen.builtin.recipes.diffusion", __doc__, steps=6000, batch_size=128,
                         lr=1e-3)
    parser.add_argument("--vae", required=True, help="the world AutoencoderKL folder (recipes.vae)")
    parser.add_argument("--data", type=int, default=120000, help="training images")
    parser.add_argument("--init", default=None,
                        help="start from this world-diffusion pipeline folder's UNet and text encoder (a second phase)")
    parser.add_argument("--min-snr", type=float, default=0.0,
                        help="min-SNR-gamma weighting of the v loss, min(SNR, gamma) / (SNR + 1) (0: unweighted)")
    parser.add_argument("--snr-floor", type=float, default=0.0,
                        help="lower bound of that weight, so the high-noise steps that place shapes keep training")
    parser.add_argument("--timesteps", default=None, metavar="LO,HI",
                        help="train only on the integer timesteps in [LO, HI) (default: all; a second phase that "
                             "teaches the high-noise steps alone, say 500,1000)")
    parser.add_argument("--teachers", default=None, metavar="HIGH,LOW",
                        help="distil two trained world-diffusion folders into one: the v target is HIGH's prediction "
                             "at timesteps >= --switch and LOW's below (each with its own text encoder), not the data's")
    parser.add_argument("--switch", type=int, default=500, help="the timestep where --teachers hands over")
    parser.add_argument("--context-free-text", action="store_true",
                        help="a CLIP text encoder without layers: the pipeline's text features are each token's "
                             "embedding plus its position embedding, layer-normed, so the UNet attends to each "
                             "word's own features (as the flow recipe's option)")
    args = parser.parse_args(argv)
    if args.context_free_text and args.init:
        parser.error("--context-free-text builds a fresh text encoder, --init takes the folder's: give one of them")
    argv = list(sys.argv[1:] if argv is None else argv)
    work = setup(args)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = load_vae(args.vae)
    scale = float(vae.config.scaling_factor)
    bank = latent_bank(vae, args.data, seed=args.seed + 21)
    tokenizer = clip_tokenizer()
    if args.init:
        init = resolve_weights(args.init, "initial pipeline")
        text_encoder = CLIPTextModel.from_pretrained(str(init / "text_encoder"), torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(str(init / "unet"), torch_dtype=torch.float32)
    else:
        text_encoder = CLIPTextModel(clip_text_config(len(tokenizer), SD_TEXT_DIM,
                                                      layers=0 if args.context_free_text else 2))
        unet = UNet2DConditionModel(**sd_unet_config())
    scheduler = sd_scheduler()
    k_lo, k_hi = timestep_range(args.timesteps, scheduler.config.num_train_timesteps)
    teachers = load_teachers(args.teachers)
    trainer = Trainer({"unet": unet, "text_encoder": text_encoder}, args)
    n = bank["mean"].shape[0]

    def loss_at(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        z = sample_latents(bank, idx, scale, g)
        prompts = training_captions([bank["scenes"][i] for i in idx.tolist()], args.seed, step)
        k = torch.randint(k_lo, k_hi, (args.batch_size,), generator=g)
        eps = torch.randn(z.shape, generator=g)
        z_t = scheduler.add_noise(z, eps, k)
        if teachers:
            target = teacher_velocity(teachers, tokenizer, z_t, k, prompts, args.switch)
        else:
            target = scheduler.get_velocity(z, eps, k)
        pred = unet(z_t, k, encoder_hidden_states=encode_prompts(tokenizer, text_encoder, prompts)).sample
        err = (pred - target).pow(2).flatten(1).mean(1)
        return (v_loss_weight(scheduler, k, args.min_snr, args.snr_floor) * err).mean()

    try:
        trainer.run(loss_at, work, "train diffusion UNet + text encoder")
    except KeyboardInterrupt:
        return 130
    out = Path(args.out)
    save_sd_pipeline(out, vae=vae, unet=trainer.ema["unet"], text_encoder=trainer.ema["text_encoder"],
                     tokenizer=tokenizer)
    write_info(out, {"name": out.name, "family": "diffusion", "pipeline": "StableDiffusionPipeline",
                     "default_steps": DEFAULT_STEPS, "default_cfg": DEFAULT_CFG, "seed": args.seed,
                     "data_var": latent_channel_variance(vae), "train_wall_s": round(trainer.wall, 1)})
    write_readme(out, out.name, "SD-like text-to-image model of the built-in world: a complete "
                 "`StableDiffusionPipeline` folder (CLIP tokenizer + text encoder over the world's words, "
                 "`UNet2DConditionModel` with v-prediction on 8x8x4 latents, the world `AutoencoderKL`, DDIM). "
                 f"tiltgen samples it with {DEFAULT_STEPS} steps and CFG {DEFAULT_CFG:g}; plain diffusers:\n\n"
                 "```python\nfrom diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained(folder)\n"
                 f"images = pipe(\"a red shape\", num_inference_steps={DEFAULT_STEPS}, guidance_scale={DEFAULT_CFG:g}, "
                 "output_type=\"pil\").images\n```",
                 ["tiltgen.builtin.recipes.diffusion"] + argv,
                 f"The VAE comes from `python -m tiltgen.builtin.recipes.vae --out runs/world-vae --seed 0`.\n\n"
                 f"seed {args.seed}; {trainer.step} steps of batch {args.batch_size}, AdamW lr {args.lr} (warm-up 200, "
                 f"cosine), EMA 0.999, {args.data} training images; training wall time {trainer.wall / 60:.1f} min; "
                 f"final loss {trainer.final_loss():.4f}.")
    finish(work)
    print(f"pipeline written to {out} ({trainer.step} steps, {trainer.wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

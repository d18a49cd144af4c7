"""Train the SD3-like built-in model: a ``StableDiffusion3Pipeline`` folder (two CLIP text
encoders with projections and a T5 encoder over the world's words, an ``SD3Transformer2DModel``
on 8x8x4 latents, the world VAE, ``FlowMatchEulerDiscreteScheduler``).

    python -m tiltgen.builtin.recipes.flow --vae runs/world-vae --out src/tiltgen/builtin/weights/world-flow --steps 7500 --seed 0 --context-free-text

Rectified flow (x_t = (1 - t) x0 + t eps, velocity target eps - x0, logit-normal t as in
SD3), the transformer and all three text encoders trained together from scratch, on the same
latents and training captions as the diffusion model. Prompts are encoded by the pipeline's
own ``encode_prompt``, so training sees exactly what sampling does. The T5 sequence is usually
``T5_MAX_LENGTH`` tokens (tiltgen's default) and sometimes 256 (the pipeline's default), so
plain diffusers calls work too. The EMA of the weights is saved. ``--min-snr GAMMA`` weights the
velocity loss as min-SNR-gamma weights the x0 error (``flow_loss_weight``).

``--teacher FOLDER`` distils a trained world-diffusion folder (VP, v-prediction) instead of fitting
the data's velocity: each training time is snapped to the teacher timestep of equal SNR, the noised
latent is rescaled into the teacher's space, and the target is the velocity eps_hat - x0_hat implied
by the teacher's prediction there (``teacher_flow_velocity``). The target is a conditional mean with
no irreducible noise, so a small transformer learns from it what the data's noisy velocity did not
teach it: the SD-like model's composition of unseen (shape, colour) pairs (docs/builtin-world.md).
``--init FOLDER`` starts from a trained world-flow folder's transformer and text encoders.
``--patch-size 1`` gives the transformer 64 image tokens instead of 16 (same parameters, about 4x
the compute); measured and not shipped: it drew held-out pairs' shapes worse (docs/builtin-world.md).
``--no-pooled`` zeroes and freezes the transformer's pooled-text projection, so the prompt acts only
through joint attention; measured and not shipped: held-out shape fell from 0.56 to 0.43.
``--context-free-text`` gives the transformer each word's own token features (one-layer CLIPs, whose
penultimate state is the token and position embedding, and a T5 without layers): held-out shape rose
from 0.56 to 0.76 at 5000 steps (0.72 on 768 images) and to 0.80 at 7500 (0.81); the shipped
world-flow is the 7500-step run (docs/builtin-world.md).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ...builtin import resolve_weights
from ...core.conversions import Coefficients, to_x0_eps
from .common import Trainer, base_parser, finish, setup, write_readme
from .diffusion import encode_prompts, load_teacher
from .latents import latent_bank, latent_channel_variance, sample_latents, training_captions
from .pipelines import (SD3_CLIP_DIM, SD3_T5_DIM, load_vae, save_sd3_pipeline, sd3_scheduler, sd3_transformer_config,
                        write_info)
from .text import T5_MAX_LENGTH, clip_text_config, clip_tokenizer, t5_config, t5_tokenizer

DEFAULT_STEPS = 28
TRAININGFREE_VARIANT = "linear"  # bounded caps each step at one proxy std and gained half as much
DEFAULT_CFG = 3.0
P_LONG_T5 = 0.05


def flow_loss_weight(t: Tensor, gamma: float) -> Tensor:
    """Per-sample weight [B] of the velocity loss at times ``t`` in (0, 1): 1 when ``gamma`` is 0.

    Otherwise min(SNR, gamma) t^2 / c with SNR = ((1 - t) / t)^2: since x0_hat = x_t - t v_hat, the
    velocity error is the x0 error over t, so this is min-SNR-gamma on the x0 error (as
    ``recipes.diffusion``'s weight is for v-prediction). c is its mean under the logit-normal
    sampling of t, so the loss keeps the unweighted loss's scale."""
    if gamma <= 0:
        return torch.ones(t.shape)
    return _min_snr_t2(t.double(), gamma).float() / _logit_normal_mean(gamma)


def _min_snr_t2(t: Tensor, gamma: float) -> Tensor:
    return torch.minimum((1 - t) ** 2, gamma * t ** 2)


@functools.lru_cache(maxsize=None)  # one constant per gamma, not recomputed at every training step
def _logit_normal_mean(gamma: float, points: int = 20001) -> float:
    u = torch.linspace(-8, 8, points, dtype=torch.float64)
    density = torch.exp(-u ** 2 / 2)
    return float((_min_snr_t2(torch.sigmoid(u), gamma) * density).sum() / density.sum())


def teacher_times(alphas_cumprod: Tensor) -> Tensor:
    """Flow times [K] (float64, increasing) with the SNR of each teacher timestep k:
    ((1 - t) / t)^2 = abar_k / (1 - abar_k), so t = sigma_k / (alpha_k + sigma_k)."""
    abar = alphas_cumprod.double()
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    return sigma / (alpha + sigma)


def snap_times(t: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """For flow times ``t`` [B]: the nearest teacher timestep k [B] (long) on ``grid`` [K] and its
    flow time grid[k] [B] (float64), so student and teacher see the same noise level exactly."""
    t = t.double()
    upper = torch.searchsorted(grid, t).clamp(1, grid.shape[0] - 1)
    lower = upper - 1
    k = torch.where((t - grid[lower]).abs() <= (grid[upper] - t).abs(), lower, upper)
    return k, grid[k]


@torch.no_grad()
def teacher_flow_velocity(teacher: tuple[Any, Any], tokenizer, alphas_cumprod: Tensor, x_t: Tensor, k: Tensor,
                          t: Tensor, prompts: Sequence[str], offset: float) -> Tensor:
    """Flow velocity [B, C, H, W] at x_t = (1 - t) x0 + t eps implied by a VP v-prediction teacher.

    The teacher's latents are the flow's plus ``offset`` (the VAE shift times its scale). With
    alpha, sigma the teacher's coefficients at timestep k (same SNR as t), its input is
    z_k = (alpha + sigma) (x_t + (1 - t) offset) = alpha x0_teacher + sigma eps, and the target is
    eps_hat - (x0_hat - offset), the flow's dx_t/dt."""
    unet, text_encoder = teacher
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    abar = alphas_cumprod.double()[k].view(shape)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    z_k = (alpha + sigma) * (x_t.double() + (1 - t.double().view(shape)) * offset)
    v = unet(z_k.float(), k, encoder_hidden_states=encode_prompts(tokenizer, text_encoder, prompts)).sample
    zero = torch.zeros_like(alpha)
    x0, eps = to_x0_eps("v", v.double(), z_k, Coefficients(alpha, sigma, zero, zero))
    return (eps - (x0 - offset)).float()


def disable_pooled_projection(transformer: Any) -> None:
    """Zero and freeze an ``SD3Transformer2DModel``'s pooled-text projection: the pooled CLIP
    embedding then adds nothing to the timestep embedding that modulates every block, and the
    prompt acts only through joint attention over its token sequence (as cross-attention does in
    the SD-like UNet). The folder stays an ordinary SD3 transformer."""
    projection = transformer.time_text_embed.text_embedder
    with torch.no_grad():
        for param in projection.parameters():
            param.zero_()
    projection.requires_grad_(False)


def text_encoders(tokenizers: Sequence[Any], context_free: bool = False) -> tuple[Any, Any, Any]:
    """Fresh (CLIP, CLIP, T5) encoders for the SD3-like pipeline. ``context_free``: the token features
    the pipeline passes to the transformer are each word's own (with its position for the CLIPs),
    not mixed with the caption's other words; the pooled CLIP output still reads the whole caption."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_layers, t5_layers = (1, 0) if context_free else (2, 1)
    return (CLIPTextModelWithProjection(clip_text_config(len(tokenizers[0]), SD3_CLIP_DIM, layers=clip_layers)),
            CLIPTextModelWithProjection(clip_text_config(len(tokenizers[1]), SD3_CLIP_DIM, layers=clip_layers)),
            T5EncoderModel(t5_config(len(tokenizers[2]), SD3_T5_DIM, layers=t5_layers)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m tiltgen.builtin.recipes.flow", __doc__, steps=6000, batch_size=128, lr=1e-3)
    parser.add_argument("--vae", required=True, help="the world AutoencoderKL folder (recipes.vae)")
    parser.add_argument("--data", type=int, default=120000, help="training images")
    parser.add_argument("--min-snr", type=float, default=0.0,
                        help="weight the velocity loss as min-SNR-gamma weights the x0 error (0: unweighted)")
    parser.add_argument("--patch-size", type=int, default=2, choices=(1, 2),
                        help="transformer patch size on the 8x8 latents (1: 64 image tokens, about 4x the compute)")
    parser.add_argument("--no-pooled", action="store_true",
                        help="zero and freeze the transformer's pooled-text projection, so the prompt reaches it "
                             "only through joint attention over its tokens")
    parser.add_argument("--context-free-text", action="store_true",
                        help="text encoders whose token features the transformer sees do not mix words: one-layer "
                             "CLIPs (the pipeline reads their penultimate state, the token and position embeddings) "
                             "and a T5 without layers")
    parser.add_argument("--init", default=None,
                        help="start from this world-flow pipeline folder's transformer and text encoders")
    parser.add_argument("--teacher", default=None,
                        help="distil this world-diffusion folder (VP, v-prediction): the target is the velocity its "
                             "prediction implies at the same SNR, not the data's")
    args = parser.parse_args(argv)
    if args.context_free_text and args.init:
        parser.error("--context-free-text builds fresh text encoders, --init takes the folder's: give one of them")
    argv = list(sys.argv[1:] if argv is None else argv)
    work = setup(args)
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    vae = load_vae(args.vae)
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
    bank = latent_bank(vae, args.data, seed=args.seed + 21)
    tokenizers = (clip_tokenizer(), clip_tokenizer(), t5_tokenizer())
    if args.init:
        init = resolve_weights(args.init, "initial pipeline")
        encoders = (CLIPTextModelWithProjection.from_pretrained(str(init / "text_encoder"), torch_dtype=torch.float32),
                    CLIPTextModelWithProjection.from_pretrained(str(init / "text_encoder_2"),
                                                                torch_dtype=torch.float32),
                    T5EncoderModel.from_pretrained(str(init / "text_encoder_3"), torch_dtype=torch.float32))
        transformer = SD3Transformer2DModel.from_pretrained(str(init / "transformer"), torch_dtype=torch.float32)
    else:
        encoders = text_encoders(tokenizers, args.context_free_text)
        transformer = SD3Transformer2DModel(**sd3_transformer_config(args.patch_size))
    if args.no_pooled:
        disable_pooled_projection(transformer)
    teacher = load_teacher(args.teacher) if args.teacher else None
    if teacher is not None:
        from diffusers import DDIMScheduler

        teacher_abar = DDIMScheduler.from_pretrained(
            str(resolve_weights(args.teacher, "teacher pipeline") / "scheduler")).alphas_cumprod
        grid = teacher_times(teacher_abar)
        teacher_tokenizer = clip_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sd3_scheduler(), vae=vae,
                                    text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1],
                                    tokenizer_2=tokenizers[1], text_encoder_3=encoders[2], tokenizer_3=tokenizers[2])
    trainer = Trainer({"transformer": transformer, "text_encoder": encoders[0], "text_encoder_2": encoders[1],
                       "text_encoder_3": encoders[2]}, args)
    n = bank["mean"].shape[0]

    def loss_at(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        x0 = sample_latents(bank, idx, scale, g) - shift * scale
        prompts = training_captions([bank["scenes"][i] for i in idx.tolist()], args.seed, step)
        length = 256 if float(torch.rand(1, generator=g)) < P_LONG_T5 else T5_MAX_LENGTH
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False, max_sequence_length=length)
        t = torch.sigmoid(torch.randn(args.batch_size, generator=g))  # logit-normal(0, 1)
        if teacher is not None:
            k, t = snap_times(t, grid)
            t = t.float()
        eps = torch.randn(x0.shape, generator=g)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        if teacher is not None:
            target = teacher_flow_velocity(teacher, teacher_tokenizer, teacher_abar, x_t, k, t, prompts, shift * scale)
        else:
            target = eps - x0
        pred = transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        err = (pred - target).pow(2).flatten(1).mean(1)
        return (flow_loss_weight(t, args.min_snr) * err).mean()

    try:
        trainer.run(loss_at, work, "train flow transformer + text encoders")
    except KeyboardInterrupt:
        return 130
    out = Path(args.out)
    ema = trainer.ema
    save_sd3_pipeline(out, vae=vae, transformer=ema["transformer"],
                      text_encoders=(ema["text_encoder"], ema["text_encoder_2"], ema["text_encoder_3"]),
                      tokenizers=tokenizers)
    write_info(out, {"name": out.name, "family": "flow", "pipeline": "StableDiffusion3Pipeline",
                     "default_steps": DEFAULT_STEPS, "default_cfg": DEFAULT_CFG, "seed": args.seed,
                     # chosen on guidance training prompts, not the demo's (docs/builtin-world.md)
                     "trainingfree_variant": TRAININGFREE_VARIANT, "data_var": latent_channel_variance(vae),
                     "train_wall_s": round(trainer.wall, 1)})
    write_readme(out, out.name, "SD3-like rectified-flow text-to-image model of the built-in world: a complete "
                 "`StableDiffusion3Pipeline` folder (two CLIP text encoders and a tiny T5 over the world's words, "
                 "`SD3Transformer2DModel` on 8x8x4 latents, the world `AutoencoderKL`, "
                 f"`FlowMatchEulerDiscreteScheduler`). tiltgen samples it with {DEFAULT_STEPS} steps, CFG "
                 f"{DEFAULT_CFG:g} and {T5_MAX_LENGTH} T5 tokens; plain diffusers:\n\n"
                 "```python\nfrom diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained(folder)\n"
                 f"images = pipe(\"a red shape\", num_inference_steps={DEFAULT_STEPS}, guidance_scale={DEFAULT_CFG:g}, "
                 f"max_sequence_length={T5_MAX_LENGTH}, output_type=\"pil\").images\n```",
                 ["tiltgen.builtin.recipes.flow"] + argv,
                 f"The VAE comes from `python -m tiltgen.builtin.recipes.vae --out runs/world-vae --seed 0`.\n\n"
                 f"seed {args.seed}; {trainer.step} steps of batch {args.batch_size}, AdamW lr {args.lr} (warm-up 200, "
                 f"cosine), EMA 0.999, {args.data} training images; training wall time {trainer.wall / 60:.1f} min; "
                 f"final loss {trainer.final_loss():.4f}.")
    finish(work)
    print(f"pipeline written to {out} ({trainer.step} steps, {trainer.wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the built-in world's tiny ``AutoencoderKL``: 32x32x3 images <-> 8x8x4 latents.

    python -m tiltgen.builtin.recipes.vae --out runs/world-vae --seed 0

Loss: squared plus absolute error of the reconstruction (images in [-1, 1]), an edge term (the
absolute error of horizontal and vertical pixel differences, weight ``--edge``: shapes are
told apart by their contours, which a plain squared error lets blur away) and a small KL term
(weight ``--kl``, as in Stable Diffusion's autoencoder), on world images with held-out
(shape, colour) pairs excluded. The saved config records ``scaling_factor`` = 1 / std of the
latent means over 8192 held-aside images, so scaled latents have unit variance, as the
diffusion models expect. The weights are saved in float16 (diffusers loads them as float32).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .common import Trainer, as_float, base_parser, finish, setup, world_bank, write_readme

LATENT_CHANNELS = 4
DOWNSAMPLE = 4  # 32x32 -> 8x8


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=2,
                latent_channels=LATENT_CHANNELS, norm_num_groups=16, sample_size=32)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


def edge_error(recon: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error of horizontal and vertical pixel differences."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return (dx(recon) - dx(target)).abs().mean() + (dy(recon) - dy(target)).abs().mean()


def latent_scale(vae, images: Tensor, chunk: int = 1024) -> float:
    """1 / std of the latent means of ``images`` (in [0, 1])."""
    means = []
    with torch.no_grad():
        for i in range(0, images.shape[0], chunk):
            means.append(vae.encode(images[i:i + chunk] * 2 - 1).latent_dist.mean)
    return float(1.0 / torch.cat(means).std())


def reconstruction_error(vae, images: Tensor) -> float:
    """Mean absolute pixel error of encode-decode (latent means) on images in [0, 1]."""
    with torch.no_grad():
        z = vae.encode(images * 2 - 1).latent_dist.mean
        out = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    return float((out - images).abs().mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m tiltgen.builtin.recipes.vae", __doc__, steps=5000, batch_size=64, lr=1e-3)
    parser.add_argument("--kl", type=float, default=1e-6, help="weight of the KL term (summed over latents)")
    parser.add_argument("--edge", type=float, default=1.0, help="weight of the edge term")
    parser.add_argument("--data", type=int, default=60000, help="training images")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    work = setup(args)
    bank = world_bank(args.data, seed=args.seed + 11)["images"]
    vae = build_vae()
    trainer = Trainer({"vae": vae}, args, ema_decay=0.998)

    def loss_at(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, bank.shape[0], (args.batch_size,), generator=g)
        x = as_float(bank[idx]) * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        error = recon - x
        return (error.pow(2).mean() + error.abs().mean() + args.edge * edge_error(recon, x)
                + args.kl * posterior.kl().mean())

    try:
        trainer.run(loss_at, work, "train vae")
    except KeyboardInterrupt:
        return 130
    ema = trainer.ema["vae"]
    held = as_float(world_bank(8192, seed=args.seed + 12)["images"])
    scale = latent_scale(ema, held)
    error = reconstruction_error(ema, held[:2048])
    ema.register_to_config(scaling_factor=scale)
    out = Path(args.out)
    ema.to(torch.float16).save_pretrained(str(out))
    write_readme(out, out.name, "Tiny `AutoencoderKL` of tiltgen's built-in world (32x32x3 images <-> 8x8x4 latents).",
                 ["tiltgen.builtin.recipes.vae"] + argv,
                 f"seed {args.seed}; {trainer.step} steps of batch {args.batch_size}, AdamW lr {args.lr}, EMA 0.998; "
                 f"training wall time {trainer.wall / 60:.1f} min; final loss {trainer.final_loss():.5f}; "
                 f"scaling_factor {scale:.4f}; mean absolute reconstruction error {error:.4f} (pixels in [0, 1]) "
                 "on 2048 held-aside images.")
    finish(work)
    print(f"vae written to {out} (scaling_factor {scale:.4f}, reconstruction error {error:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

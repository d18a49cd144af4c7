"""Train the attribute classifier (the judge behind ``world-fidelity`` and ``world-binary``).

    python -m tiltgen.builtin.recipes.classifier --out src/tiltgen/builtin/weights/attribute-classifier --seed 0

Data: world images of every (shape, colour) pair, held-out pairs included (the judge must
read what the models were never shown), with light augmentation (blur, gain, noise) and,
with ``--vae`` and ``--vae-fraction``, that share of the images passed through the
autoencoder (generated images are decoded latents, softer than rendered ones).
Loss: background cross-entropy + per-slot occupancy BCE + per-slot shape/colour/size
cross-entropy on occupied slots. Held-out accuracy is measured on clean images, blurred and
noisy ones, and (with ``--vae``) on the autoencoder's reconstructions, which look like
generated images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...world import Labels, satisfied, full_spec
from ...world.fidelity import probabilities, read_images
from ...world.nets import CLASSIFIER_KIND, IMAGE_SIZE, AttributeClassifier, num_parameters, save_network
from .augment import augment, blur
from .common import (Trainer, as_float, base_parser, cached, finish, setup, weights_fingerprint, world_bank,
                     write_readme)
from .pipelines import load_vae


def classifier_loss(logits: dict[str, Tensor], labels: Labels) -> Tensor:
    loss = F.cross_entropy(logits["background"], labels.background)
    loss = loss + F.binary_cross_entropy_with_logits(logits["occupied"], labels.occupied.float())
    for head in ("shape", "colour", "size"):
        out = logits[head]
        loss = loss + F.cross_entropy(out.reshape(-1, out.shape[-1]), getattr(labels, head).reshape(-1))
    return loss


@torch.no_grad()
def reading_accuracy(model: AttributeClassifier, images: Tensor, labels: Labels, chunk: int = 1024) -> dict[str, float]:
    """Fraction of images whose reading satisfies each attribute of the full caption, and all."""
    readings = []
    for i in range(0, images.shape[0], chunk):
        readings += read_images(probabilities(model(images[i:i + chunk])))
    hits = [satisfied(full_spec(scene), r) for scene, r in zip(labels.scenes, readings)]  # type: ignore[arg-type]
    out = {k: sum(h[k] for h in hits) / len(hits) for k in hits[0]}
    out["all"] = sum(all(h.values()) for h in hits) / len(hits)
    return out


def _vae_roundtrip(vae: Any, images: Tensor) -> Tensor:
    """``images`` [N, 3, 32, 32] in [0, 1] encoded (posterior mean) and decoded by ``vae``."""
    out = []
    with torch.no_grad():
        for chunk in images.split(512):
            z = vae.encode(chunk * 2 - 1).latent_dist.mean
            out.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m tiltgen.builtin.recipes.classifier", __doc__, steps=4000, batch_size=128,
                         lr=2e-3)
    parser.add_argument("--data", type=int, default=80000, help="training images")
    parser.add_argument("--vae", help="an AutoencoderKL folder: report accuracy on its reconstructions")
    parser.add_argument("--vae-fraction", type=float, default=0.0,
                        help="with --vae: fraction of training images replaced by their reconstructions")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    work = setup(args)
    bank = world_bank(args.data, seed=args.seed + 31, exclude_held_out=False)
    images, labels = bank["images"], Labels.from_scenes(bank["scenes"])
    vae = load_vae(args.vae) if args.vae else None
    recon = None
    if vae is not None and args.vae_fraction > 0:
        recon = cached("vae-reconstructions", {"vae": weights_fingerprint(vae), "n": args.data, "seed": args.seed + 31},
                       lambda: (_vae_roundtrip(vae, as_float(images)) * 255).round().to(torch.uint8))
    model = AttributeClassifier()
    trainer = Trainer({"classifier": model}, args, ema_decay=0.995)

    def loss_at(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=g)
        sub = Labels(tuple(), labels.occupied[idx], labels.shape[idx], labels.colour[idx], labels.size[idx],
                     labels.background[idx], labels.count[idx])
        x = images[idx]
        if recon is not None:
            use = torch.rand(len(idx), generator=g) < args.vae_fraction
            x = torch.where(use.view(-1, 1, 1, 1), recon[idx], x)
        return classifier_loss(model(augment(as_float(x), g)), sub)

    try:
        trainer.run(loss_at, work, "train attribute classifier")
    except KeyboardInterrupt:
        return 130
    ema = trainer.ema["classifier"].eval()
    held = world_bank(4000, seed=args.seed + 32, exclude_held_out=False)
    x, held_labels = as_float(held["images"]), Labels.from_scenes(held["scenes"])
    g = torch.Generator().manual_seed(args.seed)
    metrics = {"clean": reading_accuracy(ema, x, held_labels), "blurred": reading_accuracy(ema, blur(x), held_labels),
               "noise 0.05": reading_accuracy(ema, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1),
                                              held_labels)}
    if vae is not None:
        metrics["vae reconstruction"] = reading_accuracy(ema, _vae_roundtrip(vae, x), held_labels)
    config = {"kind": CLASSIFIER_KIND, "image_size": IMAGE_SIZE, "architecture": ema.config(),
              "num_parameters": num_parameters(ema),
              "training": {"seed": args.seed, "steps": trainer.step, "batch_size": args.batch_size, "lr": args.lr,
                           "data": f"{args.data} world images (all shape/colour pairs), stream seed {args.seed + 31}",
                           "wall_s": round(trainer.wall, 1)},
              "metrics": {"held_out": f"4000 world images of stream seed {args.seed + 32}; fraction whose reading "
                                      "satisfies each attribute of the full caption", "accuracy": metrics}}
    out = Path(args.out)
    save_network(ema, config, out)
    (out / "tiltgen.json").write_text(json.dumps({"kind": "reward-network", "name": out.name,
                                                  "network": CLASSIFIER_KIND, "rewards": ["world-fidelity",
                                                                                          "world-binary"]},
                                                 indent=2) + "\n")
    kinds = list(next(iter(metrics.values())))
    table = ["| images | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    table += [f"| {name} | " + " | ".join(f"{acc[k]:.4f}" for k in kinds) + " |" for name, acc in metrics.items()]
    write_readme(out, out.name, f"Attribute classifier of the built-in world ({num_parameters(ema)} parameters): for "
                 "each position slot, occupancy, shape, colour and size; and the background. Used by the "
                 "`world-fidelity` and `world-binary` rewards.", ["tiltgen.builtin.recipes.classifier"] + argv,
                 f"seed {args.seed}; {trainer.step} steps of batch {args.batch_size}; training wall time "
                 f"{trainer.wall / 60:.1f} min.\n\nHeld-out accuracy ({config['metrics']['held_out']}):\n\n"
                 + "\n".join(table))
    finish(work)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fit the proxy preference (``world-proxy``) to a limited set of noisy gold comparisons.

    python -m tiltgen.builtin.recipes.proxy --out src/tiltgen/builtin/weights/proxy-preference --seed 0

Data: ``--pool`` world images (held-out pairs excluded, most of them perturbed: shifts, blends,
erasures, colour changes, blur, noise), ``--pairs`` fixed random pairs, each labelled once by
a noisy annotator: y ~ Bernoulli(sigmoid((gold(a) - gold(b)) / tau)), tau chosen so that
``--disagree`` of the labels contradict the gold order. Loss: Bradley-Terry,
BCE(sigmoid(f(a) - f(b)), y). Afterwards the output is mapped affinely to the gold's mean
and std on clean world images, so one beta tilts both about equally hard. Agreement with the
gold is measured on held-out clean and perturbed images.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...world.gold import gold_reward
from ...world.nets import IMAGE_SIZE, PROXY_KIND, ProxyPreference, num_parameters, save_network
from .augment import PERTURBATIONS, perturb
from .common import Trainer, as_float, base_parser, finish, setup, world_bank, write_readme


def _gold(x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([gold_reward(c) for c in x.split(2000)])


def _pool(n: int, seed: int) -> Tensor:
    x = as_float(world_bank(n, seed=seed)["images"])
    g = torch.Generator().manual_seed(seed)
    return torch.cat([perturb(c, g) for c in x.split(1000)])


def fit_tau(gold: Tensor, i: Tensor, j: Tensor, target: float) -> float:
    """Label temperature at which a fraction ``target`` of labels disagree with the gold (bisection)."""
    def disagreement(tau: float) -> float:
        return float(torch.sigmoid(-(gold[i] - gold[j]).abs() / tau).mean())

    lo, hi = 1e-4, 10.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if disagreement(mid) < target else (lo, mid)
    return math.sqrt(lo * hi)


def _pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def preference_metrics(score: Tensor, gold: Tensor, pairs: int = 20000, seed: int = 0) -> dict[str, float]:
    """Agreement with the gold order on random pairs, Pearson and Spearman correlation."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(len(gold), (2, pairs), generator=g)
    keep = gold[i] != gold[j]
    agree = ((score[i] - score[j]) * (gold[i] - gold[j]) > 0)[keep].float().mean()
    rank = lambda a: a.argsort().argsort().double()  # noqa: E731
    return {"pairwise_agreement": float(agree), "pearson": _pearson(score, gold),
            "spearman": _pearson(rank(score), rank(gold))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m tiltgen.builtin.recipes.proxy", __doc__, steps=2500, batch_size=128, lr=2e-3)
    parser.add_argument("--pool", type=int, default=8000, help="images the comparisons are drawn from")
    parser.add_argument("--pairs", type=int, default=30000, help="labelled comparisons")
    parser.add_argument("--disagree", type=float, default=0.2, help="fraction of labels against the gold order")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    work = setup(args)
    g = torch.Generator().manual_seed(args.seed)
    images = _pool(args.pool, args.seed + 41)
    gold = _gold(images)
    pi, pj = torch.randint(args.pool, (2, args.pairs), generator=g)
    tau = fit_tau(gold, pi, pj, args.disagree)
    labels = (torch.rand(args.pairs, generator=g) < torch.sigmoid((gold[pi] - gold[pj]) / tau)).float()
    label_agree = float(((labels > 0.5) == (gold[pi] > gold[pj]))[gold[pi] != gold[pj]].float().mean())
    model = ProxyPreference()
    trainer = Trainer({"proxy": model}, args, ema_decay=0.995, weight_decay=1e-4)

    def loss_at(step: int, gen: torch.Generator) -> Tensor:
        k = torch.randint(args.pairs, (args.batch_size,), generator=gen)
        f = model.raw(torch.cat([images[pi[k]], images[pj[k]]]))
        return F.binary_cross_entropy_with_logits(f[:args.batch_size] - f[args.batch_size:], labels[k])

    try:
        trainer.run(loss_at, work, "fit proxy preference")
    except KeyboardInterrupt:
        return 130
    ema = trainer.ema["proxy"].eval()
    clean = as_float(world_bank(4000, seed=args.seed + 42)["images"])
    perturbed = _pool(4000, args.seed + 43)
    with torch.no_grad():
        raw_clean, raw_pert = ema.raw(clean), ema.raw(perturbed)
    gold_clean, gold_pert = _gold(clean), _gold(perturbed)
    ema.scale = float(gold_clean.std() / raw_clean.std())
    ema.shift = float(gold_clean.mean() - ema.scale * raw_clean.mean())
    metrics = {"clean": preference_metrics(raw_clean, gold_clean, seed=args.seed),
               "perturbed": preference_metrics(raw_pert, gold_pert, seed=args.seed)}
    config = {"kind": PROXY_KIND, "image_size": IMAGE_SIZE, "architecture": ema.config(),
              "num_parameters": num_parameters(ema),
              "normalisation": {"scale": ema.scale, "shift": ema.shift,
                                "note": "output = scale * raw + shift: the gold's mean and std on clean world images"},
              "training": {"seed": args.seed, "steps": trainer.step, "batch_pairs": args.batch_size, "lr": args.lr,
                           "pool": f"{args.pool} world images, perturbed ({', '.join(PERTURBATIONS)})",
                           "pairs": args.pairs, "tau": tau, "label_agreement_with_gold": label_agree,
                           "wall_s": round(trainer.wall, 1)},
              "metrics": {"held_out": "4000 clean and 4000 perturbed world images; 20000 random pairs each",
                          **metrics}}
    out = Path(args.out)
    save_network(ema, config, out)
    (out / "tiltgen.json").write_text(json.dumps({"kind": "reward-network", "name": out.name, "network": PROXY_KIND,
                                                  "rewards": ["world-proxy"]}, indent=2) + "\n")
    rows = ["| images | pairwise agreement with gold | Pearson | Spearman |", "|---|---|---|---|"]
    rows += [f"| {k} | {m['pairwise_agreement']:.4f} | {m['pearson']:.4f} | {m['spearman']:.4f} |"
             for k, m in metrics.items()]
    write_readme(out, out.name, f"Proxy preference of the built-in world ({num_parameters(ema)} parameters), a "
                 f"Bradley-Terry fit to {args.pairs} noisy comparisons of {args.pool} images "
                 f"({100 * (1 - label_agree):.1f}% of labels against the gold order). Used by `world-proxy`.",
                 ["tiltgen.builtin.recipes.proxy"] + argv,
                 f"seed {args.seed}; {trainer.step} steps of {args.batch_size} pairs; training wall time "
                 f"{trainer.wall / 60:.1f} min; output = {ema.scale:.4f} * raw + {ema.shift:.4f}.\n\n"
                 f"Held-out agreement with the gold ({config['metrics']['held_out']}):\n\n" + "\n".join(rows))
    finish(work)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

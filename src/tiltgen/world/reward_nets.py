"""The two small reward networks of the built-in world and the code that trains them.

* :class:`AttributeClassifier` reads the five attributes of a one-shape 16x16 world image
  (shape, colour, size, position, background); prompt-fidelity rewards are built on it.
* :class:`ProxyPreference` is a learned stand-in for the gold preference
  (:func:`tiltgen.world.rewards.gold_reward`), fitted by Bradley-Terry maximum likelihood on
  noisy pairwise comparisons, the way real preference models are made.

Both train on one CPU core in a few minutes and are shipped in
``tiltgen/builtin/weights/{attribute-classifier,proxy-preference}``. Reproduce them with::

    python -m tiltgen.world.reward_nets classifier --out src/tiltgen/builtin/weights/attribute-classifier --seed 0
    python -m tiltgen.world.reward_nets proxy --out src/tiltgen/builtin/weights/proxy-preference --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TiltgenError
from .shapes import BACKGROUND_NAMES, COLOUR_NAMES, POSITIONS, SHAPES, SIZES, WorldConfig, batch

#: The classifier's heads, in order, with their class names (index = class id in tiltgen.world).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "position": POSITIONS, "background": BACKGROUND_NAMES,
}
IMAGE_SIZE = 16
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: Held-out data comes from the world stream ``seed + EVAL_SEED_OFFSET`` (training uses ``seed``).
EVAL_SEED_OFFSET = 100_000
CLASSIFIER_KIND = "attribute-classifier"
PROXY_KIND = "proxy-preference"


def _world() -> WorldConfig:
    # The built-in one-shape 16x16 world (tiltgen.builtin.BUILTIN_WORLD); imported lazily
    # because tiltgen.builtin imports tiltgen.world.
    from ..builtin import BUILTIN_WORLD

    return BUILTIN_WORLD


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------

def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    # Batch norm speeds up training severalfold; in eval mode it is a fixed affine map.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]


class AttributeClassifier(nn.Module):
    """Five-headed CNN on ``[N, 3, 16, 16]`` images in [0, 1] -> logits per attribute.

    Two 3x3 conv + batch-norm layers per stage, average pooling 16 -> 8 -> 4, a flattened 4x4 map (position needs
    the layout, so no global pooling) and one hidden layer. SiLU keeps its input gradients
    smooth, which matters when guidance differentiates through it.
    """

    def __init__(self, width: int = 32, hidden: int = 96):
        super().__init__()
        self.width, self.hidden = int(width), int(hidden)
        w = self.width
        self.features = nn.Sequential(
            *_conv_bn(3, w), *_conv_bn(w, w), nn.AvgPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(2 * w * (IMAGE_SIZE // 4) ** 2, self.hidden), nn.SiLU())
        self.heads = nn.Linear(self.hidden, sum(len(v) for v in ATTRIBUTES.values()))

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "hidden": self.hidden}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x`` [N, 3, 16, 16] in [0, 1] -> {attribute: logits [N, num_classes]}."""
        logits = self.heads(self.features(x * 2 - 1))
        return dict(zip(ATTRIBUTES, logits.split([len(v) for v in ATTRIBUTES.values()], dim=1)))


class ProxyPreference(nn.Module):
    """Scalar preference CNN on ``[N, 3, 16, 16]`` images in [0, 1] -> ``[N]``.

    A different design from the classifier: CoordConv input (two coordinate channels, so
    "how central" is easy to express), strided convs 16 -> 8 -> 4 and a one-hidden-layer head.
    ``forward`` returns ``scale * raw + shift``: the affine map (fitted after training, stored in
    the config) gives it the mean and standard deviation of the gold reward on world images, so a
    given beta tilts both about equally hard.
    """

    def __init__(self, width: int = 32, hidden: int = 64, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.width, self.hidden = int(width), int(hidden)
        self.scale, self.shift = float(scale), float(shift)
        w = self.width
        self.body = nn.Sequential(
            nn.Conv2d(5, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
            nn.Linear(2 * w * (IMAGE_SIZE // 4) ** 2, self.hidden), nn.SiLU(), nn.Linear(self.hidden, 1))

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "hidden": self.hidden}

    def raw(self, x: Tensor) -> Tensor:
        """Unnormalised Bradley-Terry score ``[N]``."""
        n, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
        return self.body(torch.cat([x * 2 - 1, xs, ys], dim=1)).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, 3, 16, 16] in [0, 1] -> normalised preference score [N]."""
        return self.raw(x) * self.scale + self.shift


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------

def save_network(model: nn.Module, config: dict[str, Any], out: str | Path) -> Path:
    """Write ``model.safetensors`` (float32) and ``config.json`` into the folder ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.float() if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"kind": str(config.get("kind", ""))})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_network(path: str | Path, kind: str) -> nn.Module:
    """Load a network of ``kind`` (``attribute-classifier`` / ``proxy-preference``) from a
    folder holding ``config.json`` and ``model.safetensors``; in eval mode, frozen, float32."""
    from safetensors.torch import load_file

    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    files = [folder / CONFIG_FILE, folder / WEIGHTS_FILE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise TiltgenError(f"{kind} weights folder {folder} lacks {', '.join(missing)} "
                           f"(train it with: python -m tiltgen.world.reward_nets "
                           f"{'classifier' if kind == CLASSIFIER_KIND else 'proxy'} --out {folder})")
    config = json.loads(files[0].read_text())
    if config.get("kind") != kind:
        raise TiltgenError(f"{folder} holds a {config.get('kind')!r} network, expected {kind!r}")
    arch = config["architecture"]
    if kind == CLASSIFIER_KIND:
        model: nn.Module = AttributeClassifier(**arch)
    else:
        norm = config["normalisation"]
        model = ProxyPreference(**arch, scale=norm["scale"], shift=norm["shift"])
    try:
        model.load_state_dict(load_file(str(files[1])))
    except RuntimeError as exc:
        raise TiltgenError(f"{files[1]} does not match the architecture in {files[0]}: {exc}") from None
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Image perturbations (augmentation and the proxy's training distribution)
# --------------------------------------------------------------------------------------------

def _blur(x: Tensor) -> Tensor:
    """Separable [1, 2, 1]/4 blur with replicate padding, ``[N, C, H, W]`` -> same shape."""
    k = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3).expand(c, 1, 1, 3), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1).expand(c, 1, 3, 1), groups=c)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(x: Tensor, g: torch.Generator, max_noise: float = 0.1, p_noise: float = 0.6,
            p_blur: float = 0.3) -> Tensor:
    """Light augmentation that makes the classifier robust to generated images: with probability
    ``p_blur`` a partial 3x3 blur, with probability ``p_noise`` Gaussian pixel noise of std
    ~ U(0, max_noise) (the rest stay clean, so exact world images stay in distribution), clamped
    to [0, 1]."""
    n = x.shape[0]
    blurred = _blur(x)
    alpha = _uniform(n, 0.3, 1.0, g) * (torch.rand(n, generator=g) < p_blur)
    x = x + alpha.view(n, 1, 1, 1) * (blurred - x)
    std = _uniform(n, 0.0, max_noise, g) * (torch.rand(n, generator=g) < p_noise)
    return (x + std.view(n, 1, 1, 1) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _border_mean(x: Tensor) -> Tensor:
    """Mean colour of the one-pixel border, ``[N, 3]`` (the background estimate)."""
    border = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device)
    border[1:-1, 1:-1] = False
    return x[:, :, border].mean(-1)


def _shift(x: Tensor, dx: Tensor, dy: Tensor, pad: int = 5) -> Tensor:
    """Translate each image by integer pixels (``dx``, ``dy`` in [-pad, pad]), replicating the edges."""
    n, _, h, w = x.shape
    big = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    out = torch.empty_like(x)
    for i in range(n):
        top, left = pad - int(dy[i]), pad - int(dx[i])
        out[i] = big[i, :, top:top + h, left:left + w]
    return out


PERTURBATIONS: tuple[str, ...] = ("noise", "blur", "colour", "desaturate", "erase", "shift", "blend")


def perturb(x: Tensor, g: torch.Generator, p: float = 0.18) -> Tensor:
    """Imperfect versions of world images, like what generators produce: each of
    :data:`PERTURBATIONS` is applied independently with probability ``p`` (so ~27 % of the images
    stay clean): pixel noise (std U(0.02, 0.15)), blur (1-2 passes, partial), per-channel colour
    gain/offset, desaturation, an erased rectangle (filled with the background colour), a shift
    of up to 5 pixels, and a blend with another image of the batch. Returns [N, 3, H, W] in [0, 1]."""
    n, _, h, w = x.shape
    x = x.clone()

    def pick() -> Tensor:
        return torch.rand(n, generator=g) < p

    def mix(mask: Tensor, new: Tensor) -> None:
        x[mask] = new[mask]

    sel = pick()  # shift first: later perturbations then act on the moved shape
    d = torch.randint(-5, 6, (2, n), generator=g)
    mix(sel, _shift(x, d[0], d[1]))
    sel = pick()
    other = x[torch.randperm(n, generator=g)]
    a = _uniform(n, 0.15, 0.5, g).view(n, 1, 1, 1)
    mix(sel, x + a * (other - x))
    sel = pick()
    bg = _border_mean(x)
    size = torch.randint(3, 9, (2, n), generator=g)
    corner = torch.stack([torch.randint(0, h - 2, (n,), generator=g), torch.randint(0, w - 2, (n,), generator=g)])
    erased = x.clone()
    for i in torch.nonzero(sel).flatten().tolist():
        r, c = int(corner[0, i]), int(corner[1, i])
        erased[i, :, r:r + int(size[0, i]), c:c + int(size[1, i])] = bg[i].view(3, 1, 1)
    mix(sel, erased)
    sel = pick()
    gain = _uniform(3 * n, 0.7, 1.3, g).view(n, 3, 1, 1)
    offset = _uniform(3 * n, -0.12, 0.12, g).view(n, 3, 1, 1)
    mix(sel, x * gain + offset)
    sel = pick()
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    s = _uniform(n, 0.3, 1.0, g).view(n, 1, 1, 1)
    mix(sel, x + s * (luma - x))
    sel = pick()
    once = _blur(x)
    twice = torch.where(torch.rand(n, generator=g).view(n, 1, 1, 1) < 0.5, once, _blur(once))
    a = _uniform(n, 0.4, 1.0, g).view(n, 1, 1, 1)
    mix(sel, x + a * (twice - x))
    sel = pick()
    std = _uniform(n, 0.02, 0.15, g).view(n, 1, 1, 1)
    mix(sel, x + std * torch.randn(x.shape, generator=g))
    return x.clamp(0, 1)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _cosine_lr(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _targets(labels: Any) -> Tensor:
    """One-shape world labels -> class indices ``[N, 5]`` in :data:`ATTRIBUTES` order."""
    return torch.stack([labels.shape[:, 0], labels.colour[:, 0], labels.size[:, 0], labels.position[:, 0],
                        labels.background], dim=1)


@torch.no_grad()
def classifier_accuracy(model: AttributeClassifier, images: Tensor, targets: Tensor,
                        chunk: int = 1000) -> dict[str, float]:
    """Per-attribute accuracy of ``model`` on ``images`` [N, 3, 16, 16] vs ``targets`` [N, 5],
    plus ``all`` (every attribute right)."""
    preds = []
    for i in range(0, len(images), chunk):
        logits = model(images[i:i + chunk])
        preds.append(torch.stack([v.argmax(1) for v in logits.values()], dim=1))
    hit = torch.cat(preds) == targets
    out = {name: float(hit[:, k].float().mean()) for k, name in enumerate(ATTRIBUTES)}
    out["all"] = float(hit.all(1).float().mean())
    return out


def _progress(steps: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=desc, mininterval=2.0, file=sys.stderr)


def _fit(model: nn.Module, loss_at: Callable[[int], Tensor], steps: int, lr: float, desc: str,
         progress: bool) -> float:
    """Adam with warm-up + cosine decay on ``loss_at(step)``; returns the training wall time (s)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    bar = _progress(steps, desc) if progress else range(steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return time.perf_counter() - start


def train_classifier(seed: int = 0, steps: int = 4000, batch_size: int = 128, lr: float = 3e-3,
                     width: int = 32, hidden: int = 96, eval_n: int = 5000,
                     progress: bool = True) -> tuple[AttributeClassifier, dict[str, Any]]:
    """Train the attribute classifier on fresh built-in-world images (step ``k`` uses samples
    ``k*batch_size ...`` of the world stream ``seed``) with :func:`augment`; measure held-out
    accuracy on ``eval_n`` images of the stream ``seed + EVAL_SEED_OFFSET``. Deterministic given
    the seed. Returns the model and its config (architecture, training settings, metrics)."""
    world = _world()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = AttributeClassifier(width, hidden)

    def loss_at(step: int) -> Tensor:
        x, _, labels = batch(batch_size, seed=seed, config=world, start=step * batch_size)
        y = _targets(labels)
        logits = model(augment(x, g))
        return sum(F.cross_entropy(v, y[:, k]) for k, v in enumerate(logits.values()))

    train_s = _fit(model, loss_at, steps, lr, "attribute classifier", progress)
    model.eval()
    x, _, labels = batch(eval_n, seed=seed + EVAL_SEED_OFFSET, config=world)
    y = _targets(labels)
    ge = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    metrics = {"clean": classifier_accuracy(model, x, y)}
    for std in (0.05, 0.1):
        noisy = (x + std * torch.randn(x.shape, generator=ge)).clamp(0, 1)
        metrics[f"noise_{std}"] = classifier_accuracy(model, noisy, y)
    metrics["blurred"] = classifier_accuracy(model, _blur(x), y)
    config = {
        "kind": CLASSIFIER_KIND, "format_version": 1, "image_size": IMAGE_SIZE,
        "architecture": model.config(), "num_parameters": num_parameters(model),
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "training": {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "optimizer": "Adam",
                     "schedule": "linear warmup 50 steps, cosine decay", "loss": "sum of 5 cross-entropies",
                     "data": f"built-in world (16x16, one shape), stream seed {seed}, fresh samples each step",
                     "augmentation": "partial [1,2,1] blur on 30% of images, pixel noise std~U(0,0.1) on 60%",
                     "train_seconds": round(train_s, 1), "threads": torch.get_num_threads()},
        "metrics": {"held_out": f"{eval_n} images of world stream seed {seed + EVAL_SEED_OFFSET}",
                    "accuracy": metrics},
    }
    return model, config


def _gold(x: Tensor) -> Tensor:
    from .rewards import gold_reward  # rewards.py imports this module, so import lazily

    with torch.no_grad():
        return torch.cat([gold_reward(c) for c in x.split(2000)])


def _proxy_pool(n: int, seed: int, perturb_seed: int) -> Tensor:
    """``n`` world images of stream ``seed``, perturbed (generator ``perturb_seed``)."""
    x, _, _ = batch(n, seed=seed, config=_world())
    g = torch.Generator().manual_seed(perturb_seed)
    return torch.cat([perturb(c, g) for c in x.split(1000)])


def _disagreement(gold: Tensor, i: Tensor, j: Tensor, tau: float) -> float:
    """Expected fraction of Bradley-Terry labels that contradict the gold order."""
    return float(torch.sigmoid(-(gold[i] - gold[j]).abs() / tau).mean())


def fit_tau(gold: Tensor, i: Tensor, j: Tensor, target: float = 0.2) -> float:
    """Label temperature tau at which a fraction ``target`` of labels disagree with gold (bisection)."""
    lo, hi = 1e-4, 10.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _disagreement(gold, i, j, mid) < target else (lo, mid)
    return math.sqrt(lo * hi)


def _pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def _ranks(a: Tensor) -> Tensor:
    r = torch.empty_like(a, dtype=torch.float64)
    r[a.argsort()] = torch.arange(len(a), dtype=torch.float64)
    return r


def preference_metrics(score: Tensor, gold: Tensor, pairs: int = 20000, seed: int = 0) -> dict[str, float]:
    """How well ``score`` [N] ranks like ``gold`` [N]: agreement on random pairs with distinct
    gold values, Pearson and Spearman correlation."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(len(gold), (2, pairs), generator=g)
    keep = gold[i] != gold[j]
    agree = ((score[i] - score[j]) * (gold[i] - gold[j]) > 0)[keep].float().mean()
    return {"pairwise_agreement": float(agree), "pearson": _pearson(score, gold),
            "spearman": _pearson(_ranks(score), _ranks(gold))}


def train_proxy(seed: int = 0, steps: int = 3000, batch_pairs: int = 128, lr: float = 2e-3,
                width: int = 32, hidden: int = 64, pool: int = 24000, num_pairs: int = 200000,
                disagree: float = 0.2, eval_n: int = 4000,
                progress: bool = True) -> tuple[ProxyPreference, dict[str, Any]]:
    """Fit the proxy preference model by Bradley-Terry maximum likelihood.

    Data: ``pool`` images (world stream ``seed``, :func:`perturb`-ed) scored by the gold reward;
    ``num_pairs`` fixed random pairs (a, b) labelled once, ``y ~ Bernoulli(sigmoid((gold(a) -
    gold(b)) / tau))`` with tau set so a fraction ``disagree`` of labels contradict the gold
    order (noisy annotators). Loss: ``BCE(sigmoid(f(a) - f(b)), y)``. Afterwards the output is
    affinely normalised to gold's mean and std on clean held-out world images, and agreement and
    correlations with gold are measured on held-out images (stream ``seed + EVAL_SEED_OFFSET``).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images = _proxy_pool(pool, seed, seed)
    gold = _gold(images)
    pi, pj = torch.randint(pool, (2, num_pairs), generator=g)
    tau = fit_tau(gold, pi, pj, disagree)
    labels = (torch.rand(num_pairs, generator=g) < torch.sigmoid((gold[pi] - gold[pj]) / tau)).float()
    label_agree = float(((labels > 0.5) == (gold[pi] > gold[pj]))[gold[pi] != gold[pj]].float().mean())
    model = ProxyPreference(width, hidden)

    def loss_at(step: int) -> Tensor:
        k = torch.randint(num_pairs, (batch_pairs,), generator=g)
        f = model.raw(torch.cat([images[pi[k]], images[pj[k]]]))
        return F.binary_cross_entropy_with_logits(f[:batch_pairs] - f[batch_pairs:], labels[k])

    train_s = _fit(model, loss_at, steps, lr, "proxy preference", progress)
    model.eval()
    eval_seed = seed + EVAL_SEED_OFFSET
    clean, _, _ = batch(eval_n, seed=eval_seed, config=_world())
    perturbed = _proxy_pool(eval_n, eval_seed, eval_seed)
    with torch.no_grad():
        raw_clean, raw_pert = model.raw(clean), model.raw(perturbed)
    gold_clean, gold_pert = _gold(clean), _gold(perturbed)
    # Match gold's mean and std on clean world images, so one beta means a similar tilt for both.
    model.scale = float(gold_clean.std() / raw_clean.std())
    model.shift = float(gold_clean.mean() - model.scale * raw_clean.mean())
    metrics = {"perturbed": preference_metrics(raw_pert, gold_pert, seed=eval_seed),
               "clean": preference_metrics(raw_clean, gold_clean, seed=eval_seed),
               "gold_std_clean": float(gold_clean.std()), "gold_mean_clean": float(gold_clean.mean())}
    config = {
        "kind": PROXY_KIND, "format_version": 1, "image_size": IMAGE_SIZE,
        "architecture": model.config(), "num_parameters": num_parameters(model),
        "normalisation": {"scale": model.scale, "shift": model.shift,
                          "note": "output = scale * raw + shift; matches gold's mean/std on clean world images"},
        "training": {"seed": seed, "steps": steps, "batch_pairs": batch_pairs, "lr": lr, "optimizer": "Adam",
                     "schedule": "linear warmup 50 steps, cosine decay",
                     "loss": "Bradley-Terry: BCE(sigmoid(f(a) - f(b)), y)",
                     "pool": f"{pool} images of world stream seed {seed}, perturbed ({', '.join(PERTURBATIONS)})",
                     "pairs": num_pairs, "tau": tau, "target_disagreement": disagree,
                     "label_agreement_with_gold": label_agree,
                     "train_seconds": round(train_s, 1), "threads": torch.get_num_threads()},
        "metrics": {"held_out": f"{eval_n} clean and {eval_n} perturbed images of world stream seed {eval_seed}; "
                                f"20000 random pairs each", **metrics},
    }
    return model, config


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _readme(config: dict[str, Any], command: str) -> str:
    """The README.md written next to the weights: what, how to reproduce, measured metrics."""
    t, m = config["training"], config["metrics"]
    if config["kind"] == CLASSIFIER_KIND:
        what = ("Attribute classifier of tiltgen's built-in shapes world: a small CNN "
                f"({config['num_parameters']} parameters) reading shape, colour, size, position and background "
                "of a one-shape 16x16 image. Used by the `world-fidelity` and `world-fidelity-match` rewards "
                "and `tiltgen.world.rewards.attribute_agreement`.")
        rows = ["| images | " + " | ".join(list(ATTRIBUTES) + ["all"]) + " |",
                "|---" * (len(ATTRIBUTES) + 2) + "|"]
        for name, acc in m["accuracy"].items():
            rows.append(f"| {name} | " + " | ".join(f"{acc[k]:.4f}" for k in list(ATTRIBUTES) + ["all"]) + " |")
        table = f"Held-out accuracy ({m['held_out']}):\n\n" + "\n".join(rows)
    else:
        what = ("Proxy preference model of tiltgen's built-in shapes world: a small CoordConv CNN "
                f"({config['num_parameters']} parameters) fitted by Bradley-Terry maximum likelihood to noisy "
                "pairwise comparisons labelled by the gold reward (`world-gold`), "
                f"with {100 * (1 - t['label_agreement_with_gold']):.1f}% of labels contradicting the gold order "
                f"(tau = {t['tau']:.4f}). Used by the `world-proxy` reward. Output = "
                f"{config['normalisation']['scale']:.4f} * raw + {config['normalisation']['shift']:.4f} "
                "(gold's mean and std on clean world images).")
        rows = ["| images | pairwise agreement with gold | Pearson | Spearman |", "|---|---|---|---|"]
        for name in ("clean", "perturbed"):
            r = m[name]
            rows.append(f"| {name} | {r['pairwise_agreement']:.4f} | {r['pearson']:.4f} | {r['spearman']:.4f} |")
        table = f"Held-out metrics ({m['held_out']}):\n\n" + "\n".join(rows)
    contents = "architecture, output normalisation, training settings, held-out metrics" \
        if config["kind"] == PROXY_KIND else "architecture, training settings, held-out metrics"
    return (f"# {config['kind']}\n\n{what}\n\nFiles: `model.safetensors` (float32 weights), `config.json` "
            f"({contents}).\n\n"
            f"Reproduce (seed {t['seed']}, one CPU thread, {t['train_seconds']:.0f} s of training here):\n\n"
            f"```bash\n{command}\n```\n\nTraining is deterministic given the seed (on one CPU thread); "
            "see docs/world-rewards.md.\n\n" + table + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiltgen.world.reward_nets",
                                     description="Train the built-in world's reward networks.")
    parser.add_argument("which", choices=["classifier", "proxy"])
    parser.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, README.md)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps runs reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train: Callable[..., tuple[nn.Module, dict[str, Any]]] = train_classifier if args.which == "classifier" \
        else train_proxy
    kwargs = {} if args.steps is None else {"steps": args.steps}
    model, config = train(seed=args.seed, **kwargs)
    command = (f"python -m tiltgen.world.reward_nets {args.which} --out {args.out} --seed {args.seed}"
               + ("" if args.steps is None else f" --steps {args.steps}"))
    config["training"]["command"] = command
    out = save_network(model, config, args.out)
    (out / "README.md").write_text(_readme(config, command))
    print(json.dumps(config["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

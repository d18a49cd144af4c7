"""What every recipe shares: a resumable training loop, cached world data, README writing.

A recipe run owns a work folder (``<out>/.work``). Every step's data and noise come from a
generator seeded by ``(seed, step)``; a checkpoint (weights, EMA, optimiser, step, losses) is
written every ``checkpoint_every`` steps and on Ctrl-C, so rerunning the same command with
``--resume`` continues exactly where it stopped. A resumed run whose settings differ from the
checkpoint's is refused, naming the keys that differ.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...errors import TiltgenError

CHECKPOINT = "checkpoint.pt"
CACHE_ENV = "TILTGEN_RECIPE_CACHE"
_STARTED: list[float] = []  # when this process's recipe started (for the README's total time)


def base_parser(prog: str, doc: str, steps: int, batch_size: int, lr: float) -> argparse.ArgumentParser:
    """Arguments every recipe takes."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from <out>/.work/checkpoint.pt")
    return p


def setup(args: argparse.Namespace) -> Path:
    """Threads, seeds and the work folder of a run; returns the work folder."""
    _STARTED[:] = [time.perf_counter()]  # one recipe per setup, even when a process runs several
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.out) / ".work"
    if work.is_dir() and (work / CHECKPOINT).is_file() and not args.resume:
        raise TiltgenError(f"{work} holds an interrupted run; pass --resume to continue it, or remove it")
    work.mkdir(parents=True, exist_ok=True)
    return work


def cosine_lr(step: int, steps: int, lr: float, warmup: int = 200) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def _ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(ema.buffers(), live.buffers()):  # e.g. batch-norm statistics
            e.copy_(b)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    # what must match for a resume (not where or how fast it runs)
    skip = {"out", "resume", "threads", "checkpoint_every", "func"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


@dataclass
class Trainer:
    """Optimise ``modules`` (AdamW, cosine lr, gradient clipping, EMA copies) with resume."""

    modules: dict[str, nn.Module]
    args: argparse.Namespace
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    step: int = 0
    wall: float = 0.0
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for m in self.modules.values():
            m.train()
        self.ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in self.modules.items()}
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.args.lr, weight_decay=self.weight_decay)

    def state(self) -> dict[str, Any]:
        return {"modules": {k: m.state_dict() for k, m in self.modules.items()},
                "ema": {k: m.state_dict() for k, m in self.ema.items()}, "opt": self.opt.state_dict(),
                "step": self.step, "wall": self.wall, "losses": self.losses, "settings": _settings(self.args)}

    def load(self, state: dict[str, Any]) -> None:
        diff = differing_keys(state.get("settings", {}), _settings(self.args))
        if diff:
            raise TiltgenError(f"cannot resume: the settings differ from the checkpoint's in {', '.join(diff)}")
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
            self.ema[k].load_state_dict(state["ema"][k])
        self.opt.load_state_dict(state["opt"])
        self.step, self.wall, self.losses = state["step"], state["wall"], state["losses"]

    def run(self, loss_at: Callable[[int, torch.Generator], Tensor], work: Path, desc: str) -> None:
        """Minimise ``loss_at(step, generator)`` up to ``args.steps``, checkpointing into ``work``."""
        args = self.args
        ckpt = work / CHECKPOINT
        if args.resume and ckpt.is_file():
            self.load(torch.load(ckpt, weights_only=False))
        bar = tqdm(total=args.steps, initial=self.step, desc=desc, dynamic_ncols=True)
        try:
            while self.step < args.steps:
                tick = time.perf_counter()
                g = torch.Generator().manual_seed(args.seed * 1_000_003 + self.step)
                for group in self.opt.param_groups:
                    group["lr"] = cosine_lr(self.step, args.steps, args.lr)
                loss = loss_at(self.step, g)
                if not torch.isfinite(loss):
                    raise TiltgenError(f"{desc}: the loss became non-finite at step {self.step}")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.opt.step()
                decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
                for k, m in self.modules.items():
                    _ema_update(self.ema[k], m, decay)
                self.step += 1
                self.wall += time.perf_counter() - tick
                self.losses.append(float(loss.detach()))
                bar.update()
                if self.step % 25 == 0:
                    bar.set_postfix(loss=f"{np.mean(self.losses[-25:]):.4f}")
                if self.step % args.checkpoint_every == 0:
                    save_atomic(self.state(), ckpt)
        except KeyboardInterrupt:
            save_atomic(self.state(), ckpt)
            print(f"\ninterrupted at step {self.step}; checkpoint in {ckpt}; continue with --resume", file=sys.stderr)
            raise
        finally:
            bar.close()

    def final_loss(self) -> float:
        tail = self.losses[-100:]
        return float(np.mean(tail)) if tail else float("nan")


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cache_dir() -> Path:
    """Where recipes keep data they can rebuild (rendered banks, encoded latents, teacher pairs)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "tiltgen-recipes"))


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of every parameter and buffer of ``module``: a cache key that follows the
    weights, not the folder they were loaded from."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cached(name: str, key: dict[str, Any], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``build()``'s result, saved under the cache folder by a hash of ``key`` (rebuilt if absent)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{digest}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(value, path)
    return value


def world_bank(n: int, seed: int, exclude_held_out: bool = True, chunk: int = 2048) -> dict[str, Any]:
    """``n`` world images (uint8 [n, 3, 32, 32]) and their scenes, from the stream ``seed``;
    with ``exclude_held_out`` no shape has a held-out (shape, colour) pair. Cached."""
    from ...world import HELD_OUT_PAIRS, WorldConfig, batch

    config = WorldConfig(exclude_pairs=HELD_OUT_PAIRS if exclude_held_out else ())

    def build() -> dict[str, Any]:
        images, scenes = [], []
        for start in tqdm(range(0, n, chunk), desc=f"render {n} world images", dynamic_ncols=True):
            x, _, labels = batch(min(chunk, n - start), seed=seed, config=config, start=start)
            images.append((x * 255).round().to(torch.uint8))
            scenes.extend(labels.scenes)
        return {"images": torch.cat(images), "scenes": scenes}

    return cached("world-bank", {"n": n, "seed": seed, "config": repr(config), "version": 1}, build)


def as_float(images: Tensor) -> Tensor:
    """uint8 images -> float in [0, 1]."""
    return images.float() / 255


def write_readme(out: Path, title: str, what: str, command: Sequence[str], details: str) -> None:
    """The folder's README: what it is, the exact command and seed that reproduce it, how it went."""
    # training wall time accumulates over resumes; this is only the last invocation's
    total = f" Wall time of the invocation that finished the run {(time.perf_counter() - _STARTED[0]) / 60:.1f} " \
            "min (data preparation included unless cached; a resumed run counts only its own part)." \
        if _STARTED else ""
    (out / "README.md").write_text(
        f"# {title}\n\n{what}\n\nReproduce (2 CPU cores, torch 2.13.0 CPU):\n\n"
        f"```bash\npython -m {' '.join(command)}\n```\n\n{details}{total}\n")


def finish(work: Path) -> None:
    """Remove the work folder of a finished run (checkpoints are not shipped)."""
    import shutil

    shutil.rmtree(work, ignore_errors=True)

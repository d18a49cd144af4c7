"""Train the built-in base models on the shapes world (the scripts behind ``weights/shapes-*``).

    python -m tiltgen.builtin.train_models diffusion --out runs/shapes-diffusion
    python -m tiltgen.builtin.train_models flow      --out runs/shapes-flow
    python -m tiltgen.builtin.train_models onestep   --out runs/shapes-onestep --teacher runs/shapes-diffusion

* ``diffusion``: VP cosine schedule, v-prediction, denoising loss (MSE on v).
* ``flow``: rectified flow (alpha = 1 - t, sigma = t), velocity prediction (MSE on eps - x0).
* ``onestep``: knowledge distillation of the diffusion model's deterministic sampler into one
  step (Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative Models for
  Improved Sampling Speed"): a student initialised from the teacher regresses the teacher's
  DDIM(+CFG) endpoint x0 from the same initial noise, in one model call.

Both base models drop the caption 10% of the time (classifier-free guidance) and keep an
exponential moving average of the weights, which is what is saved. Each step's data and noise
depend only on (seed, step), and a checkpoint is written every ``--checkpoint-every`` steps and
on Ctrl-C, so ``--resume`` continues an interrupted run exactly.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.conversions import coefficients, to_x0_eps
from ..core.schedules import RectifiedFlow, Schedule, VPCosine
from ..errors import TiltgenError
from ..world import MAX_TOKENS, PAD_ID, tokenize_batch
from . import IMAGE_SIZE
from .data import training_batch, world_data_var
from .models import BuiltinModel, build_networks, encode_text, load_model, model_config, save_model, unet_output

CHECKPOINT = "checkpoint.pt"


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1 - decay)


def _lr(step: int, steps: int, lr: float, warmup: int = 200) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _drop_captions(ids: Tensor, p: float, g: torch.Generator) -> Tensor:
    drop = torch.rand(ids.shape[0], generator=g) < p
    return torch.where(drop[:, None], torch.full_like(ids, PAD_ID), ids)


class Trainer:
    """One run: networks, EMA copies, optimiser, step counter, checkpoint and resume."""

    def __init__(self, unet: Any, text_encoder: Any, args: argparse.Namespace):
        self.unet, self.text_encoder = unet.train(), text_encoder.train()
        self.ema_unet, self.ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
        params = list(unet.parameters()) + list(text_encoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        self.args = args
        self.step = 0
        self.wall = 0.0
        self.losses: list[float] = []

    def state(self) -> dict:
        return {"unet": self.unet.state_dict(), "text": self.text_encoder.state_dict(),
                "ema_unet": self.ema_unet.state_dict(), "ema_text": self.ema_text.state_dict(),
                "opt": self.opt.state_dict(), "step": self.step, "wall": self.wall, "losses": self.losses}

    def load(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text"])
        self.ema_unet.load_state_dict(state["ema_unet"])
        self.ema_text.load_state_dict(state["ema_text"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.wall, self.losses = state["step"], state["wall"], state["losses"]

    def run(self, loss_at: Callable[[int, torch.Generator], Tensor], work: Path) -> None:
        """Optimise ``loss_at(step, generator)`` to ``args.steps``, checkpointing into ``work``."""
        args = self.args
        ckpt = work / CHECKPOINT
        if args.resume and ckpt.is_file():
            self.load(torch.load(ckpt, weights_only=False))
        bar = tqdm(total=args.steps, initial=self.step, desc=f"train {args.command}")
        try:
            while self.step < args.steps:
                tick = time.perf_counter()
                g = torch.Generator().manual_seed(args.seed * 1_000_003 + self.step)
                for group in self.opt.param_groups:
                    group["lr"] = _lr(self.step, args.steps, args.lr)
                loss = loss_at(self.step, g)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.text_encoder.parameters()), 1.0)
                self.opt.step()
                decay = min(args.ema, (1 + self.step) / (10 + self.step))
                _ema_update(self.ema_unet, self.unet, decay)
                _ema_update(self.ema_text, self.text_encoder, decay)
                self.step += 1
                self.wall += time.perf_counter() - tick
                self.losses.append(float(loss.detach()))
                bar.update()
                if self.step % 25 == 0:
                    bar.set_postfix(loss=f"{sum(self.losses[-25:]) / 25:.4f}")
                if self.step % args.checkpoint_every == 0:
                    torch.save(self.state(), ckpt)
        except KeyboardInterrupt:
            torch.save(self.state(), ckpt)
            print(f"\ninterrupted at step {self.step}; checkpoint in {ckpt}; continue with --resume", file=sys.stderr)
            raise
        finally:
            bar.close()


def _world_loss(schedule: Schedule, prediction: str, trainer: Trainer, args: argparse.Namespace
                ) -> Callable[[int, torch.Generator], Tensor]:
    """Denoising loss on a fresh world batch: MSE between the network and the ``prediction``
    of (x0, eps) at t ~ U(0, t_max)."""
    from ..core.conversions import from_x0_eps

    def loss_at(step: int, g: torch.Generator) -> Tensor:
        images, captions, _ = training_batch(args.batch_size, args.seed, step * args.batch_size)
        x0 = images * 2 - 1
        ids = _drop_captions(tokenize_batch(captions), args.caption_dropout, g)
        t = torch.rand(x0.shape[0], generator=g) * schedule.t_max
        eps = torch.randn(x0.shape, generator=g)
        c = coefficients(schedule, t, x0)
        x_t = c.alpha * x0 + c.sigma * eps
        hidden, pooled = encode_text(trainer.text_encoder, ids)
        out = unet_output(trainer.unet, x_t, t, hidden, pooled)
        return (out - from_x0_eps(prediction, x0, eps, c)).pow(2).mean()

    return loss_at


def teacher_pairs(teacher: BuiltinModel, n: int, steps: int, seed: int, chunk: int = 512
                  ) -> tuple[Tensor, Tensor, list[str]]:
    """(initial noise x_T [n, 3, S, S], teacher endpoint x0 [n, 3, S, S], captions) from the
    teacher's own deterministic sampler (its default CFG), prompts from the training stream."""
    xs, x0s, caps = [], [], []
    start = 0
    bar = tqdm(total=n, desc="teacher samples")
    while sum(len(c) for c in caps) < n:
        _, captions, start = training_batch(min(chunk, n), seed + 7, start)
        captions = captions[: n - sum(len(c) for c in caps)]
        seeds = list(range(seed * 10_000_000 + start, seed * 10_000_000 + start + len(captions)))
        grid = teacher.times(steps)
        x_init = teacher.initial_noise(seeds, float(grid[0]))
        out = teacher.sample(teacher.encode(captions), seeds=seeds, steps=steps, sampler="ddim")
        xs.append(x_init)
        x0s.append(out.states)
        caps.append(captions)
        bar.update(len(captions))
    bar.close()
    return torch.cat(xs), torch.cat(x0s), [c for part in caps for c in part]


def _distill_loss(teacher: BuiltinModel, trainer: Trainer, pairs: tuple[Tensor, Tensor, list[str]],
                  args: argparse.Namespace) -> Callable[[int, torch.Generator], Tensor]:
    x_init, x0_teacher, captions = pairs
    ids_all = tokenize_batch(captions)
    t_max = teacher.schedule.t_max

    def loss_at(step: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, x_init.shape[0], (args.batch_size,), generator=g)
        x, target = x_init[idx], x0_teacher[idx]
        t = torch.full((x.shape[0],), t_max)
        hidden, pooled = encode_text(trainer.text_encoder, ids_all[idx])
        out = unet_output(trainer.unet, x, t, hidden, pooled)
        x0, _ = to_x0_eps(teacher.prediction, out, x, coefficients(teacher.schedule, t, x))
        return (x0 - target).pow(2).mean()

    return loss_at


def _readme(out: Path, args: argparse.Namespace, what: str, trainer: Trainer, argv: Sequence[str]) -> None:
    tail = trainer.losses[-100:]
    (out / "README.md").write_text(
        f"# {out.name}\n\n{what}\n\nReproduce (2 CPU cores, torch 2.13.0 CPU; float16 weights of the EMA):\n\n"
        f"    python -m tiltgen.builtin.train_models {' '.join(argv)}\n\n"
        f"seed {args.seed}; {trainer.step} steps of batch {args.batch_size}, AdamW lr {args.lr} "
        f"(warm-up 200, cosine), EMA {args.ema}; training wall time {trainer.wall / 60:.1f} min; "
        f"final mean loss (last 100 steps) {sum(tail) / max(1, len(tail)):.4f}.\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiltgen.builtin.train_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("diffusion", "flow", "onestep"))
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--cfg", type=float, default=2.0, help="default classifier-free guidance scale")
    parser.add_argument("--width", type=int, default=32, help="UNet base channels")
    parser.add_argument("--teacher", help="onestep: the diffusion model folder (or builtin:shapes-diffusion)")
    parser.add_argument("--pairs", type=int, default=8192, help="onestep: teacher (noise, sample) pairs")
    parser.add_argument("--teacher-steps", type=int, default=25, help="onestep: teacher DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--resume", action="store_true", help="continue from --out/.work/checkpoint.pt")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    try:
        if args.command == "onestep":
            if not args.teacher:
                raise TiltgenError("onestep needs --teacher (the diffusion model to distil)")
            teacher = load_model(args.teacher)
            pairs_file = work / "pairs.pt"
            if args.resume and pairs_file.is_file():
                pairs = torch.load(pairs_file)
            else:
                pairs = teacher_pairs(teacher, args.pairs, args.teacher_steps, args.seed)
                torch.save(pairs, pairs_file)
            unet, text = copy.deepcopy(teacher.unet), copy.deepcopy(teacher.text_encoder)
            trainer = Trainer(unet.requires_grad_(True), text.requires_grad_(True), args)
            trainer.run(_distill_loss(teacher, trainer, pairs, args), work)
            schedule, prediction = teacher.schedule, teacher.prediction
            config = model_config("onestep", schedule, prediction, IMAGE_SIZE, cfg_scale=1.0, default_steps=1,
                                  default_sampler="ddim", distilled_from=str(args.teacher),
                                  distillation="knowledge distillation of the teacher's DDIM+CFG sampler "
                                               "(Luhman & Luhman 2021)",
                                  teacher_steps=args.teacher_steps, teacher_cfg=teacher.cfg_scale, pairs=args.pairs,
                                  seed=args.seed)
            what = (f"One-step generator distilled from `{args.teacher}` ({args.pairs} pairs of its "
                    f"{args.teacher_steps}-step DDIM sampler with CFG {teacher.cfg_scale:g}).")
        else:
            unet, text = build_networks(IMAGE_SIZE, args.width)
            schedule, prediction, steps, sampler = ((VPCosine(), "v", 50, "ddim") if args.command == "diffusion"
                                                    else (RectifiedFlow(), "velocity", 50, "euler"))
            trainer = Trainer(unet, text, args)
            trainer.run(_world_loss(schedule, prediction, trainer, args), work)
            config = model_config(args.command, schedule, prediction, IMAGE_SIZE, cfg_scale=args.cfg,
                                  default_steps=steps, default_sampler=sampler, seed=args.seed,
                                  caption_dropout=args.caption_dropout, train_steps=args.steps,
                                  batch_size=args.batch_size)
            what = ("Text-conditional VP diffusion model (cosine schedule, v-prediction)" if args.command == "diffusion"
                    else "Text-conditional rectified-flow model (velocity prediction)") + \
                " on the built-in shapes world (16x16, one shape, held-out combinations excluded)."
    except KeyboardInterrupt:
        return 130
    config["train_wall_s"] = trainer.wall
    config["data_var"] = world_data_var()
    save_model(out, trainer.ema_unet, trainer.ema_text, config)
    _readme(out, args, what, trainer, argv)
    shutil.rmtree(work)
    print(f"model written to {out} ({trainer.step} steps, {trainer.wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

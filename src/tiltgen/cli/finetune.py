"""``tiltgen finetune``: the fine-tuning baselines (rwdsm, draft, dpo) from a pipeline folder to one."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TiltgenError
from .sample import DTYPES, prompts_from_args, resume_hint, writable_dir


def _budgets(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise TiltgenError(f"--budgets must be comma-separated step counts, got {text!r}") from None


def _finetune(args: argparse.Namespace) -> int:
    import torch

    from ..core.distributed import join_processes, launch_config, set_threads
    from ..finetune import FinetuneConfig, finetune
    from ..rewards import reward_from_spec

    launched = launch_config()  # accelerate launch's mixed precision / accumulation, unless given here
    mixed_precision = args.mixed_precision or launched.get("mixed_precision", "no")
    grad_accum = args.grad_accum or launched.get("grad_accum", 1)
    config = FinetuneConfig(method=args.method, beta=args.beta, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, budgets=_budgets(args.budgets),
                            checkpoint_every=args.checkpoint_every, lora_rank=args.lora_rank,
                            samples_per_prompt=args.samples_per_prompt, data_steps=args.data_steps, cfg=args.cfg,
                            draft_k=args.draft_k, reg=args.reg, dpo_scale=args.dpo_scale, height=args.height,
                            width=args.width, grad_accum=grad_accum, mixed_precision=mixed_precision)

    prompts = prompts_from_args(args)
    writable_dir(Path(args.out))  # before the model loads
    reward = reward_from_spec(args.reward)
    processes = join_processes(args.device)
    set_threads(processes.local_world_size, args.threads)
    with resume_hint(processes, f"the base samples and the last checkpoint are kept in {args.out}"):
        record = finetune(args.model, reward, prompts, config, args.out, resume=args.resume,
                          progress=not args.no_progress, device=processes.device,
                          dtype=getattr(torch, DTYPES[args.dtype]), cache_dir=args.cache_dir,
                          gradient_checkpointing=args.gradient_checkpointing, processes=processes)
    if not processes.is_main:
        return 0
    compute = record["compute"]
    print(f"fine-tuned pipeline written to {args.out} ({record['method']}, {compute['train']['steps']} steps; "
          f"budgets: {', '.join(record['budgets']) or 'none'}); total {compute['total_flops']:.3g} FLOPs "
          f"(data {compute['data']['flops']:.3g}, training {compute['train']['flops']:.3g})")
    return 0


def add_finetune_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "finetune", help="fine-tuning baselines: reward-weighted DSM, DRaFT/AlignProp, Diffusion-DPO",
        description="Fine-tune a diffusers pipeline's denoiser towards p* ∝ p·exp(r/β) and write pipeline folders "
                    "(one per --budgets step and the final one in --out) that tiltgen sample and plain diffusers "
                    "load. rwdsm: DSM on base samples weighted by exp(r/β) per prompt; draft: back-propagate r/β "
                    "through the last --draft-k sampler steps (a one-step generator: direct reward fine-tuning), "
                    "minus --reg times the squared distance to the base model's output; dpo: Diffusion-DPO on "
                    "pairs of base samples with labels σ((r_a − r_b)/β). Killed runs continue with --resume.")
    p.add_argument("--method", required=True, choices=["rwdsm", "draft", "dpo"])
    p.add_argument("--model", required=True, help="builtin:<name>, a diffusers pipeline folder or a cached model id")
    p.add_argument("--reward", required=True, help="reward spec, e.g. world-proxy or 'pickscore:1.0,aesthetic:0.5'")
    p.add_argument("--beta", type=float, required=True, help="tilt temperature β > 0")
    p.add_argument("--prompt", action="append", help="a training prompt (repeatable)")
    p.add_argument("--prompts", "--prompts-file", dest="prompts_file", metavar="FILE",
                   help="prompt file: .txt (one per line), .jsonl or .csv (a 'prompt' field)")
    p.add_argument("--out", required=True, help="output folder (the final pipeline, budgets, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the killed run in --out")
    p.add_argument("--steps", type=int, default=500, help="optimiser steps (default 500)")
    p.add_argument("--budgets", help="comma-separated steps at which a pipeline folder is also written")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank through peft (default 0: full fine-tuning)")
    p.add_argument("--samples-per-prompt", type=int, default=16, help="rwdsm, dpo: base samples per prompt")
    p.add_argument("--data-steps", type=int, help="sampler steps of the base samples and of draft (default: the "
                                                  "model's own)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale of sampling (default: the model's)")
    p.add_argument("--draft-k", type=int, default=1, help="draft: sampler steps back-propagated through")
    p.add_argument("--reg", type=float, default=1.0, help="draft: weight of the distance to the base output")
    p.add_argument("--dpo-scale", type=float, default=1000.0,
                   help="dpo: per-element loss difference -> log-likelihood ratio (Diffusion-DPO's β·T)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default=None,
                   help="cpu, cuda, ... (default: this process's GPU under a launcher, else cuda if available, else cpu)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per step: the same step with 1/K of the activation memory (default: "
                        "accelerate launch's gradient_accumulation_steps, else 1)")
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                   help="autocast the forward passes of the loss; the weights and optimiser stay float32, fp16 "
                        "scales the loss (default: accelerate launch's mixed_precision, else no)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads per process (default: $OMP_NUM_THREADS, else cores / local processes)")
    p.add_argument("--cache-dir", help="Hugging Face cache (default: HF_HUB_CACHE)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, more time; real checkpoints)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_finetune)

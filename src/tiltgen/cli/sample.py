"""``tiltgen sample``: reward-tilted sampling from a diffusers pipeline (local folder or cached model id)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import TiltgenError

METHODS = ("unguided", "tweedie", "trainingfree", "learned")
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


def add_sample_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "sample", help="sample a diffusers pipeline with reward guidance",
        description="Generate images from a diffusers pipeline (SD, SD-Turbo, SDXL, SDXL-Turbo, SD3, FLUX) "
                    "tilted towards a reward: p*(x|c) ~ p(x|c) exp(r(x,c)/beta). Saves PNGs and sample.json.")
    p.add_argument("--model", required=True, help="save_pretrained folder or model id in the local HF cache")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--reward", help="reward spec, e.g. 'pickscore:1.0,aesthetic(head=/w/head.pth):0.5'")
    p.add_argument("--eval-reward", help="held-out rewards, only evaluated and reported (same spec syntax)")
    p.add_argument("--method", default="unguided", choices=METHODS)
    p.add_argument("--beta", type=float, default=0.1, help="tilt temperature (smaller = stronger)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplier of the guidance term")
    p.add_argument("--t-window", type=float, nargs=2, metavar=("LO", "HI"), help="guide only for t in [LO, HI]")
    p.add_argument("--guidance", help="--method learned: folder written by train-guidance")
    p.add_argument("--data-var", type=float, default=1.0, help="--method trainingfree: latent variance")
    p.add_argument("--variant", default="linear", help="--method trainingfree: linear, newton or snis")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 1 for turbo-style, else 30)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (FLUX: embedded guidance)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="FLUX only: true CFG scale with the negative prompt")
    p.add_argument("--sampler", default="ddim", help="ddim (= the pipeline's own update), euler, heun, ddpm, sde")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", help="Hugging Face cache (default: HF_HUB_CACHE)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="save memory in backward passes")
    p.add_argument("--max-sequence-length", type=int, help="SD3/FLUX T5 tokens")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_sample)


def prompts_from_args(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise TiltgenError(f"prompts file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise TiltgenError("give at least one --prompt or a --prompts-file")
    return prompts


def _estimator(args: argparse.Namespace, model: Any, reward: Any) -> Any:
    window = tuple(args.t_window) if args.t_window else None
    if args.method == "unguided":
        return None
    if args.method == "learned":
        if not args.guidance:
            raise TiltgenError("--method learned needs --guidance PATH (a folder written by train-guidance)")
        from ..tilt.learned import load_guidance

        record_path = Path(args.guidance) / "guidance.json"
        cond_dim = 0
        if record_path.is_file():
            cond_dim = int(json.loads(record_path.read_text()).get("net", {}).get("cond_dim", 0) or 0)
        # prompt-conditional networks are trained on model.prompt_embedding (pooled text embedding)
        encoder = model.prompt_embedding if cond_dim > 0 else None
        estimator = load_guidance(args.guidance, cond_encoder=encoder, scale=args.scale)
        if window is not None:
            estimator.t_window = window
        return estimator
    if reward is None:
        raise TiltgenError(f"--method {args.method} needs --reward")
    latent_reward = model.latent_reward(reward)
    if args.method == "tweedie":
        from ..tilt import TweedieGuidance

        return TweedieGuidance(latent_reward, args.beta, scale=args.scale, t_window=window)
    from ..tilt.training_free import TrainingFreeGuidance

    return TrainingFreeGuidance(latent_reward, args.beta, model.schedule, data_var=args.data_var, variant=args.variant,
                                scale=args.scale, t_window=window, seed=args.seed)


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from ..backends.diffusers import DiffusersBackend
    from ..core.reward import evaluate_reward

    prompts = prompts_from_args(args)
    if args.method in ("tweedie", "trainingfree") and not args.reward:  # fail before loading gigabytes
        raise TiltgenError(f"--method {args.method} needs --reward")
    if args.method == "learned" and not args.guidance:
        raise TiltgenError("--method learned needs --guidance PATH (a folder written by train-guidance)")
    if args.n < 1:
        raise TiltgenError(f"--n must be >= 1, got {args.n}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TiltgenError(f"output path {out} exists and is not a directory")
    reward = None
    if args.reward:
        from ..rewards import reward_from_spec

        reward = reward_from_spec(args.reward)
    held_out = {}
    if args.eval_reward:
        from ..rewards import get_reward, parse_reward_spec

        for name, kwargs, _ in parse_reward_spec(args.eval_reward)[0]:
            held_out[name] = get_reward(name, **kwargs)
    dtype = getattr(torch, DTYPES[args.dtype])
    backend = DiffusersBackend.from_pretrained(args.model, dtype=dtype, device=args.device, cache_dir=args.cache_dir,
                                               gradient_checkpointing=args.gradient_checkpointing)
    model = backend.at(args.height, args.width, guidance_scale=args.cfg)
    all_prompts = [p for p in prompts for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(all_prompts))]
    extra = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
    if backend.family == "flux":
        extra["true_cfg_scale"] = args.true_cfg
    cond = model.encode(all_prompts, args.negative_prompt, guidance_scale=args.cfg, **extra)
    steps = args.steps or 30
    estimator = _estimator(args, model, reward)
    start = time.perf_counter()
    result = model.sample(cond, seeds=seeds, steps=steps, sampler=args.sampler, guidance=estimator,
                          progress=True)
    wall = time.perf_counter() - start
    rewards = None
    terms: dict[str, list[float]] = {}
    with torch.no_grad():
        if reward is not None:
            rewards = evaluate_reward(reward, result.images, all_prompts).float().cpu().tolist()
            terms.update({k: v.float().cpu().tolist() for k, v in getattr(reward, "last_terms", {}).items()})
        for name, r in held_out.items():
            terms[f"eval:{name}"] = evaluate_reward(r, result.images, all_prompts).float().cpu().tolist()
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    files = []
    for i, img in enumerate(result.images):
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        name = f"{i:04d}_seed{seeds[i]}.png"
        Image.fromarray(arr).save(out / name)
        files.append(name)
    record = {
        "command": "sample", "model": str(args.model), "pipeline": type(backend.pipe).__name__,
        "family": backend.family, "prediction": model.prediction, "schedule": model.schedule.config()
        if backend.family in ("sd3", "flux") else {"name": "vp-discrete", "num_train_timesteps":
                                                    model.schedule.num_train_timesteps},
        "height": model.height, "width": model.width, "steps": steps, "sampler": args.sampler,
        "times": [float(t) for t in result.times], "cfg": cond.cfg_scale, "cfg_arg": args.cfg,
        "true_cfg": args.true_cfg, "negative_prompt": args.negative_prompt, "method": args.method,
        "reward": args.reward, "beta": args.beta, "scale": args.scale, "t_window": args.t_window,
        "guidance": args.guidance, "data_var": args.data_var, "variant": args.variant, "dtype": args.dtype,
        "device": args.device, "gradient_checkpointing": args.gradient_checkpointing, "seed": args.seed,
        "eval_reward": args.eval_reward, "n_per_prompt": args.n,
        "samples": [{"file": f, "prompt": p, "seed": s, "reward": None if rewards is None else rewards[i],
                     "terms": {k: v[i] for k, v in terms.items()}}
                    for i, (f, p, s) in enumerate(zip(files, all_prompts, seeds))],
        "mean_reward": None if rewards is None else sum(rewards) / len(rewards),
        "mean_terms": {k: sum(v) / len(v) for k, v in terms.items()}, "wall_s": wall,
    }
    (out / "sample.json").write_text(json.dumps(record, indent=2))
    summary = "" if rewards is None else f"; mean reward {record['mean_reward']:.4f}"
    print(f"{len(files)} images written to {out} ({wall:.1f} s{summary}); settings in {out / 'sample.json'}")
    return 0

"""``tiltgen sample``: reward-tilted sampling from a diffusers pipeline: a built-in model
(``builtin:<name>``), a local ``save_pretrained`` folder or a model id in the local HF cache."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import TiltgenError

from ..eval.estimators import METHODS
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


def add_sample_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "sample", help="sample a text-to-image model with reward guidance",
        description="Generate images from a diffusers pipeline (SD, SD-Turbo, SDXL, SDXL-Turbo, SD3, FLUX, or a "
                    "built-in model: builtin:world-diffusion, builtin:world-onestep, builtin:world-flow) "
                    "tilted towards a reward: p*(x|c) ~ p(x|c) exp(r(x,c)/beta). Saves PNGs and sample.json "
                    "(every setting needed to reproduce them).")
    p.add_argument("--model", required=True,
                   help="builtin:<name>, a diffusers save_pretrained folder or a model id "
                        "in the local HF cache")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--reward", help="reward spec, e.g. 'pickscore:1.0,aesthetic(head=/w/head.pth):0.5'")
    p.add_argument("--eval-reward", help="held-out rewards, only evaluated and reported (same spec syntax)")
    p.add_argument("--method", default="unguided", choices=METHODS)
    p.add_argument("--beta", type=float, default=None,
                   help="tilt temperature (smaller = stronger; default 0.1; --method learned: the network's own)")
    p.add_argument("--scale", type=float, default=None,
                   help="multiplier of the guidance term (default 1; --method learned: the network's calibrated "
                        "scale, if `tiltgen calibrate-guidance` recorded one)")
    p.add_argument("--t-window", type=float, nargs=2, metavar=("LO", "HI"), help="guide only for t in [LO, HI]")
    p.add_argument("--guidance", help="--method learned: folder written by train-guidance, or builtin:<name>")
    p.add_argument("--data-var", type=float, default=None,
                   help="--method trainingfree: per-dimension data variance (default: the model's tiltgen.json, else 1)")
    p.add_argument("--variant", default=None,
                   help="--method trainingfree: bounded, linear, newton or snis (default: the model's tiltgen.json "
                        "'trainingfree_variant', else bounded)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's own from its tiltgen.json (one-step: 1); else 30)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (FLUX: embedded guidance)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="FLUX only: true CFG scale with the negative prompt")
    p.add_argument("--sampler", default=None,
                   help="ddim (default: the pipeline's own update), euler, heun, ddpm, sde")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample)


def writable_dir(path: Path) -> Path:
    """Create ``path`` (a folder) and check it can be written, before any work is done."""
    if path.exists() and not path.is_dir():
        raise TiltgenError(f"output path {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".tiltgen-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TiltgenError(f"cannot write to the output folder {path}: {error.strerror or error}") from None
    return path


def prompts_from_args(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise TiltgenError(f"prompts file {path} does not exist")
        from_file = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not from_file:
            raise TiltgenError(f"prompts file {path} holds no prompt (it is empty or has only blank lines)")
        prompts += from_file
    if not prompts:
        raise TiltgenError("give at least one --prompt or a --prompts-file")
    return prompts


def _estimator(args: argparse.Namespace, model: Any, reward: Any) -> Any:
    """The estimator of ``--method``; records the beta and variant it really uses in ``args``."""
    from ..eval.estimators import build_estimator, default_variant

    args.variant = args.variant or default_variant(model)
    estimator, args.beta = build_estimator(model, args.method, reward, args.beta, guidance=args.guidance,
                                           scale=args.scale, t_window=tuple(args.t_window) if args.t_window else None,
                                           data_var=args.data_var, variant=args.variant, seed=args.seed)
    if args.method != "unguided":
        args.scale = float(getattr(estimator, "scale", 1.0 if args.scale is None else args.scale))
    return estimator


def _check_args(args: argparse.Namespace) -> list[str]:
    """Validate everything that can be checked before loading a model; the prompts."""
    prompts = prompts_from_args(args)
    if args.method in ("tweedie", "trainingfree") and not args.reward:  # fail before loading gigabytes
        raise TiltgenError(f"--method {args.method} needs --reward")
    if args.method == "learned" and not args.guidance:
        raise TiltgenError("--method learned needs --guidance PATH (a folder written by train-guidance)")
    if args.n < 1:
        raise TiltgenError(f"--n must be >= 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise TiltgenError(f"--steps must be >= 1, got {args.steps}")
    writable_dir(Path(args.out))  # before any model loads: an unwritable --out must not cost the samples
    return prompts


def load_rewards(spec: str | None, eval_spec: str | None) -> tuple[Any, dict[str, Any]]:
    """The target reward of a spec (or None) and the held-out rewards, by name."""
    from ..rewards import get_reward, parse_reward_spec, reward_from_spec

    reward = reward_from_spec(spec) if spec else None
    held_out = {name: get_reward(name, **kwargs) for name, kwargs, _ in parse_reward_spec(eval_spec)[0]} \
        if eval_spec else {}
    return reward, held_out


def score_images(reward: Any, held_out: dict[str, Any], images: Any, prompts: list[str]
                 ) -> tuple[list[float] | None, dict[str, list[float]]]:
    """Per-image target reward values and per-term / held-out values."""
    import torch

    from ..core.reward import evaluate_reward

    rewards = None
    terms: dict[str, list[float]] = {}
    with torch.no_grad():
        if reward is not None:
            rewards = evaluate_reward(reward, images, prompts).float().cpu().tolist()
            terms.update({k: v.float().cpu().tolist() for k, v in getattr(reward, "last_terms", {}).items()})
        for name, r in held_out.items():
            terms[f"eval:{name}"] = evaluate_reward(r, images, prompts).float().cpu().tolist()
    return rewards, terms


def save_pngs(out: Path, images: Any, seeds: list[int], upscale: int = 1) -> list[str]:
    """One PNG per image [N, 3, H, W] in [0, 1], named by index and seed."""
    import torch
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(images):
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        picture = Image.fromarray(arr)
        if upscale > 1:
            picture = picture.resize((arr.shape[1] * upscale, arr.shape[0] * upscale), Image.NEAREST)
        name = f"{i:04d}_seed{seeds[i]}.png"
        picture.save(out / name)
        files.append(name)
    return files


def _finish(args: argparse.Namespace, out: Path, record: dict, images: Any, prompts: list[str], seeds: list[int],
            reward: Any, held_out: dict[str, Any], upscale: int = 1) -> int:
    rewards, terms = score_images(reward, held_out, images, prompts)
    files = save_pngs(out, images, seeds, upscale)
    record.update({
        "method": args.method, "reward": args.reward, "beta": args.beta, "scale": args.scale,
        "t_window": args.t_window, "guidance": args.guidance, "variant": args.variant, "seed": args.seed,
        "eval_reward": args.eval_reward, "n_per_prompt": args.n, "device": args.device,
        "samples": [{"file": f, "prompt": p, "seed": s, "reward": None if rewards is None else rewards[i],
                     "terms": {k: v[i] for k, v in terms.items()}}
                    for i, (f, p, s) in enumerate(zip(files, prompts, seeds))],
        "mean_reward": None if rewards is None else sum(rewards) / len(rewards),
        "mean_terms": {k: sum(v) / len(v) for k, v in terms.items()}})
    (out / "sample.json").write_text(json.dumps(record, indent=2))
    summary = "" if rewards is None else f"; mean reward {record['mean_reward']:.4f}"
    print(f"{len(files)} images written to {out} ({record['wall_s']:.1f} s{summary}); settings in {out / 'sample.json'}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    prompts = _check_args(args)
    return _sample_diffusers(args, prompts)


def _sample_diffusers(args: argparse.Namespace, prompts: list[str]) -> int:
    import torch

    from ..backends.diffusers import DiffusersBackend

    reward, held_out = load_rewards(args.reward, args.eval_reward)
    dtype = getattr(torch, DTYPES[args.dtype])
    backend = DiffusersBackend.from_pretrained(args.model, dtype=dtype, device=args.device, cache_dir=args.cache_dir,
                                               gradient_checkpointing=args.gradient_checkpointing)
    backend.check_prompts(prompts)
    if args.negative_prompt:
        backend.check_prompts([args.negative_prompt])
    model = backend.at(args.height, args.width, guidance_scale=args.cfg)
    all_prompts = [p for p in prompts for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(all_prompts))]
    extra = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
    if backend.family == "flux":
        extra["true_cfg_scale"] = args.true_cfg
    cond = model.encode(all_prompts, args.negative_prompt, guidance_scale=args.cfg, **extra)
    steps = args.steps or backend.default_steps
    sampler = args.sampler or "ddim"
    estimator = _estimator(args, model, reward)
    start = time.perf_counter()
    result = model.sample(cond, seeds=seeds, steps=steps, sampler=sampler, guidance=estimator,
                          progress=not args.no_progress)
    record = {
        "command": "sample", "model": str(args.model), "pipeline": type(backend.pipe).__name__,
        "family": backend.family, "prediction": model.prediction, "schedule": model.schedule.config()
        if backend.family in ("sd3", "flux") else {"name": "vp-discrete", "num_train_timesteps":
                                                    model.schedule.num_train_timesteps},
        "height": model.height, "width": model.width, "steps": steps, "sampler": sampler,
        "times": [float(t) for t in result.times], "cfg": cond.cfg_scale, "cfg_arg": args.cfg,
        "true_cfg": args.true_cfg, "negative_prompt": args.negative_prompt, "data_var": args.data_var,
        "dtype": args.dtype, "gradient_checkpointing": args.gradient_checkpointing,
        "wall_s": time.perf_counter() - start}
    upscale = max(1, 256 // max(model.height, model.width))  # tiny (built-in) images are saved enlarged
    return _finish(args, Path(args.out), record, result.images, all_prompts, seeds, reward, held_out, upscale)

"""``tiltgen sample``: reward-tilted sampling from a diffusers pipeline: a built-in model
(``builtin:<name>``), a local ``save_pretrained`` folder or a model id in the local HF cache."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from ..core.prompts import PromptRow, read_prompt_file
from ..errors import TiltgenError
from ..eval.estimators import METHODS
from .sample_particles import DIAGNOSTIC_PREFIXES, PARTICLE_METHODS, check_particle_args, particle_sampler

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


def data_variance(text: str) -> float | list[float]:
    """``--data-var``: one number, or comma-separated variances, one per latent channel."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    if any(not (v > 0 and v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"variances must be finite and > 0, got {text!r}")
    return values[0] if len(values) == 1 else values


def add_sample_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "sample", help="sample a text-to-image model with reward guidance",
        description="Generate images from a diffusers pipeline (SD, SD-Turbo, SDXL, SDXL-Turbo, SD3, FLUX, or a "
                    "built-in model: builtin:world-diffusion, builtin:world-onestep, builtin:world-flow) "
                    "tilted towards a reward: p*(x|c) ~ p(x|c) exp(r(x,c)/beta). Writes images/*.png, a manifest "
                    "(one row per image: prompt, seed, method, beta, rewards, path; parquet with pyarrow, else "
                    "JSONL) and sample.json. A killed run resumes when rerun; runs unchanged under torchrun or "
                    "accelerate launch with several processes, each making its share of the images.")
    p.add_argument("--model", required=True,
                   help="builtin:<name>, a diffusers save_pretrained folder or a model id "
                        "in the local HF cache")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", "--prompts-file", dest="prompts_file", metavar="FILE",
                   help="prompt file: .txt (one per line), .jsonl ('prompt', optional 'seed', 'negative_prompt' "
                        "and fields passed to rewards as prompt.fields) or .csv (same columns)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--reward", help="reward spec, e.g. 'pickscore:1.0,aesthetic(head=/w/head.pth):0.5'")
    p.add_argument("--eval-reward", help="held-out rewards, only evaluated and reported (same spec syntax)")
    p.add_argument("--method", default="unguided", choices=METHODS + PARTICLE_METHODS,
                   help="sampled in one step (--steps 1, a one-step model's default), tweedie tilts the input noise "
                        "through the generator; trainingfree and networks trained without --noise-tilt are refused "
                        "there (their x0 shift would only edit the output). bestofn: the best of --particles "
                        "unguided samples by --reward; smc: --particles per image, weighted by exp(--reward / "
                        "--beta) and resampled (sampler ddpm), with --guidance twisted SMC (the network twists and "
                        "proposes)")
    p.add_argument("--beta", type=float, default=None,
                   help="tilt temperature (smaller = stronger; default 0.1; --method learned: the network's own)")
    p.add_argument("--scale", type=float, default=None,
                   help="multiplier of the guidance term (default 1; --method learned: the network's calibrated "
                        "scale, if `tiltgen calibrate-guidance` recorded one)")
    p.add_argument("--t-window", type=float, nargs=2, metavar=("LO", "HI"), help="guide only for t in [LO, HI]")
    p.add_argument("--guidance", help="--method learned: folder written by train-guidance, builtin:<name>, or a "
                                      "hub id (org/name) in the local Hugging Face cache")
    p.add_argument("--particles", type=int, default=None, metavar="N",
                   help="--method bestofn: candidates per image; --method smc: particles per image (each image's "
                        "population depends only on its seed)")
    p.add_argument("--drift", choices=("tweedie", "trainingfree"), default=None,
                   help="--method smc without --guidance: propose with this guidance of --reward at --beta (SMC on "
                        "top of a drift, Feynman-Kac steering with gradient guidance; --variant, --scale, --t-window "
                        "and --data-var shape it as for that method)")
    p.add_argument("--handoff", action="store_true",
                   help="--method smc with --guidance: hand the network's twist over to the plug-in r(x0_hat)/beta "
                        "near the data (docs/particles.md)")
    p.add_argument("--force-guidance", action="store_true",
                   help="use a guidance network trained for another base model (refused otherwise; a warning)")
    p.add_argument("--data-var", type=data_variance, default=None,
                   help="--method trainingfree: the latents' data variance, one number or one per latent channel "
                        "(comma-separated; default: the model's tiltgen.json, else 1)")
    p.add_argument("--bank", type=int, default=None, metavar="M",
                   help="--method trainingfree: a prior from M unguided samples of each prompt (its sample bank; "
                        "costs M unguided images per prompt, drawn first), so guidance can move images between "
                        "modes the Gaussian proxy cannot reach")
    p.add_argument("--variant", default=None,
                   help="--method trainingfree: bounded, linear, newton or snis (default: the model's tiltgen.json "
                        "'trainingfree_variant', else bounded); --method tweedie: plain (default) or damped "
                        "(the plug-in damped by the reward's curvature over the posterior spread)")
    p.add_argument("--noise-norm", choices=("keep", "free"), default="keep",
                   help="one-step sampling (a noise tilt): keep each tilted noise's norm (default; "
                        "docs/learned-guidance.md, 'Keeping the noise's norm') or take the shifted noise as it is")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's own from its tiltgen.json (one-step: 1); else 30)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (FLUX: embedded guidance)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="FLUX only: true CFG scale with the negative prompt")
    p.add_argument("--sampler", default=None,
                   help="ddim (default: the pipeline's own update), euler, heun, ddpm, sde")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--n", "--images-per-prompt", dest="n", type=int, default=1,
                   help="images per prompt (under torchrun write --images-per-prompt: torchrun reads --n as its own)")
    p.add_argument("--seed", type=int, default=0,
                   help="global seed: image j of prompt i uses seed + 1000000*i + j (a prompt file row's own "
                        "'seed' s: s + j), whatever the batch size or number of processes")
    p.add_argument("--batch-size", type=int, default=8, help="images per model batch (does not change the images)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: this process's GPU under a launcher, else cuda if "
                        "available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads per process (default: $OMP_NUM_THREADS, else cores / local processes)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images of another run in --out (by default a different run there is refused)")
    p.add_argument("--cache-dir", help="Hugging Face cache (default: HF_HUB_CACHE)")
    add_memory_options(p)
    p.add_argument("--max-sequence-length", type=int, help="SD3/FLUX T5 tokens")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample)


def add_memory_options(p: argparse.ArgumentParser) -> None:
    """The memory options of real checkpoints (docs/scale-out.md gives their measured effect)."""
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="guidance backward passes recompute the denoiser, VAE decoder and reward instead of "
                        "storing their activations")
    p.add_argument("--vae-slicing", action="store_true", help="decode one image at a time (reward and output)")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles")
    p.add_argument("--offload", action="store_true",
                   help="model CPU offload: each module moves to the GPU only while it runs (GPU only)")


def memory_kwargs(args: argparse.Namespace) -> dict[str, bool]:
    return {"gradient_checkpointing": args.gradient_checkpointing, "vae_slicing": args.vae_slicing,
            "vae_tiling": args.vae_tiling, "offload": args.offload}


@contextlib.contextmanager
def resume_hint(processes: Any, kept: str) -> Iterator[None]:
    """On Ctrl-C, the main process says what was kept and how to continue, then the interrupt goes on."""
    try:
        yield
    except KeyboardInterrupt:
        if processes.is_main:
            print(f"interrupted; {kept}: rerun the same command with --resume to continue", file=sys.stderr)
        raise


def writable_dir(path: Path) -> Path:
    """Create ``path`` (a folder) and check it can be written, before any work is done."""
    if path.exists() and not path.is_dir():
        raise TiltgenError(f"output path {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tiltgen-write-test-{os.getpid()}"  # one per process: several may check at once
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TiltgenError(f"cannot write to the output folder {path}: {error.strerror or error}") from None
    return path


def prompt_rows_from_args(args: argparse.Namespace) -> list[PromptRow]:
    """The --prompt prompts, then the prompts file's rows (.txt, .jsonl or .csv)."""
    rows = [PromptRow(p) for p in (args.prompt or [])]
    if args.prompts_file:
        rows += read_prompt_file(args.prompts_file)
    if not rows:
        raise TiltgenError("give at least one --prompt or a --prompts file")
    return rows


def prompts_from_args(args: argparse.Namespace) -> list[str]:
    return [row.prompt for row in prompt_rows_from_args(args)]


def _estimator(args: argparse.Namespace, model: Any, reward: Any, bank: Any = None) -> Any:
    """The estimator of ``--method``; records the beta, variant and data variance it really uses in ``args``."""
    from ..eval.estimators import build_estimator, default_data_var, default_variant

    args.variant = args.variant or ("plain" if args.method == "tweedie" else default_variant(model))
    estimator, args.beta = build_estimator(model, args.method, reward, args.beta, guidance=args.guidance,
                                           scale=args.scale, t_window=tuple(args.t_window) if args.t_window else None,
                                           data_var=args.data_var, variant=args.variant, seed=args.seed,
                                           force_guidance=args.force_guidance, cache_dir=args.cache_dir, bank=bank,
                                           steps=args.steps, keep_noise_norm=args.noise_norm == "keep")
    if args.method != "unguided":
        args.scale = float(getattr(estimator, "scale", 1.0 if args.scale is None else args.scale))
    if args.method == "trainingfree" and args.data_var is None:  # the model folder's, else 1
        args.data_var = default_data_var(model)
    return estimator


def _check_args(args: argparse.Namespace) -> list[PromptRow]:
    """Validate everything that can be checked before loading a model; the prompt rows."""
    rows = prompt_rows_from_args(args)
    check_particle_args(args)
    if args.method in ("tweedie", "trainingfree") and not args.reward:  # fail before loading gigabytes
        raise TiltgenError(f"--method {args.method} needs --reward")
    if args.method == "learned" and not args.guidance:
        raise TiltgenError("--method learned needs --guidance PATH (a folder written by train-guidance)")
    if args.bank is not None and args.method != "trainingfree":
        raise TiltgenError(f"--bank is a prior of training-free guidance; --method {args.method} does not use it")
    if args.bank is not None and args.bank < 2:
        raise TiltgenError(f"--bank needs at least 2 samples per prompt, got {args.bank}")
    for name in ("n", "batch_size", "steps", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise TiltgenError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.method == "unguided":
        ignored = [flag for flag, value in (("--beta", args.beta), ("--scale", args.scale),
                                            ("--guidance", args.guidance)) if value is not None]
        if ignored:
            print(f"tiltgen: warning: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored with "
                  "--method unguided (it samples the base model)", file=sys.stderr)
            args.beta = args.scale = args.guidance = None  # the manifest must not claim a tilt
    writable_dir(Path(args.out))  # before any model loads: an unwritable --out must not cost the samples
    return rows


def load_rewards(spec: str | None, eval_spec: str | None) -> tuple[Any, dict[str, Any]]:
    """The target reward of a spec (or None) and the held-out rewards, by name."""
    from ..rewards import build_term, parse_reward_spec, reward_from_spec

    reward = reward_from_spec(spec) if spec else None
    held_out = {name: build_term(name, kwargs) for name, kwargs, _ in parse_reward_spec(eval_spec)[0]} \
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


# settings that change the images or their scores; a rerun into the same --out must match them
JOB_KEYS = ("model", "method", "reward", "eval_reward", "beta", "scale", "t_window", "guidance", "data_var", "variant",
            "bank", "particles", "drift", "handoff", "noise_norm", "steps", "cfg", "true_cfg", "sampler", "height", "width", "n", "seed",
            "dtype", "negative_prompt", "max_sequence_length")


def job_config(args: argparse.Namespace, rows: list[PromptRow]) -> dict[str, Any]:
    from ..eval.sample_job import prompts_digest

    config = {key: getattr(args, key, None) for key in JOB_KEYS}
    config["t_window"] = list(config["t_window"]) if config["t_window"] else None
    return {**config, "prompts": len(rows), "prompts_digest": prompts_digest(rows)}


def run_sample(args: argparse.Namespace) -> int:
    from ..core.distributed import join_processes, set_threads
    from ..eval.sample_job import prepare_output

    rows = _check_args(args)
    processes = join_processes(args.device)
    set_threads(processes.local_world_size, args.threads)
    out = Path(args.out)
    config = job_config(args, rows)
    state = prepare_output(out, config, overwrite=args.overwrite)
    if state == "complete":
        if processes.is_main:
            print(f"{out} already holds this run's {config['prompts'] * args.n} images (same settings); nothing to do")
        return 0
    processes.wait()  # every process has checked the folder before the main one changes it
    try:
        return _sample_diffusers(args, rows, config, state, processes)
    except KeyboardInterrupt:
        if processes.is_main:
            print(f"interrupted; the finished images are kept in {out}: rerun the same command to resume")
        return 130


def _sample_diffusers(args: argparse.Namespace, rows: list[PromptRow], config: dict[str, Any], state: str,
                      processes: Any) -> int:
    import torch

    from ..backends.diffusers import DiffusersBackend
    from ..core.files import write_json
    from ..eval.sample_job import (finish_output, plan_items, remove_stale_images, run_job, start_output,
                                   write_manifest)

    out = Path(args.out)
    if processes.is_main:
        start_output(out, config, state)
    processes.wait()
    reward, held_out = load_rewards(args.reward, args.eval_reward)
    dtype = getattr(torch, DTYPES[args.dtype])
    backend = DiffusersBackend.from_pretrained(args.model, dtype=dtype, device=processes.device,
                                               cache_dir=args.cache_dir, **memory_kwargs(args))
    backend.check_prompts([row.text for row in rows])
    negatives = sorted({n for n in [args.negative_prompt] + [row.negative_prompt for row in rows] if n})
    if negatives:
        backend.check_prompts(negatives)
    model = backend.at(args.height, args.width, guidance_scale=args.cfg)
    extra = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
    if backend.family == "flux":
        extra["true_cfg_scale"] = args.true_cfg
    steps = args.steps or backend.default_steps
    sampler = args.sampler or ("ddpm" if args.method == "smc" else "ddim")
    banks = None
    if args.bank:
        from ..core.prompts import image_seed
        from ..eval.estimators import build_banks

        banks = build_banks(model, reward, [(row.prompt, row.negative_prompt or args.negative_prompt,
                                             image_seed(args.seed, p, 0, row.seed)) for p, row in enumerate(rows)],
                            args.bank, steps=steps, sampler=sampler, batch_size=args.batch_size, lazy=True,
                            guidance_scale=args.cfg, **extra)
    shared: dict[str, Any] = {}

    def encode(chunk: list) -> Any:
        negatives = [item.negative_prompt for item in chunk]
        cond = model.encode([item.prompt for item in chunk],
                            None if not any(negatives) else [n or "" for n in negatives],
                            guidance_scale=args.cfg, **extra)
        shared.setdefault("cfg", cond.cfg_scale)
        return cond

    diagnostics: dict[str, dict[str, float]] = {}  # per image file: what a particle method reports
    if args.method in PARTICLE_METHODS:
        sample = particle_sampler(args, model, reward, steps, sampler, encode, diagnostics)
    else:
        estimator = _estimator(args, model, reward, banks)

        def sample(chunk: list) -> Any:
            result = model.sample(encode(chunk), seeds=[item.seed for item in chunk], steps=steps, sampler=sampler,
                                  guidance=estimator, progress=False)
            shared.setdefault("times", [float(t) for t in result.times])
            return result.images

    def score(images: Any, chunk: list) -> Any:
        rewards, terms = score_images(reward, held_out, images, [item.prompt for item in chunk])
        for key in sorted({key for item in chunk for key in diagnostics.get(item.file, {})}):
            terms[key] = [diagnostics[item.file][key] for item in chunk]
        return rewards, terms

    items = plan_items(rows, args.n, args.seed, args.negative_prompt)
    if state == "resume" and processes.is_main:
        print(f"resuming the unfinished run in {out}")
    upscale = max(1, 256 // max(model.height, model.width))  # tiny (built-in) images are saved enlarged
    info = {"method": args.method, "beta": args.beta, "scale": args.scale,
            **({"particles": args.particles} if args.particles else {})}
    start = time.perf_counter()
    job = run_job(out, items, batch_size=args.batch_size, sample=sample, score=score, row_info=info,
                  processes=processes, upscale=upscale, progress=not args.no_progress)
    wall = time.perf_counter() - start
    if not processes.is_main:
        return 0
    start = time.perf_counter()
    manifest = write_manifest(out, job.rows)
    job.timings["manifest_s"] = time.perf_counter() - start
    removed = remove_stale_images(out, {row["image"] for row in job.rows})
    rewards = [row["reward"] for row in job.rows if row["reward"] is not None]
    term_names = [k for k in job.rows[0] if k.startswith(("eval:",) + DIAGNOSTIC_PREFIXES)
                  or k in getattr(reward, "last_terms", {})]
    record = {
        "command": "sample", "job": config, "model": str(args.model), "pipeline": type(backend.pipe).__name__,
        "family": backend.family, "prediction": model.prediction, "schedule": model.schedule.config()
        if backend.family in ("sd3", "flux") else {"name": "vp-discrete", "num_train_timesteps":
                                                    model.schedule.num_train_timesteps},
        "height": model.height, "width": model.width, "steps": steps, "sampler": sampler,
        "times": shared.get("times"), "cfg": shared.get("cfg"), "cfg_arg": args.cfg,
        "true_cfg": args.true_cfg, "negative_prompt": args.negative_prompt, "data_var": args.data_var,
        "dtype": args.dtype, **memory_kwargs(args),
        "method": args.method, "reward": args.reward, "beta": args.beta, "scale": args.scale,
        "t_window": args.t_window, "guidance": args.guidance, "variant": args.variant, "bank": args.bank,
        "particles": args.particles, "drift": args.drift, "handoff": args.handoff,
        "noise_norm": args.noise_norm if steps == 1 else None,
        "seed": args.seed,
        "eval_reward": args.eval_reward, "n_per_prompt": args.n, "device": processes.device,
        "processes": processes.world_size, "batch_size": args.batch_size, "wall_s": wall,
        "images_made": job.made_images, "images_resumed": job.resumed_images,
        "timings_main_process": job.timings, "manifest": manifest.name,
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "mean_terms": {k: sum(row[k] for row in job.rows) / len(job.rows) for k in term_names},
        "samples": [{"file": row["image"], "prompt": row["prompt"], "seed": row["seed"], "reward": row["reward"],
                     "terms": {k: row[k] for k in term_names}} for row in job.rows]}
    write_json(out / "sample.json", record)
    finish_output(out)
    means = ([f"mean reward {record['mean_reward']:.4f}"] if record["mean_reward"] is not None else []) + \
        [f"{name.removeprefix('eval:')} {value:.4f}" for name, value in record["mean_terms"].items()
         if not name.startswith(DIAGNOSTIC_PREFIXES)]
    summary = "".join(f"; {part}" for part in means)
    resumed = f"; {job.resumed_images} kept from the interrupted run" if job.resumed_images else ""
    stale = f"; {removed} stale images of a replaced run removed" if removed else ""
    print(f"{len(job.rows)} images in {out / 'images'} ({wall:.1f} s{summary}{resumed}{stale}); "
          f"manifest {out / manifest.name}, settings {out / 'sample.json'}")
    return 0

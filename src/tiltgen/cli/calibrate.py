"""``tiltgen calibrate-guidance``: pick a trained guidance network's scale on held-out prompts so
that its guided mean reward reaches the exact tilt's (self-normalised estimate from base samples),
and record it in the network's guidance.json, where sampling picks it up."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import TiltgenError
from .sample import DTYPES


def add_calibrate_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "calibrate-guidance", help="calibrate a learned guidance network's scale against the exact tilt",
        description="Sample held-out prompts without guidance and with the network at a grid of scales, and record "
                    "in its guidance.json the scale whose mean reward reaches the exact tilt's (self-normalised "
                    "importance estimate from the unguided samples). `tiltgen sample --method learned` and "
                    "`tiltgen demo` then use that scale unless --scale is given.")
    p.add_argument("--guidance", required=True, help="folder written by train-guidance, or builtin:<name>")
    p.add_argument("--model", required=True, help="the base model the network was trained for")
    p.add_argument("--reward", required=True, help="the reward the network was trained for")
    p.add_argument("--prompt", action="append", help="a calibration prompt (default: the held-out training prompts)")
    p.add_argument("--prompts-file", help="text file, one calibration prompt per line")
    p.add_argument("--n", type=int, default=32, help="samples per prompt and scale (default 32)")
    p.add_argument("--max-prompts", type=int, default=16, help="at most this many prompts (default 16)")
    p.add_argument("--scales", default="1,2,4,8", help="increasing scales to try (default 1,2,4,8)")
    p.add_argument("--seed", type=int, default=100_000, help="first sample seed (apart from the training data's)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale of the sampler (as for training)")
    p.add_argument("--height", type=int, help="image height (as for training)")
    p.add_argument("--width", type=int, help="image width (as for training)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", help="Hugging Face cache (default: HF_HUB_CACHE)")
    p.add_argument("--keep", metavar="REWARD",
                   help="a reward to keep (prompt fidelity, say, e.g. world-fidelity): the scale is lowered to the "
                        "largest tried one whose mean of it falls by at most --max-drop below the unguided samples'")
    p.add_argument("--max-drop", type=float, default=0.05, help="with --keep: the largest fall allowed (default 0.05)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_calibrate)


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise TiltgenError(f"--scales must be comma-separated numbers, got {text!r}") from None


def _prompts(args: argparse.Namespace, record: dict, folder: Path) -> list[str]:
    if args.prompt or args.prompts_file:
        from .sample import prompts_from_args

        return prompts_from_args(args)
    held = record.get("held_out_conditions")
    if not held:
        raise TiltgenError(f"{folder} records no held-out prompts (it was trained without --val-fraction); "
                           "give calibration prompts with --prompt or --prompts-file, none of them training prompts")
    from ..tilt.learned.pretrained import recorded_conditions

    return recorded_conditions(record, "held_out_conditions")


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _calibrate(args: argparse.Namespace) -> int:
    from ..builtin import resolve_weights
    from ..core.reward import reward_name
    from ..tilt.learned import CalibrationConfig, calibrate_scale, check_base_model, load_guidance, prompt_encoder

    config = CalibrationConfig(n=args.n, max_conditions=args.max_prompts, scales=_scales(args.scales), seed=args.seed)
    folder = resolve_weights(args.guidance, "guidance")
    record_path = folder / "guidance.json"
    if not record_path.is_file():
        raise TiltgenError(f"{folder} has no guidance.json (a folder written by train-guidance)")
    record = json.loads(record_path.read_text())
    prompts = _prompts(args, record, folder)
    model, reward = _model_and_reward(args, prompts)
    check_base_model(record, model, folder)
    if record.get("shape") is not None and list(record["shape"]) != list(model.latent_shape):
        raise TiltgenError(f"the guidance network in {folder} was trained on latents of shape {tuple(record['shape'])}, "
                           f"but --height/--width give {tuple(model.latent_shape)}; pass the training resolution")
    if record.get("reward") is not None and reward_name(reward) != record["reward"]:
        raise TiltgenError(f"the guidance network in {folder} was trained for the reward {record['reward']!r}, "
                           f"not {reward_name(reward)!r}")
    guidance = load_guidance(folder, cond_encoder=prompt_encoder(model, record), scale=1.0)
    train = record.get("train", {})
    steps = int(train.get("data_steps") or model.backend.default_steps)
    if steps == 1 and not guidance.tilts_input:
        raise TiltgenError(f"the guidance network in {folder} shifts x0 (trained without --noise-tilt) on one-step "
                           "samples; one-step sampling refuses such a network (its shift would only edit the output "
                           "image), so it has no one-step scale to calibrate: train it with --noise-tilt")
    keep = None
    if args.keep:
        from ..rewards import reward_from_spec

        keep = model.latent_reward(reward_from_spec(args.keep))
    state = folder / ".calibration-state.json"
    result = calibrate_scale(model, model.schedule, reward, guidance, beta=float(record["beta"]), conditions=prompts,
                             shape=model.latent_shape, sampler=train.get("sampler", "ddim"), steps=steps,
                             spacing=train.get("spacing", "uniform"), config=config, state_path=state,
                             progress=not args.no_progress, log=print, keep=keep, max_drop=args.max_drop)
    if keep is not None and not result["keep"]["met"]:
        print(f"tiltgen: warning: no scale tried keeps {args.keep} within {args.max_drop:g} of the unguided "
              f"samples; recorded the smallest, {result['scale']:g}", file=sys.stderr)
    record["calibration"] = result
    _write_record(record_path, record)
    state.unlink(missing_ok=True)
    share = "n/a" if result["share"] is None else f"{result['share']:.2f}"
    print(f"scale {result['scale']:.3g}: mean reward {result['reward']:.4f} (unguided {result['base_reward']:.4f}, "
          f"exact tilt {result['target_reward']:.4f}, ESS {result['ess']:.1f} of {config.n}); share of the exact "
          f"gain {share}; {result['wall_s']:.0f} s; recorded in {record_path}")
    return 0


def _model_and_reward(args: argparse.Namespace, prompts: list[str]) -> tuple[Any, Any]:
    from ..backends.diffusers import DiffusersBackend
    from ..rewards import reward_from_spec

    import torch

    reward = reward_from_spec(args.reward)
    backend = DiffusersBackend.from_pretrained(args.model, dtype=getattr(torch, DTYPES[args.dtype]),
                                               device=args.device, cache_dir=args.cache_dir)
    backend.check_prompts(prompts)
    model = backend.at(args.height, args.width, guidance_scale=args.cfg)
    return model, model.latent_reward(reward)

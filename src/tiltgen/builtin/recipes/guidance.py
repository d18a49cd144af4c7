"""Train and package a built-in guidance network: ``tiltgen train-guidance`` on a built-in model
and reward, with training prompts drawn from the world's training captions (every evaluation
prompt of ``tiltgen demo`` removed), then the shippable folder (guidance.json,
guidance.safetensors, prompts.txt, tiltgen.json, README.md).

    python -m tiltgen.builtin.recipes.guidance --model builtin:world-diffusion --reward world-proxy --beta 0.05 \
        --out src/tiltgen/builtin/weights/guidance-diffusion-proxy -- --n-data 48 --steps 3000

Then ``tiltgen calibrate-guidance`` picks the network's scale on its held-out training prompts
(``--no-calibrate`` skips it). Arguments after ``--`` go to ``tiltgen train-guidance`` unchanged. The run folder (training
data, checkpoints; ``<out>/.work``) makes an interrupted run resumable with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from ...world.prompts import guidance_prompts

SHIPPED = ("guidance.json", "guidance.safetensors")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, passthrough = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m tiltgen.builtin.recipes.guidance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=200, help="number of training prompts")
    parser.add_argument("--two-shapes", choices=("any", "yes", "no"), default="any",
                        help="train on prompts naming two shapes only (yes), one only (no), or any")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="skip `tiltgen calibrate-guidance` on the held-out training prompts (needs "
                             "--val-fraction > 0 after --)")
    args = parser.parse_args(own)
    out = Path(args.out)
    work = out / ".work"
    out.mkdir(parents=True, exist_ok=True)
    two = {"any": None, "yes": True, "no": False}[args.two_shapes]
    prompts = guidance_prompts(args.prompts, seed=args.seed, two_shapes=two)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    from ...cli.main import main as tiltgen

    command = ["train-guidance", "--model", args.model, "--reward", args.reward, "--beta", str(args.beta),
               "--prompts-file", str(out / "prompts.txt"), "--seed", str(args.seed), "--out", str(work),
               *passthrough] + (["--resume"] if args.resume else [])
    start = time.perf_counter()
    code = tiltgen(command)
    if code:
        return code
    wall = time.perf_counter() - start
    for name in SHIPPED:
        shutil.copy(work / name, out / name)
    if not args.no_calibrate:
        code = tiltgen(["calibrate-guidance", "--guidance", str(out), "--model", args.model, "--reward", args.reward])
        if code:
            return code
    record = json.loads((out / "guidance.json").read_text())
    base = (record.get("base_model") or {}).get("name", args.model)
    (out / "tiltgen.json").write_text(json.dumps({
        "kind": "guidance", "name": out.name, "base_model": base, "reward": args.reward, "beta": args.beta,
        "noise_tilt": bool(record["train"].get("noise_tilt")), "prompts": len(prompts),
        "data_size": record["data_size"], "train_wall_s": round(record["train_wall_s"], 1)}, indent=2) + "\n")
    data = record["data"]
    (out / "README.md").write_text(
        f"# {out.name}\n\nLearned guidance for `{base}` towards `{args.reward}` at beta = {args.beta:g}: a "
        f"prompt-conditional network trained by `tiltgen train-guidance` on {record['data_size']} samples of the "
        f"model for the {len(prompts)} training prompts in `prompts.txt` (world training captions; none of "
        "`tiltgen demo`'s evaluation prompts). "
        + ("It tilts the one-step generator's input noise (docs/learned-guidance.md, \"One-step generators\"). "
           if record["train"].get("noise_tilt") else "")
        + f"\n\nReproduce (seed {args.seed}):\n\n```bash\npython -m tiltgen.builtin.recipes.guidance "
        + " ".join(_without_data_from(argv)) + "\n```\n\n"
        f"Data: {data['model_evals']} sampler model calls ({record.get('evals_per_model_call', 1)} network "
        f"evaluations each), {data['reward_evals']} reward evaluations; {record['steps']} training steps; "
        f"final loss {record['final_loss']:.4f}"
        + (f"; held-out loss {record['held_out_loss']:.4f} at step {record['best_step']} (the weights shipped), "
           f"on {len(record.get('held_out_conditions') or [])} held-out training prompts"
           if record.get("held_out_loss") is not None else "")
        + (f"; {wall / 60:.1f} min of training on 2 CPU cores, plus {data['wall_s'] / 60:.1f} min of data "
           "generation by an earlier run with the same settings, reused with --data-from" if "--data-from" in argv
           else f"; {wall / 60:.1f} min in all (data {data['wall_s'] / 60:.1f} min) on 2 CPU cores")
        + ".\n" + calibration_sentence(record))
    shutil.rmtree(work)
    print(f"guidance network written to {out}")
    return 0


def calibration_sentence(record: dict) -> str:
    """The README's account of ``tiltgen calibrate-guidance`` (empty when the network was not calibrated)."""
    cal = record.get("calibration")
    if not cal:
        return ""
    tried = ", ".join(f"{t['scale']:g}: {t['reward']:.4f}" for t in cal["tried"])
    share = "" if cal["share"] is None else (
        f"; share of the exact tilt's gain {cal['share']:.2f} at this scale"
        + ("" if cal.get("share_at_scale_1") is None else f", {cal['share_at_scale_1']:.2f} at scale 1"))
    return (f"\nCalibrated scale (`tiltgen calibrate-guidance`, the default of `tiltgen sample` and `tiltgen demo`): "
            f"**{cal['scale']:.3g}**. On {len(cal['conditions'])} held-out training prompts × {cal['n']} samples, "
            f"mean reward unguided {cal['base_reward']:.4f}, exact tilt (self-normalised, ESS {cal['ess']:.1f} of "
            f"{cal['n']}) {cal['target_reward']:.4f}, guided at scale {cal['scale']:.3g} {cal['reward']:.4f}{share} "
            f"(scales tried: {tried}); {cal['wall_s'] / 60:.1f} min.\n")


def _without_data_from(argv: Sequence[str]) -> list[str]:
    """The command without ``--data-from DIR``: reusing generated data does not change the result."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--data-from":
            skip = True
        elif not arg.startswith("--data-from="):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())

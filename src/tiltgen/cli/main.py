"""The ``tiltgen`` command line. Thin: parse, call the library, print and save."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..errors import TiltgenError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _bench_analytic(args: argparse.Namespace) -> int:
    from ..eval.analytic_bench import BenchSettings, format_table, run_analytic_bench

    base = BenchSettings.quick() if args.quick else BenchSettings()
    settings = BenchSettings(n=args.n or base.n, steps=args.steps or base.steps, sampler=args.sampler or base.sampler,
                             floor_pairs=args.floor_pairs, seed=args.seed)
    for path in (args.json, args.plot):  # fail before the work, not after it
        if path is not None and Path(path).is_dir():
            raise TiltgenError(f"output path {path} is a directory; give a file name")
    result = run_analytic_bench(args.cases, args.families, args.methods, settings, progress=not args.no_progress)
    print(format_table(result.records))
    print("(reward* = exact tilted mean reward; floor = 95th percentile energy distance between exact samples; "
          "model_ev/reward_ev/grad_ev per sample; wall_x = wall time / unguided)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.records, indent=2))
        print(f"records written to {args.json}")
    if args.plot:
        from ..eval.plots import plot_analytic_2d

        print(f"plot written to {plot_analytic_2d(result, args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiltgen", description="Reward-tilted sampling for diffusion and flow models.")
    parser.add_argument("--version", action="version", version=f"tiltgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    analytic = benches.add_parser("analytic", help="exact tilted Gaussian-mixture benchmark",
                                  description="Compare guidance methods against exact samples of the tilted target.")
    analytic.add_argument("--quick", action="store_true", help="the same grid, smaller (n=1000, 25 steps)")
    analytic.add_argument("--cases", type=_csv, help="comma-separated case names (default: all)")
    analytic.add_argument("--families", type=_csv, help="comma-separated: vp,flow (default: both)")
    analytic.add_argument("--methods", type=_csv, help="comma-separated methods (default: every default method)")
    analytic.add_argument("--n", type=int, help="samples per run (default 4000, quick 1000)")
    analytic.add_argument("--steps", type=int, help="sampler steps (default 100, quick 25)")
    analytic.add_argument("--sampler", help="heun (default), euler, ddim, ddpm or sde")
    analytic.add_argument("--floor-pairs", type=int, default=10, help="exact-vs-exact pairs for the energy floor")
    analytic.add_argument("--seed", type=int, default=0)
    analytic.add_argument("--json", help="write the records to this JSON file")
    analytic.add_argument("--plot", help="draw the 2-D cases to this PNG")
    analytic.add_argument("--no-progress", action="store_true", help="no progress bar")
    analytic.set_defaults(func=_bench_analytic)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TiltgenError as error:
        print(f"tiltgen: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tiltgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

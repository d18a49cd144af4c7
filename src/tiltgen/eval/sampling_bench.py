"""``tiltgen bench sampling``: throughput of ``tiltgen sample --prompts`` in 1 and in N processes
(torchrun, gloo on CPUs), and the cost of the manifest and resume bookkeeping.

Each configuration runs as its own command, as a user would run it; repeats are interleaved
(1, N, 1, N, ...) and the fastest repeat of each is kept, so a burst of load elsewhere on the
machine cannot favour one side. Throughput counts the sampling job only (images / job wall),
not the model load, which each process pays once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import TiltgenError


def bench_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` under-specified world prompts (the guidance-training distribution)."""
    from ..world.prompts import guidance_prompts

    return guidance_prompts(n, seed=seed)


def sample_command(processes: int, argv: list[str]) -> list[str]:
    """``tiltgen sample`` with ``argv`` in one plain process, or under torchrun with N."""
    if processes == 1:
        return [sys.executable, "-m", "tiltgen.cli.main", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "tiltgen.cli.main", *argv]


def run_once(processes: int, argv: list[str], out: Path) -> dict[str, Any]:
    """One run into a fresh ``out``; its sample.json's wall and timings."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TILTGEN_THREADS")}
    done = subprocess.run(sample_command(processes, argv + ["--out", str(out), "--no-progress"]), env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise TiltgenError(f"tiltgen sample with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    record = json.loads((out / "sample.json").read_text())
    return {"wall_s": record["wall_s"], "images": len(record["samples"]), "timings": record["timings_main_process"]}


def run_sampling_bench(*, model: str = "builtin:world-onestep", prompts: int = 100, n: int = 1,
                       processes: tuple[int, ...] = (1, 2), repeats: int = 3, batch_size: int = 8,
                       reward: str | None = "world-proxy", progress: bool = True) -> dict[str, Any]:
    """Images per second of each process count (fastest of ``repeats``), the ratios to 1
    process, and the bookkeeping share of the 1-process run's sampling time."""
    with tempfile.TemporaryDirectory(prefix="tiltgen-bench-sampling-") as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("\n".join(bench_prompts(prompts)) + "\n")
        argv = ["sample", "--model", model, "--prompts", str(prompt_file), "--images-per-prompt", str(n),
                "--batch-size", str(batch_size)] + (["--reward", reward] if reward else [])
        runs: dict[int, list[dict[str, Any]]] = {p: [] for p in processes}
        for r in range(repeats):
            for p in processes:
                runs[p].append(run_once(p, argv, Path(tmp) / f"out-{p}"))
                if progress:
                    print(f"repeat {r + 1}/{repeats}, {p} process(es): {runs[p][-1]['wall_s']:.2f} s", file=sys.stderr)
    best = {p: min(rs, key=lambda x: x["wall_s"]) for p, rs in runs.items()}
    images = prompts * n
    rows = []
    for p in processes:
        timings = best[p]["timings"]
        bookkeeping = timings.get("ledger_s", 0.0) + timings.get("manifest_s", 0.0)
        rows.append({"processes": p, "wall_s": best[p]["wall_s"], "images_per_s": images / best[p]["wall_s"],
                     "speedup": best[processes[0]]["wall_s"] / best[p]["wall_s"],
                     "sample_s": timings["sample_s"], "png_s": timings.get("png_s", 0.0),
                     "bookkeeping_s": bookkeeping, "bookkeeping_share": bookkeeping / timings["sample_s"],
                     "all_walls_s": [x["wall_s"] for x in runs[p]]})
    return {"model": model, "prompts": prompts, "images_per_prompt": n, "batch_size": batch_size,
            "repeats": repeats, "reward": reward, "cores": os.cpu_count(), "rows": rows}


def sampling_markdown(result: dict[str, Any]) -> str:
    lines = [f"`tiltgen sample --prompts` on {result['model']}: {result['prompts']} prompts x "
             f"{result['images_per_prompt']} images, batch {result['batch_size']}, reward {result['reward']}, "
             f"fastest of {result['repeats']} interleaved repeats, {result['cores']} cores", "",
             "| processes | job wall (s) | images/s | speed-up vs first | manifest + ledger / sampling | PNG writing / sampling |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['processes']} | {row['wall_s']:.2f} | {row['images_per_s']:.1f} | {row['speedup']:.2f} | "
                     f"{100 * row['bookkeeping_share']:.2f} % | {100 * row['png_s'] / row['sample_s']:.1f} % |")
    return "\n".join(lines)

"""``tiltgen bench memory``: peak memory of guided sampling with and without each memory option.

Every (model, option) runs in a fresh process (so the allocator's history of one cannot lower
another's figure): load the pipeline, encode the prompts, then measure one guided sampling call.
On a GPU the figure is the CUDA allocator's peak; on a CPU it is the rise of the resident set
above its level before the call (Linux: the high-water mark is reset first, /proc/self/clear_refs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import TiltgenError

OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "bf16": {"dtype": "bfloat16"},
    "gradient-checkpointing": {"gradient_checkpointing": True},
    "vae-slicing": {"vae_slicing": True},
    "vae-tiling": {"vae_tiling": True},
    "all": {"dtype": "bfloat16", "gradient_checkpointing": True, "vae_slicing": True},
}
MODELS = ("builtin:world-diffusion", "builtin:world-onestep", "builtin:world-flow")


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_one(model: str, option: str, *, batch: int, steps: int | None, method: str, device: str = "cpu"
                ) -> dict[str, Any]:
    """Peak memory (bytes) of one guided sampling call of ``batch`` images, in this process."""
    import torch

    from ..backends.diffusers import DiffusersBackend
    from ..eval.estimators import build_estimator
    from ..rewards import reward_from_spec

    settings = dict(OPTIONS[option])
    dtype = getattr(torch, settings.pop("dtype", "float32"))
    backend = DiffusersBackend.from_pretrained(model, dtype=dtype, device=device, **settings)
    latent = backend.at()
    cond = latent.encode(["a red shape"] * batch)
    reward = reward_from_spec("world-proxy")
    steps = steps or backend.default_steps
    estimator, _ = build_estimator(latent, method, reward, 0.1, steps=steps)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resident high-water mark := current resident size
        before = _rss_kib("VmRSS") * 1024
    latent.sample(cond, seeds=list(range(batch)), steps=steps, guidance=estimator)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _rss_kib("VmHWM") * 1024
    return {"model": model, "option": option, "method": method, "batch": batch, "steps": steps,
            "before_bytes": before, "peak_bytes": peak, "rise_bytes": peak - before}


def run_memory_bench(*, models: tuple[str, ...] = MODELS, options: tuple[str, ...] = tuple(OPTIONS),
                     batch: int = 16, steps: int | None = 10, method: str = "tweedie", device: str = "cpu"
                     ) -> dict[str, Any]:
    """One fresh process per (model, option); their figures and each option's ratio to none."""
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise TiltgenError(f"unknown memory option(s) {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    rows = []
    for model in models:
        for option in options:
            code = ("import json, sys; from tiltgen.eval.memory_bench import measure_one; "
                    f"print(json.dumps(measure_one({model!r}, {option!r}, batch={batch}, steps={steps!r}, "
                    f"method={method!r}, device={device!r})))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode != 0:
                raise TiltgenError(f"memory run {model} / {option} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{model} {option}: +{rows[-1]['rise_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["option"] == "none") \
            if "none" in options else None
        row["ratio_to_none"] = None if base is None else row["rise_bytes"] / max(1, base["rise_bytes"])
    return {"batch": batch, "steps": steps, "method": method, "device": device, "rows": rows}


def memory_markdown(result: dict[str, Any]) -> str:
    lines = [f"Peak memory of one {result['method']}-guided sampling call, {result['batch']} images, "
             f"{result['steps']} steps, on {result['device']} (rise above the level before the call)", "",
             "| model | option | peak rise (MiB) | vs none |", "|---|---|---|---|"]
    for row in result["rows"]:
        ratio = "" if row["ratio_to_none"] is None else f"{row['ratio_to_none']:.2f}"
        lines.append(f"| {row['model']} | {row['option']} | {row['rise_bytes'] / 2**20:.1f} | {ratio} |")
    return "\n".join(lines)

"""``tiltgen demo``: reward-tilted sampling of the built-in text-to-image models, measured.

For each (model, method) row it samples every prompt ``n`` times with the same seeds and
reports the *target* reward (the learned proxy preference, what guidance optimises), the
held-out *gold* preference it stands in for (to see reward hacking), prompt fidelity (the
attribute classifier agrees with every attribute of the caption), diversity (mean pairwise
RMS pixel distance between the images of one prompt), network evaluations per image and the
wall time relative to the same model's unguided sampling in the same run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.model import CountingModel
from ..errors import TiltgenError
from .estimators import build_estimator
from ..tilt.base import GuidedModel

TARGET_REWARD = "world-proxy"
GOLD_REWARD = "world-gold"
DEFAULT_BETA = 0.02
# (model, method): every method the demo can run; the guidance networks are shipped per model
ROWS = (("shapes-diffusion", "unguided"), ("shapes-diffusion", "tweedie"), ("shapes-diffusion", "learned"),
        ("shapes-flow", "unguided"), ("shapes-flow", "tweedie"), ("shapes-flow", "trainingfree"),
        ("shapes-onestep", "unguided"), ("shapes-onestep", "learned"))
GUIDANCE = {"shapes-diffusion": "builtin:guidance-diffusion-proxy", "shapes-onestep": "builtin:guidance-onestep-proxy"}


@dataclass
class DemoSettings:
    prompts: Sequence[str]
    prompt_set: str = "demo"
    n: int = 8
    beta: float = DEFAULT_BETA
    seed: int = 0
    rows: Sequence[tuple[str, str]] = ROWS
    steps: dict[str, int] = field(default_factory=dict)  # per model; default: the model's own
    timing_repeats: int = 2  # wall time = the fastest of this many identical runs (timings are noisy)


@dataclass
class RowResult:
    record: dict[str, Any]
    images: Tensor  # [P * n, 3, S, S], prompt-major


def parse_rows(text: str | None) -> list[tuple[str, str]]:
    """``model:method,...`` (model without the ``shapes-`` prefix allowed) -> rows; None -> all."""
    if not text:
        return list(ROWS)
    rows = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if ":" not in item:
            raise TiltgenError(f"row {item!r} must be MODEL:METHOD, e.g. diffusion:learned")
        model, method = (s.strip() for s in item.split(":", 1))
        model = model if model.startswith("shapes-") else f"shapes-{model}"
        if (model, method) not in ROWS:
            choices = ", ".join(f"{m.removeprefix('shapes-')}:{k}" for m, k in ROWS)
            raise TiltgenError(f"unknown demo row {item!r}; choose from: {choices}")
        rows.append((model, method))
    return rows


def diversity(images: Tensor, groups: int) -> float | None:
    """Mean pairwise RMS pixel distance between the images of each group (prompt), averaged;
    None with one image per prompt."""
    per = images.reshape(groups, -1, *images.shape[1:]).flatten(2).double()
    if per.shape[1] < 2:
        return None
    out = []
    for g in per:
        d = torch.cdist(g, g) / g.shape[1] ** 0.5
        k = g.shape[0]
        out.append(float(d.sum() / (k * (k - 1))))
    return sum(out) / len(out)


def tilted_target(values: Tensor, groups: int, beta: float) -> float:
    """The tilted mean reward E_p*[r] estimated from unguided samples by self-normalised
    importance weights exp(r / beta) per prompt (noisy for few samples; a reference, not a bound)."""
    per = values.double().reshape(groups, -1)
    weights = torch.softmax(per / beta, dim=1)
    return float((weights * per).sum(1).mean())


def run_row(model: Any, method: str, settings: DemoSettings, rewards: dict[str, Any]) -> tuple[RowResult, float]:
    """Sample one (model, method) row and measure it; returns the result and its sampling wall time."""
    from ..world.rewards import attribute_agreement

    prompts = [p for p in settings.prompts for _ in range(settings.n)]
    seeds = [settings.seed + i % settings.n for i in range(len(prompts))]  # same seeds for every prompt
    cond = model.encode(prompts)
    estimator, _ = build_estimator(model, method, rewards["target"], settings.beta,
                                   guidance=GUIDANCE.get(model.name.removeprefix("builtin:")))
    counter = CountingModel(model)
    wrapped = counter if estimator is None else GuidedModel(counter, model.schedule, estimator)
    steps = settings.steps.get(model.name.removeprefix("builtin:"), model.default_steps)
    walls = []
    for _ in range(settings.timing_repeats):  # sampling is deterministic: repeats only re-time it
        counter.calls = counter.sample_evals = 0
        start = time.perf_counter()
        out = model.sample(cond, seeds=seeds, steps=steps, model=wrapped)
        walls.append(time.perf_counter() - start)
    wall = min(walls)
    images = out.images
    with torch.no_grad():
        gold = rewards["gold"](images, prompts).float()
        proxy = rewards["target"](images, prompts).float()
    agreement = attribute_agreement(images, prompts)
    name = model.name.removeprefix("builtin:")
    record = {"model": name, "method": method, "prompt_set": settings.prompt_set,
              "gold": float(gold.mean()), "proxy": float(proxy.mean()), "fidelity": float(agreement["all"]),
              "diversity": diversity(images, len(settings.prompts)),
              "model_evals": counter.sample_evals / len(prompts) * model.evals_per_call(cond),
              "wall_ratio": None, "wall_s": wall, "beta": None if method == "unguided" else settings.beta,
              "steps": steps, "sampler": model.default_sampler, "cfg": cond.cfg_scale, "n_images": len(prompts),
              "fidelity_per_attribute": {k: float(v) for k, v in agreement.items() if k != "all"},
              "backward_per_image": steps if method == "tweedie" else 0,
              "proxy_tilted_target": tilted_target(proxy, len(settings.prompts), settings.beta)
              if method == "unguided" else None}
    return RowResult(record, images), wall


def run_demo(settings: DemoSettings, progress: bool = True) -> list[RowResult]:
    """Every row of ``settings``; wall ratios are relative to the same model's unguided row
    (sampled, unrecorded, for the ratio if the row list lacks it)."""
    from ..builtin.data import check_prompt
    from ..builtin.models import load_model
    from ..rewards import get_reward

    if settings.n < 1:
        raise TiltgenError(f"n must be >= 1, got {settings.n}")
    if not settings.prompts:
        raise TiltgenError("the demo needs at least one prompt")
    for p in settings.prompts:
        check_prompt(p)
    rewards = {"target": get_reward(TARGET_REWARD), "gold": get_reward(GOLD_REWARD)}
    models: dict[str, Any] = {}
    results: list[RowResult] = []
    unguided_wall: dict[str, float] = {}
    bar = tqdm(settings.rows, desc="demo", disable=not progress)
    for name, method in bar:
        bar.set_postfix_str(f"{name.removeprefix('shapes-')}:{method}")
        if name not in models:
            models[name] = load_model(f"builtin:{name}")
            _warm_up(models[name], settings)
            if (name, "unguided") not in settings.rows:  # time the baseline of the wall ratio anyway
                unguided_wall[name] = run_row(models[name], "unguided", settings, rewards)[1]
        result, wall = run_row(models[name], method, settings, rewards)
        if method == "unguided":
            unguided_wall[name] = wall
        results.append(result)
    for r in results:
        r.record["wall_ratio"] = r.record["wall_s"] / unguided_wall[r.record["model"]]
    return results


def _warm_up(model: Any, settings: DemoSettings) -> None:
    # first calls at a batch shape pay for lazy initialisation (kernels, caches): keep them out of the timings
    prompts = [p for p in settings.prompts for _ in range(settings.n)]
    model.sample(model.encode(prompts), seeds=list(range(len(prompts))), steps=2)


# ---- reports -----------------------------------------------------------------------------------
COLUMNS = ("model", "method", "prompt_set", "gold", "proxy", "fidelity", "diversity", "model_evals", "wall_ratio")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(records: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(round(r[c]) if c == "model_evals" else r.get(c)) for c in columns) + " |"
              for r in records]
    return "\n".join(lines)


def _find(records: Sequence[dict[str, Any]], model: str, method: str) -> dict[str, Any] | None:
    return next((r for r in records if r["model"] == model and r["method"] == method), None)


def findings(records: Sequence[dict[str, Any]]) -> list[str]:
    """Plain-language comparisons the issue asks for, computed from the records."""
    lines = []
    for r in records:
        base = _find(records, r["model"], "unguided")
        if r["method"] == "unguided" or base is None:
            continue
        d_proxy, d_gold = r["proxy"] - base["proxy"], r["gold"] - base["gold"]
        d_target = base["proxy_tilted_target"] - base["proxy"]
        d_fid = r["fidelity"] - base["fidelity"]
        verdict = ("raises proxy and gold" if d_proxy > 0 and d_gold > 0 else
                   "raises the proxy but not the gold (reward hacking)" if d_proxy > 0 else "does not raise the proxy")
        lines.append(f"{r['model']} {r['method']}: proxy {d_proxy:+.4f}, gold {d_gold:+.4f}, fidelity {d_fid:+.3f} "
                     f"vs unguided — {verdict}; gold/proxy gain ratio "
                     f"{(d_gold / d_proxy) if d_proxy else float('nan'):.2f}; the exact tilt's proxy gain, "
                     f"estimated by importance-weighting the unguided samples, is {d_target:+.4f}.")
    return lines


def comparison_onestep(records: Sequence[dict[str, Any]]) -> str | None:
    """The one-step generator with learned guidance vs the 50-step unguided diffusion model."""
    rows = [r for r in (_find(records, "shapes-diffusion", "unguided"), _find(records, "shapes-onestep", "unguided"),
                        _find(records, "shapes-onestep", "learned"), _find(records, "shapes-diffusion", "learned"))
            if r is not None]
    if len(rows) < 2:
        return None
    base = rows[0]
    table = []
    for r in rows:
        table.append({**r, "steps": r["steps"], "wall_vs_diffusion": r["wall_s"] / base["wall_s"]})
    return markdown_table(table, ("model", "method", "steps", "gold", "proxy", "fidelity", "model_evals",
                                  "wall_vs_diffusion"))


def write_reports(results: Sequence[RowResult], settings: DemoSettings, out: Path, wall_total: float) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    records = [r.record for r in results]
    paths = {"json": out / "results.json", "md": out / "results.md", "grid": out / "grid.png"}
    paths["json"].write_text(json.dumps(records, indent=2))
    parts = [f"# tiltgen demo ({settings.prompt_set} prompts)\n",
             f"Target reward `{TARGET_REWARD}` (learned proxy preference) at beta = {settings.beta:g}; held-out "
             f"`{GOLD_REWARD}`; {settings.n} images per prompt, seeds {settings.seed}..{settings.seed + settings.n - 1}; "
             f"total {wall_total:.0f} s.\n",
             "Prompts:\n" + "\n".join(f"* {p}" for p in settings.prompts) + "\n",
             markdown_table(records) + "\n",
             "fidelity = fraction of images whose every attribute the classifier reads matches the caption; "
             "diversity = mean pairwise RMS pixel distance within a prompt; model_evals = network evaluations per "
             "image (classifier-free guidance counts 2; Tweedie also back-propagates through each); wall_ratio = "
             "sampling wall time / the same model's unguided sampling in this run (fastest of "
             f"{settings.timing_repeats} identical runs each).\n",
             "## Per-attribute fidelity\n",
             markdown_table([{**r, **r["fidelity_per_attribute"]} for r in records],
                            ("model", "method") + tuple(records[0]["fidelity_per_attribute"])) + "\n"]
    comparison = comparison_onestep(records)
    if comparison:
        parts += ["## One-step generator with learned guidance vs the 50-step diffusion model\n", comparison + "\n"]
    parts += ["## Findings\n", "\n".join(f"* {line}" for line in findings(records)) + "\n"]
    paths["md"].write_text("\n".join(parts))
    plot_grid(results, settings, paths["grid"])
    return paths


def plot_grid(results: Sequence[RowResult], settings: DemoSettings, path: Path, per_prompt: int = 4) -> Path:
    """Rows = (model, method), labelled; columns = the first ``per_prompt`` seeds of each prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(per_prompt, settings.n)
    cols = len(settings.prompts) * k
    fig, axes = plt.subplots(len(results), cols, figsize=(0.9 * cols + 2.2, 0.95 * len(results) + 0.8),
                             squeeze=False)
    for i, result in enumerate(results):
        for p in range(len(settings.prompts)):
            for j in range(k):
                ax = axes[i, p * k + j]
                ax.imshow(result.images[p * settings.n + j].permute(1, 2, 0).clamp(0, 1).numpy(),
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0 and j == 0:
                    ax.set_title(settings.prompts[p].replace(" on a ", "\non a "), fontsize=6, loc="left")
        r = result.record
        axes[i, 0].set_ylabel(f"{r['model'].removeprefix('shapes-')}\n{r['method']}", fontsize=8, rotation=0,
                              ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fresh_output_dir(base: str = "tiltgen-demo") -> Path:
    """A new folder in the working directory, named by date and time (suffixed if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(f"{base}-{stamp}")
    i = 1
    while path.exists():
        path = Path(f"{base}-{stamp}-{i}")
        i += 1
    return path

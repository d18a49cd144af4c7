"""Measuring and reporting the demo's rows: per-(model, prompt, method) records, effect sizes
against the base model's within-prompt spread, attribute histograms that moved, the grid."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .oracle import HISTOGRAMS, effective_sample_size, snis_mean, snis_weights, total_variation, weighted_histograms
from .world_demo import BINARY_REWARD, GOLD_REWARD, TARGET_REWARD, DemoSettings, RowResult, prompt_blocks, wall_ratio

#: An attribute histogram "moved" when its total-variation distance from unguided is at least this.
MOVED_TV = 0.15


def diversity(images: Tensor) -> float | None:
    """Mean pairwise RMS pixel distance between images [k, 3, H, W]; None for one image."""
    flat = images.flatten(1).double()
    k = flat.shape[0]
    if k < 2:
        return None
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(d.sum() / (k * (k - 1)))


def histograms(readings: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Fractions of each attribute value over the readings (count per image, the rest per shape)."""
    return weighted_histograms(readings)


def measure(results: Sequence[RowResult], settings: DemoSettings) -> list[dict[str, Any]]:
    """One record per (model, prompt, method)."""
    from ..rewards import get_reward
    from ..world.rewards import attribute_fidelity

    proxy, gold, binary = get_reward(TARGET_REWARD), get_reward(GOLD_REWARD), get_reward(BINARY_REWARD)
    n, prompts = settings.n, list(settings.prompts)
    base_by_model = {r.model: r for r in results if r.method == "unguided"}
    cache: dict[tuple[str, str], dict[str, Any]] = {}
    records = []
    for row in results:
        base = base_by_model[row.model]
        ratio, unreliable = wall_ratio(row, base)
        for p, prompt in enumerate(prompts):
            images = row.images[p * n:(p + 1) * n]
            with torch.no_grad():
                values = {"proxy": proxy(images, prompt).float(), "gold": gold(images, prompt).float(),
                          "binary": binary(images, prompt).float()}
            fid = attribute_fidelity(images, [prompt] * n)
            rec = {"model": row.model, "method": row.method, "prompt": prompt, "n": n,
                   "beta": row.beta, "proxy": float(values["proxy"].mean()), "gold": float(values["gold"].mean()),
                   "fidelity": fid["fidelity"], "fidelity_per_attribute": fid["per_attribute"],
                   "binary": float(values["binary"].mean()), "diversity": diversity(images),
                   "proxy_std": float(values["proxy"].std()) if n > 1 else None,
                   "gold_std": float(values["gold"].std()) if n > 1 else None,
                   "model_evals": row.model_evals, "backward_through_generator": row.backward,
                   "wall_ratio": ratio, "wall_ratio_unreliable": unreliable, "wall_s": min(row.walls),
                   "histograms": histograms(fid["readings"]), **row.extra}
            cache[(row.model, row.method, prompt)] = {**rec, "_proxy": values["proxy"], "_gold": values["gold"],
                                                      "_fidelity": fid["per_image"]}  # type: ignore[index]
            records.append(rec)
    for rec in records:
        base = cache[(rec["model"], "unguided", rec["prompt"])]  # type: ignore[index]
        rec["base_gold_std"] = base["gold_std"]
        rec["base_proxy_std"] = base["proxy_std"]
        for key in ("proxy", "gold", "binary"):
            rec[f"{key}_gain"] = rec[key] - base[key]
        for key in ("proxy", "gold"):
            std = base[f"{key}_std"]
            rec[f"{key}_gain_std"] = rec[f"{key}_gain"] / std if std else None
        rec["fidelity_change"] = None if rec["fidelity"] is None else rec["fidelity"] - base["fidelity"]
        rec["moved"] = {k: total_variation(rec["histograms"][k], base["histograms"][k]) for k in HISTOGRAMS
                        if total_variation(rec["histograms"][k], base["histograms"][k]) >= MOVED_TV}
        if rec["method"] == "unguided":
            rec.update(exact_tilt_estimates(base, settings.beta))
    return records


def exact_tilt_estimates(base: dict[str, Any], beta: float) -> dict[str, Any]:
    """Self-normalised importance estimates, from one prompt's unguided images, of the exact tilt's
    proxy, gold and fidelity (None where the caption specifies nothing), and the weights' ESS: so a
    reader can tell a drop in fidelity that the tilt itself makes from one that guidance adds."""
    weights = snis_weights(base["_proxy"], beta)
    scored = [i for i, f in enumerate(base["_fidelity"]) if f is not None]
    fidelity = None
    if scored:
        values = torch.tensor([base["_fidelity"][i] for i in scored], dtype=torch.float64)
        fidelity = snis_mean(values, weights[scored]) if float(weights[scored].sum()) > 0 else None
    return {"proxy_exact_tilt_estimate": snis_mean(base["_proxy"], weights),
            "gold_exact_tilt_estimate": snis_mean(base["_gold"], weights),
            "fidelity_exact_tilt_estimate": fidelity, "proxy_exact_tilt_ess": effective_sample_size(weights)}


def summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, method), averaged over prompts: gains in base within-prompt standard deviations."""
    out = []
    for key in dict.fromkeys((r["model"], r["method"]) for r in records):
        rows = [r for r in records if (r["model"], r["method"]) == key]
        mean = lambda k: (sum(r[k] for r in rows if r[k] is not None) / max(1, sum(r[k] is not None for r in rows))  # noqa: E731
                          if any(r[k] is not None for r in rows) else None)
        out.append({"model": key[0], "method": key[1], "proxy": mean("proxy"), "gold": mean("gold"),
                    "proxy_gain_std": mean("proxy_gain_std"), "gold_gain_std": mean("gold_gain_std"),
                    "fidelity": mean("fidelity"), "fidelity_change": mean("fidelity_change"),
                    "binary": mean("binary"), "diversity": mean("diversity"), "model_evals": rows[0]["model_evals"],
                    "wall_ratio": rows[0]["wall_ratio"], "wall_ratio_unreliable": rows[0]["wall_ratio_unreliable"],
                    "reward_hacking": bool(mean("proxy_gain_std") and mean("proxy_gain_std") > 0
                                           and (mean("gold_gain_std") or 0) < 0)})
    return out


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value.is_integer() and abs(value) >= 1:
            return str(int(value))
        return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) if c != "prompt" else repr(r[c]) for c in columns) + " |")
    return "\n".join(lines)


def _moved_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    base = {(r["model"], r["prompt"]): r for r in records if r["method"] == "unguided"}
    for r in records:
        if r["method"] == "unguided" or not r["moved"]:
            continue
        b = base[(r["model"], r["prompt"])]
        for attr, tv in sorted(r["moved"].items(), key=lambda kv: -kv[1]):
            values = sorted(set(r["histograms"][attr]) | set(b["histograms"][attr]))
            change = ", ".join(f"{v} {100 * b['histograms'][attr].get(v, 0):.0f}→{100 * r['histograms'][attr].get(v, 0):.0f}%"
                               for v in values)
            lines.append(f"* {r['model']} {r['method']}, {r['prompt']!r}: **{attr}** (TV {tv:.2f}): {change}")
    return lines


def _block_text(settings: DemoSettings) -> str:
    blocks = prompt_blocks(settings)
    if len(blocks) == 1:
        return ""
    return (f", each on one block of {len(blocks[0])} of the {len(settings.prompts)} prompts with the same work, its wall "
            f"times {len(blocks)}")


def write_reports(results: Sequence[RowResult], settings: DemoSettings, out: Path, wall_total: float
                  ) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    records = measure(results, settings)
    summ = summary(records)
    paths = {"json": out / "results.json", "md": out / "results.md", "grid": out / "grid.png"}
    paths["json"].write_text(json.dumps({"settings": {"prompts": list(settings.prompts), "n": settings.n,
                                                      "beta": settings.beta, "seed": settings.seed,
                                                      "prompt_set": settings.prompt_set,
                                                      "timing_repeats": settings.timing_repeats,
                                                      "timing_blocks": len(prompt_blocks(settings))},
                                         "records": records, "summary": summ, "wall_s": wall_total}, indent=2))
    base_rows = [r for r in records if r["method"] == "unguided"]
    flagged = [s for s in summ if s["wall_ratio_unreliable"]]
    hacks = [s for s in summ if s["reward_hacking"]]
    parts = [
        f"# tiltgen demo ({settings.prompt_set} prompts)\n",
        f"Target reward `{TARGET_REWARD}` (the learned proxy preference) at beta = {settings.beta:g} (learned "
        f"networks tilt at the beta they were trained for); held-out `{GOLD_REWARD}`; {settings.n} images per "
        f"prompt, seeds {settings.seed}..{settings.seed + settings.n - 1} in every row; {wall_total:.0f} s in all. "
        + _seen_text(results, settings.prompts)
        + "".join(f" {r.model} {r.method} uses the `{r.extra['variant']}` variant and data variance "
                  f"{_data_var_text(r.extra.get('data_var', 1.0))} (the model folder's recommendations)."
                  for r in results if "variant" in r.extra)
        + "".join(f" {r.model} {r.method} guides at scale {r.extra['scale']:.3g} (the network's calibrated scale, "
                  "`tiltgen calibrate-guidance`)." for r in results if r.extra.get("scale") not in (None, 1.0))
        + "".join(f" {r.model} {r.method} is {_smc_description(r)}." for r in results if "particles" in r.extra)
        + "\n",
        "## Effect sizes (mean over prompts)\n",
        "Gains are over the same model's unguided samples, in units of the base model's within-prompt standard "
        "deviation of that reward; fidelity = fraction of the attributes a prompt specifies that the attribute "
        "classifier reads back (prompts that specify nothing are left out); binary = GenEval-like success "
        "(number of shapes and colours); model_evals = network evaluations per image (CFG counts 2; Tweedie also "
        "back-propagates through each); wall_ratio = sampling wall time / the same model's unguided sampling "
        f"(fastest of {settings.timing_repeats} interleaved repeats{_block_text(settings)}; `unreliable` marks "
        "ratios that timing noise decided).\n",
        table(summ, ("model", "method", "proxy", "gold", "proxy_gain_std", "gold_gain_std", "fidelity",
                     "fidelity_change", "binary", "diversity", "model_evals", "wall_ratio", "wall_ratio_unreliable",
                     "reward_hacking"),
              ("model", "method", "proxy", "gold", "proxy gain (std)", "gold gain (std)", "fidelity",
               "fidelity change", "binary", "diversity", "model evals", "wall ratio", "wall ratio unreliable",
               "proxy up, gold down")) + "\n",
    ]
    if flagged:
        parts.append("Unreliable wall ratios: " + "; ".join(f"{s['model']} {s['method']}: "
                                                         f"{s['wall_ratio_unreliable']}" for s in flagged) + ".\n")
    if hacks:
        parts.append("Reward hacking (proxy up, gold down): " + ", ".join(f"{s['model']} {s['method']}"
                                                                        for s in hacks) + ".\n")
    tilt_lines = _exact_tilt_fidelity_lines(base_rows)
    if tilt_lines:
        parts.append("Fidelity change the exact tilt itself would make (importance estimate from the unguided "
                     "images; rough where the ESS is small): " + "; ".join(tilt_lines) + ".\n")
    parts += ["## Base models: within-prompt spread\n",
              table(base_rows, ("model", "prompt", "gold", "gold_std", "proxy", "proxy_std", "fidelity",
                                "proxy_exact_tilt_estimate", "gold_exact_tilt_estimate",
                                "fidelity_exact_tilt_estimate", "proxy_exact_tilt_ess"),
                    ("model", "prompt", "gold", "gold std", "proxy", "proxy std", "fidelity",
                     f"proxy under the exact tilt (importance estimate, beta {settings.beta:g})",
                     "gold under the exact tilt", "fidelity under the exact tilt", "the estimate's ESS")) + "\n",
              "## Every (model, prompt, method)\n",
              table(records, ("model", "prompt", "method", "proxy", "gold", "fidelity", "binary", "diversity",
                              "proxy_gain_std", "gold_gain_std", "model_evals", "wall_ratio")) + "\n",
              "## Attribute histograms that moved\n",
              f"Attributes whose histogram (as the classifier reads the images) moved by a total-variation distance "
              f">= {MOVED_TV} from unguided sampling of the same prompt:\n",
              "\n".join(_moved_lines(records)) or "(none)", ""]
    paths["md"].write_text("\n".join(parts))
    plot_grid(results, settings, paths["grid"])
    return paths


def plot_grid(results: Sequence[RowResult], settings: DemoSettings, path: Path, per_prompt: int = 4) -> Path:
    """Rows = (model, method); columns = the first ``per_prompt`` seeds of each prompt (same
    seed in every row of a column, so each column shows what the methods did to one sample)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(per_prompt, settings.n)
    cols = len(settings.prompts) * k
    fig, axes = plt.subplots(len(results), cols, figsize=(0.85 * cols + 1.6, 0.9 * len(results) + 0.6),
                             squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.08})
    for i, row in enumerate(results):
        for p, prompt in enumerate(settings.prompts):
            for j in range(k):
                ax = axes[i, p * k + j]
                ax.imshow(row.images[p * settings.n + j].permute(1, 2, 0).clamp(0, 1).numpy(),
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0 and j == 0:
                    ax.set_title(repr(prompt), fontsize=7, loc="left")
        label = row.method if row.method != "bestofn" else f"best-of-{row.extra.get('best_of')}"
        if "particles" in row.extra:
            label += f"\n(N = {row.extra['particles']})"
        if "variant" in row.extra:
            label += f"\n({row.extra['variant']})"
        if row.extra.get("scale") not in (None, 1.0):
            label += f"\n(scale {row.extra['scale']:.3g})"
        axes[i, 0].set_ylabel(f"{row.model}\n{label}", fontsize=7, rotation=0, ha="right", va="center")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _exact_tilt_fidelity_lines(base_rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per model: the mean over prompts of (fidelity under the exact tilt - unguided fidelity)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in base_rows):
        rows = [r for r in base_rows if r["model"] == model and r.get("fidelity_exact_tilt_estimate") is not None
                and r["fidelity"] is not None]
        if rows:
            change = sum(r["fidelity_exact_tilt_estimate"] - r["fidelity"] for r in rows) / len(rows)
            ess = [r["proxy_exact_tilt_ess"] for r in rows]
            lines.append(f"{model} {change:+.3f} (ESS {min(ess):.1f}-{max(ess):.1f})")
    return lines


def _seen_text(results: Sequence[RowResult], prompts: Sequence[str]) -> str:
    """Which of the prompts each guidance network was trained on (none, for the demo's own)."""
    from ..builtin import resolve_weights
    from ..tilt.learned.pretrained import read_guidance_record, recorded_conditions

    seen = []
    for folder in dict.fromkeys(r.extra["guidance"] for r in results if r.extra.get("guidance")):
        record = read_guidance_record(resolve_weights(folder, "guidance network"))
        trained = set(recorded_conditions(record))
        if any(p in trained for p in prompts):
            seen.append(f"`{folder}` was trained on " + ", ".join(f"'{p}'" for p in prompts if p in trained))
    if not seen:
        return "The guidance networks never saw these prompts."
    return "Seen in training: " + "; ".join(seen) + "."


def _data_var_text(data_var: float | list[float]) -> str:
    if isinstance(data_var, (int, float)):
        return f"{data_var:g}"
    return "(" + ", ".join(f"{v:.2f}" for v in data_var) + ") per latent channel"


def _smc_description(row: RowResult) -> str:
    n = row.extra["particles"]
    if row.extra["smc"] == "twisted":
        return (f"twisted SMC with {n} particles per image (the guidance network's log h_t twists, its guided drift "
                "proposes, the reward weighs the last step; resampled at ESS < 0.5)")
    return (f"SMC with {n} particles per image (the base model proposes, r(x0_hat) / beta of the decoded prediction "
            "twists, the reward weighs the last step; resampled at ESS < 0.5)")


def fresh_output_dir(base: str = "tiltgen-demo") -> Path:
    """A new folder in the working directory, named by date and time (suffixed if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(f"{base}-{stamp}")
    i = 1
    while path.exists():
        path = Path(f"{base}-{stamp}-{i}")
        i += 1
    return path

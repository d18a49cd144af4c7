"""Calibrating the scale of a learned guidance network against the exact tilt, on held-out prompts.

A guidance network trained on a few samples per prompt is a *shrunk* estimate of log h_t: on
prompts it never saw, its log q moves with r/beta but by less (docs/learned-guidance.md,
"Calibrating the scale"), so its drift reaches only part of the exact tilt's reward gain.
The exact tilt's mean reward on a prompt is known without any guidance, by self-normalised
importance sampling of base samples:

    E*[r | c] ~ sum_i softmax_i(r_i / beta) r_i,   r_i = r(x0_i, c),  x0_i ~ p(. | c)

Calibration samples the held-out prompts without guidance and with guidance at a grid of scales
(the same seeds, so the differences are not noise), and picks the scale at which the guided
mean reward reaches that target: interpolated in log-scale between the two grid points around
it, or the grid point with the highest reward when none reaches it. The picked scale is then
sampled once more and its reward and share of the exact gain are recorded. Only reward values
of the reward the network was trained for are used (no evaluation prompt), and, when asked, those
of a reward to keep: a scale that lowers it by more than ``max_drop`` is stepped down.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ...core.model import Model
from ...core.reward import Reward, evaluate_reward, reward_name
from ...core.schedules import Schedule
from ...errors import TiltgenError, check_beta
from ..base import GuidedModel
from .data import generate_data, weights_ess
from .potential import LearnedGuidance


@dataclass(frozen=True)
class CalibrationConfig:
    """``n`` samples per condition, at most ``max_conditions`` conditions, the scales tried."""

    n: int = 32
    max_conditions: int = 16
    scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    seed: int = 100_000  # apart from the training data's seeds

    def __post_init__(self) -> None:
        if self.n < 2:
            raise TiltgenError(f"calibration needs at least 2 samples per condition, got n={self.n}")
        if self.max_conditions < 1:
            raise TiltgenError(f"max_conditions must be >= 1, got {self.max_conditions}")
        scales = list(self.scales)
        if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales) or scales != sorted(set(scales)):
            raise TiltgenError(f"calibration scales must be positive, finite and increasing, got {self.scales}")


def tilted_means(reward: Tensor, prompt: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per condition: base mean reward [K], self-normalised estimate of the tilted mean E*[r] [K]
    and the effective sample size of its weights [K] (``reward`` [N], ``prompt`` [N] indices)."""
    check_beta(beta)
    base, tilted = [], []
    for p in torch.unique(prompt):
        r = reward[prompt == p].to(torch.float64)
        w = torch.softmax(r / beta, 0)
        base.append(r.mean())
        tilted.append((w * r).sum())
    return torch.stack(base), torch.stack(tilted), weights_ess(reward, prompt, beta)


def choose_scale(scales: Sequence[float], rewards: Sequence[float], base: float, target: float) -> float:
    """The scale whose guided mean reward reaches ``target`` (see module doc); ``rewards[i]`` is the
    mean reward at ``scales[i]`` (increasing scales), ``base`` the unguided one (scale 0)."""
    points = [(0.0, base)] + list(zip(scales, rewards))
    for (s0, m0), (s1, m1) in zip(points[:-1], points[1:]):
        if m1 >= target:
            frac = (target - m0) / (m1 - m0) if m1 > m0 else 1.0
            if s0 == 0.0:  # below the first grid point: linear in the scale
                return s1 * frac
            return math.exp(math.log(s0) + frac * (math.log(s1) - math.log(s0)))
    return max(zip(scales, rewards), key=lambda sr: sr[1])[0]


def keep_scale(chosen: float, means: dict[float, float], max_drop: float) -> tuple[float, dict]:
    """The largest scale <= ``chosen`` among ``means`` (keep-reward mean per scale; 0.0 = unguided)
    whose mean is at most ``max_drop`` below the unguided one, and the record of that choice
    (the smallest guided scale, with ``met`` False, when none is)."""
    base = means[0.0]
    guided = sorted(s for s in means if s > 0)
    allowed = [s for s in guided if s <= chosen and base - means[s] <= max_drop]
    met = bool(allowed)
    scale = max(allowed) if met else guided[0]
    return scale, {"max_drop": max_drop, "base": base, "met": met, "chosen_by_reward": chosen,
                   "tried": [{"scale": s, "mean": means[s]} for s in guided]}


def _rewards_by_condition(reward: Reward, x0: Tensor, prompt: Tensor, conds: Sequence[Any]) -> list[float]:
    """``reward`` of each sample [N] with its own condition (samples grouped by ``prompt`` index)."""
    values = torch.empty(len(prompt), dtype=torch.float64)
    with torch.no_grad():
        for k in torch.unique(prompt):
            rows = prompt == k
            values[rows] = evaluate_reward(reward, x0[rows], conds[int(k)]).to(torch.float64).cpu()
    return values.tolist()


def _condition_mean(values: Sequence[float] | Tensor, prompt: Sequence[int] | Tensor) -> float:
    """The mean over conditions of each condition's mean (every prompt weighs the same)."""
    v, p = torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(prompt)
    return float(torch.stack([v[p == k].mean() for k in torch.unique(p)]).mean())


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_state(path: Path | None, key: str) -> dict:
    if path is None or not path.is_file():
        return {}
    state = json.loads(path.read_text())
    return state if state.get("key") == key else {}


def _save_state(path: Path | None, state: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def calibrate_scale(model: Model, schedule: Schedule, reward: Reward, guidance: LearnedGuidance, *, beta: float,
                    conditions: Sequence[Any], shape: Sequence[int], sampler: str, steps: int,
                    spacing: str = "uniform", config: CalibrationConfig = CalibrationConfig(),
                    dtype: torch.dtype = torch.float32, state_path: str | Path | None = None,
                    progress: bool = True, log: Callable[[str], None] | None = None,
                    keep: Reward | None = None, max_drop: float = 0.05) -> dict:
    """Pick ``guidance``'s scale on ``conditions`` (held-out prompts) and return the record.

    Samples like the training data (``sampler``, ``steps``, ``spacing``). ``state_path``: a
    file keeping each finished pass, so an interrupted calibration continues where it stopped.
    The guidance's own ``scale`` is left as it was. ``keep``: a second reward (prompt fidelity,
    say) whose mean over the same samples may fall by at most ``max_drop`` below the unguided
    one: the scale is then the one chosen by ``reward`` or the largest tried scale below it that
    keeps ``keep`` (the smallest scale tried, flagged, when none does); see :func:`keep_scale`.
    """
    check_beta(beta)
    if keep is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise TiltgenError(f"max_drop must be a finite number >= 0, got {max_drop}")
    conds = list(conditions)[: config.max_conditions]
    if not conds:
        raise TiltgenError("calibration needs at least one held-out condition (train with val_fraction > 0, "
                           "or give prompts)")
    settings = {"config": asdict(config), "conditions": [repr(c) for c in conds], "beta": beta, "sampler": sampler,
                "steps": steps, "spacing": spacing, "shape": list(shape)}
    if guidance.tilts_input:  # a noise tilt samples differently with and without keeping the noise's norm
        settings["keep_noise_norm"] = bool(guidance.keep_noise_norm)
    if keep is not None:
        settings["keep"] = reward_name(keep)
    path = Path(state_path) if state_path is not None else None
    state = _load_state(path, _key(settings)) or {"key": _key(settings), "passes": {}}

    def mean_reward(scale: float) -> tuple[float, Tensor, Tensor]:
        name = repr(float(scale))
        if name not in state["passes"]:
            tick = time.perf_counter()
            sampled = model if scale == 0 else GuidedModel(model, schedule, guidance)
            old, guidance.scale = guidance.scale, float(scale)
            try:
                data = generate_data(sampled, schedule, reward, shape=shape, n=config.n, conditions=conds,
                                     sampler=sampler, steps=steps, spacing=spacing, seed=config.seed, dtype=dtype,
                                     progress=progress)
            finally:
                guidance.scale = old
            state["passes"][name] = {"reward": data.reward.tolist(), "prompt": data.prompt.tolist(),
                                     "model_evals": data.model_evals, "wall_s": time.perf_counter() - tick}
            if keep is not None:
                state["passes"][name]["keep"] = _rewards_by_condition(keep, data.x0, data.prompt, conds)
            _save_state(path, state)
        p = state["passes"][name]
        r, prompt = torch.tensor(p["reward"], dtype=torch.float64), torch.tensor(p["prompt"])
        mean = _condition_mean(r, prompt)
        if log is not None:
            log(f"scale {scale:g}: mean reward {mean:.4f}")
        return mean, r, prompt

    base, r0, prompt0 = mean_reward(0.0)
    _, tilted, ess = tilted_means(r0, prompt0, beta)
    target = float(tilted.mean())
    gap = target - base
    tried: list[tuple[float, float]] = []
    for scale in config.scales if gap > 0 else ():  # nothing to reach when the tilt gains nothing
        tried.append((scale, mean_reward(scale)[0]))
        if tried[-1][1] >= target or (len(tried) > 1 and tried[-1][1] < tried[-2][1]):
            break  # reached the target, or past the peak
    chosen = choose_scale([s for s, _ in tried], [m for _, m in tried], base, target) if tried else 1.0
    kept = None
    if keep is not None:
        mean_reward(chosen)  # its keep-reward, when the choice fell between grid points
        means = {float(k): _condition_mean(p["keep"], p["prompt"]) for k, p in state["passes"].items()}
        chosen, kept = keep_scale(chosen, means, max_drop)
        kept["reward"] = reward_name(keep)
        if log is not None:
            log(f"{kept['reward']}: unguided {kept['base']:.4f}; " + ", ".join(
                f"scale {t['scale']:g} {t['mean']:.4f}" for t in kept["tried"]) + f"; kept at scale {chosen:g}")
    achieved = dict(tried).get(chosen)
    if achieved is None:
        achieved = mean_reward(chosen)[0]
    passes = state["passes"].values()
    return {"scale": chosen, "base_reward": base, "target_reward": target, "reward": achieved,
            "share": (achieved - base) / gap if gap > 0 else None,
            "share_at_scale_1": ((dict(tried)[1.0] - base) / gap if gap > 0 and 1.0 in dict(tried) else None),
            "tried": [{"scale": s, "reward": m} for s, m in tried], "ess": float(ess.mean()), "n": config.n,
            "conditions": [repr(c) for c in conds], "sampler": sampler, "steps": steps,
            **({"keep_noise_norm": settings["keep_noise_norm"]} if "keep_noise_norm" in settings else {}),
            **({"keep": kept} if kept is not None else {}),
            "model_evals": int(sum(p["model_evals"] for p in passes)),
            "reward_evals": int(sum(len(p["reward"]) for p in passes)),
            "wall_s": float(sum(p["wall_s"] for p in passes))}

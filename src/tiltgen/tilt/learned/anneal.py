"""Annealed training: learn h_t for a strong tilt through a ladder of weaker ones.

With lambda = 1 / beta, the tilt's h factorises along a ladder 0 = lambda_0 < ... < lambda_K:

    h_t^{lambda_{k+1}}(x_t) = h_t^{lambda_k}(x_t) * E_{p*_{lambda_k}}[exp((lambda_{k+1} - lambda_k) r(x0)) | x_t]

because the posterior of x0 given x_t under the tilted model p*_{lambda_k} is the base posterior
tilted by exp(lambda_k r). Each stage therefore trains on samples of the previous stage's guided
sampler (approximately p*_{lambda_k}) with the *incremental* weights exp(d_lambda r), whose
effective sample size is kept at ``ess_fraction`` of the data by choosing d_lambda (bisection; the
ESS falls monotonically in d_lambda). The network of stage k + 1 starts from stage k's and is trained
relative to it, so it carries the whole log h_t and sampling costs one network however many stages
ran. A tilt whose base weights already keep that ESS trains in one stage, exactly as
:func:`.train.train_guidance`. docs/learned-guidance.md, "Annealed training", derives it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...core.files import write_json
from ...core.model import Model, as_model
from ...core.reward import Reward, as_reward
from ...core.samplers import evals_per_sample
from ...core.schedules import Schedule
from ...errors import TiltgenError
from ..base import GuidedModel
from ..particles import smc_sample
from .data import GuidanceData, weights_ess
from .potential import CondEncoder, LearnedGuidance
from .pretrained import save_pretrained
from .train import _DTYPES, TrainConfig, TrainResult, _generate, load_guidance, train_guidance

_STAGE_SEED = 7_919  # seed offset between stages (fresh sampler noise, minibatches and pool)
_CHUNK = 4096  # particles per SMC call when drawing a stage's data


def next_lambda(reward: Tensor, prompt: Tensor, lam: float, lam_target: float, ess_fraction: float,
                log_weight: Tensor | None = None) -> float:
    """The largest lambda in (lam, lam_target] whose incremental weights exp((lambda - lam) r) keep an
    effective sample size >= ``ess_fraction`` of the samples in every condition (of the samples' own
    ESS when they carry ``log_weight``)."""
    floor = ess_fraction * weights_ess(torch.zeros_like(reward), prompt, 1.0, log_weight)

    def ok(step: float) -> bool:
        return bool((weights_ess(reward, prompt, 1.0 / step, log_weight) >= floor).all())

    full = lam_target - lam
    if ok(full):
        return lam_target
    lo, hi = 0.0, full
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    if lo <= 0.0:  # all rewards but one are -inf-like: no step keeps the ESS; take the smallest positive
        lo = hi
    return lam + lo


def train_annealed(model: Model, schedule: Schedule, reward: Reward, config: TrainConfig, *,
                   shape: Sequence[int], conditions: Sequence[Any] | None = None,
                   cond_encoder: CondEncoder | None = None, ess_fraction: float = 0.1, max_stages: int = 8,
                   stage_particles: int = 1, out_dir: str | Path | None = None, resume: bool = False,
                   progress: bool = True) -> TrainResult:
    """Train guidance for ``config.beta`` through a ladder of tilts (module doc).

    Every stage uses ``config`` (data size, steps, pool) with its own seed; the last stage jumps to
    the target if ``max_stages`` is reached first. ``stage_particles`` = N > 1: the samples of
    stages after the first are twisted-SMC particles (N per population, the previous stage's network
    as twist and drift, ``ddpm`` with as many steps as the data sampler makes model calls), kept with
    their final weights, so a stage's data follow p*_{lambda_k} itself rather than the guided
    sampler's approximation of it; 1: the guided sampler's samples. The record gains ``anneal``:
    each stage's lambda, effective sample size and training compute; the model/reward evaluation
    counts and wall times are the sums over stages.

    ``out_dir``: each stage is a :func:`train_guidance` run in ``stage-<k>/`` (checkpoints, resume),
    ``anneal.json`` lists the ladder so far, and the final network is saved in ``out_dir`` itself
    (:func:`.pretrained.save_pretrained`). ``resume=True`` reloads the finished stages and resumes
    the interrupted one (a stage interrupted while generating its data generates it again).
    """
    if not 0.0 < ess_fraction < 1.0:
        raise TiltgenError(f"ess_fraction must be in (0, 1), got {ess_fraction}")
    if max_stages < 1:
        raise TiltgenError(f"max_stages must be >= 1, got {max_stages}")
    if isinstance(stage_particles, bool) or not isinstance(stage_particles, int) or stage_particles < 1:
        raise TiltgenError(f"stage_particles must be an integer >= 1, got {stage_particles!r}")
    if stage_particles > 1 and config.n_data % stage_particles:
        raise TiltgenError(f"stage_particles={stage_particles} must divide n_data={config.n_data} (samples per "
                           f"condition = populations x particles)")
    model, reward = as_model(model), as_reward(reward)
    out = None if out_dir is None else Path(out_dir)
    settings = {"ess_fraction": ess_fraction, "max_stages": max_stages, "stage_particles": stage_particles,
                "train": config.to_json()}
    ladder = _read_ladder(out, settings) if resume else {**settings, "stages": []}
    lam_target = 1.0 / config.beta
    lam, guidance, result, first = 0.0, None, None, None
    for k in range(max_stages):
        seed = config.seed + _STAGE_SEED * k
        stage_dir = None if out is None else out / f"stage-{k}"
        stage = ladder["stages"][k] if k < len(ladder["stages"]) else None
        if stage is not None and not stage["done"] and not (stage_dir / "config.json").is_file():  # type: ignore[operator]
            # stopped before its data were saved: draw them again (same seed, so the same ladder)
            ladder["stages"], stage = ladder["stages"][:k], None
        if stage is not None and stage["done"]:  # finished in an earlier run
            guidance = load_guidance(stage_dir, cond_encoder)  # type: ignore[arg-type]
            result = TrainResult(guidance, guidance.record)
        else:
            sample_model = model if guidance is None else GuidedModel(model, schedule, guidance)
            data = None
            if stage is None:  # a new stage: its data decide how far it goes
                tick = time.perf_counter()
                if guidance is not None and stage_particles > 1:
                    data = _smc_stage_data(model, schedule, reward, guidance, lam, config, shape, conditions, seed,
                                           stage_particles, progress)
                else:
                    data = _generate(sample_model, schedule, reward, replace(config, seed=seed), shape, conditions,
                                     progress)
                lam_next = lam_target if k == max_stages - 1 else next_lambda(
                    data.reward, data.prompt, lam, lam_target, ess_fraction, data.log_weight)
                stage = {"lambda": lam_next, "beta": 1.0 / lam_next, "done": False,
                         "data_wall_s": time.perf_counter() - tick}
                if k == 0:  # what one-stage training would have learned from
                    ladder["base_weights_ess"] = float(data.ess(config.beta).min())
                ladder["stages"].append(stage)
                _write_ladder(out, ladder)
            stage_config = replace(config, beta=1.0 / (stage["lambda"] - lam), seed=seed)
            result = train_guidance(sample_model, schedule, reward, stage_config, shape=shape, conditions=conditions,
                                    cond_encoder=cond_encoder, out_dir=stage_dir, resume=data is None,
                                    progress=progress, data=data, relative_to=guidance)
            rec = result.record
            stage.update(done=True, weights_ess=rec["weights_ess"]["min"], samples=rec["data_size"],
                         train_wall_s=rec["train_wall_s"], train_model_evals=rec["train_model_evals"],
                         train_reward_evals=rec["train_reward_evals"])
            _write_ladder(out, ladder)
            guidance = result.guidance
        first = first or result.record
        lam = stage["lambda"]
        if lam >= lam_target:
            break
    assert result is not None and guidance is not None and first is not None
    stages = ladder["stages"]
    record = {**result.record, "beta": config.beta, "train": config.to_json(),
              # whose network this is: stages after the first sample a guided copy of the model
              "base_model": first.get("base_model"), "model": first.get("model"),
              "train_model_evals": sum(s["train_model_evals"] for s in stages),
              "train_reward_evals": sum(s["train_reward_evals"] for s in stages),
              "train_wall_s": sum(s["train_wall_s"] for s in stages),
              "anneal": {**{k: v for k, v in ladder.items() if k != "train"}}}
    record["weights_ess"] = {**record["weights_ess"], "min": min(s["weights_ess"] for s in stages)}
    guidance.record = record
    if out is not None:
        save_pretrained(guidance, out)
    return TrainResult(guidance, record, result.losses)


_LADDER = "anneal.json"


def _read_ladder(out: Path | None, settings: dict) -> dict:
    """The ladder an interrupted run wrote, checked against this run's settings."""
    if out is None:
        raise TiltgenError("resume=True needs out_dir (the folder of the interrupted run)")
    path = out / _LADDER
    if not path.is_file():
        raise TiltgenError(f"cannot resume: {path} does not exist (no annealed run was started in {out})")
    ladder = json.loads(path.read_text())
    differ = sorted(k for k in settings if ladder.get(k) != settings[k])
    if differ:
        raise TiltgenError(f"cannot resume the annealed run in {out}: it was started with different "
                           f"{', '.join(differ)}")
    return ladder


def _write_ladder(out: Path | None, ladder: dict) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / _LADDER, ladder)


def _smc_stage_data(model: Model, schedule: Schedule, reward: Reward, guidance: LearnedGuidance, lam: float,
                    config: TrainConfig, shape: Sequence[int], conditions: Sequence[Any] | None, seed: int,
                    particles: int, progress: bool) -> GuidanceData:
    """Weighted samples of p*_lam: every particle of twisted SMC with ``guidance`` as twist and drift,
    with its final normalised weight (+ log N, so each population carries the same total)."""
    if config.trajectory:
        raise TiltgenError("stage_particles > 1 draws x0 by SMC; trajectory mode needs the sampler's own states")
    steps = evals_per_sample(config.sampler, config.data_steps)
    conds = [None] if conditions is None else list(conditions)
    per_chunk = max(1, _CHUNK // particles)
    populations = config.n_data // particles
    xs, rewards, log_ws, prompts = [], [], [], []
    dtype = _DTYPES[config.data_dtype]
    bar = tqdm(total=len(conds) * config.n_data, desc="stage data (SMC)", disable=not progress, leave=False)
    for p, cond in enumerate(conds):
        for start in range(0, populations, per_chunk):
            count = min(per_chunk, populations - start)
            out = smc_sample(model, schedule, reward, 1.0 / lam, n=count, particles=particles, shape=shape, cond=cond,
                             drift=guidance, twist=guidance.log_twist, sampler="ddpm", steps=steps,
                             spacing=config.spacing, seed=seed + 104_729 * p + start, dtype=dtype)
            xs.append(out.particles.reshape((count * particles,) + tuple(shape)))
            rewards.append(out.rewards.reshape(-1))
            log_ws.append((out.log_weights + math.log(particles)).reshape(-1))
            prompts.append(torch.full((count * particles,), p, dtype=torch.long))
            bar.update(count * particles)
    bar.close()
    n = len(conds) * config.n_data
    return GuidanceData(torch.cat(xs), torch.cat(rewards), torch.cat(prompts), model_evals=n * steps, reward_evals=n,
                        log_weight=torch.cat(log_ws))

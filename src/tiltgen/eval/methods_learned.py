"""Benchmark methods of the learned guidance network (issue: learned guidance).

* ``learned``                the default: logistic (density-ratio, log-space) loss + consistency,
                             trained through a ladder of tilts whenever the base samples' weights
                             keep less than ANNEAL_ESS of them (tilt.learned.anneal; one stage,
                             the plain training, otherwise)
* ``learned-single``         the same in one stage on base samples, whatever the weights' ESS
* ``learned-noconsistency``  the default with eta = 0
* ``learned-poisson``        log-space regression exp(l) - w l + consistency
* ``learned-mse``            plain MSE of exp(r/beta) weights + consistency
* ``twisted-smc-<N>``        SMC with N particles: the default network's log potential as the
                             twist, handed over to the plug-in r(x0_hat)/beta once the plug-in's
                             weight increments vary less (``handoff``), its drift as the proposal
                             (tilt.particles); records the per-step ESS, the hand-off time and the
                             log normalising-constant estimate
* ``twisted-nohandoff-smc-<N>`` the same with the network's twist to the end
* ``twisted-single-smc-<N>`` the default twisted SMC with the one-stage network
* ``learned-stagesmc-<N>``   ``learned`` with every later stage's samples drawn by twisted SMC with N
                             particles, kept with their weights (``stage_particles``)

The network is trained inside the bench on the base model's own samples (separately
counted: ``train_model_evals``, ``train_reward_evals``, ``train_wall_s`` per run), at the
times of the bench's sampler grid. The record's ``wall_s`` / ``wall_ratio`` are the guided
sampling alone (the cost per batch once the network exists); training is excluded from
them as setup time and reported in ``train_wall_s``.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

from ..core.model import CountingModel
from ..core.reward import CountingReward
from ..core.samplers import time_grid
from ..tilt import GuidedModel
from ..tilt.learned import TrainConfig, train_guidance
from ..tilt.learned.anneal import train_annealed
from .analytic_bench import MethodContext, MethodOutput, MethodRunner, register_method, register_method_pattern
from .methods_trainingfree import SMC_SAMPLER, particle_count, run_smc_chunks, smc_steps

DEFAULT_LOSS = "logistic"
DEFAULT_ETA = 1.0
# the ladder's floor on the effective sample size of each stage's weights, as a share of the
# samples: one value for every case (a stage below it learns from too few samples)
ANNEAL_ESS = 0.1


def bench_train_config(ctx: MethodContext, loss: str, eta: float) -> TrainConfig:
    """Training sized by the bench settings, at the sampler's own time grid."""
    s, fam = ctx.settings, ctx.family
    grid = time_grid(fam.schedule, s.steps, fam.spacing)
    return TrainConfig(beta=ctx.beta, loss=loss, eta=eta, steps=s.train_steps, n_data=s.train_data,
                       pool_size=s.train_pool, times=tuple(float(t) for t in grid[grid > 0]), spacing=fam.spacing,
                       sampler=s.sampler, data_steps=s.steps, data_dtype="float64",
                       checkpoint_every=s.train_steps, seed=s.seed + 1_000_003)


def _train(ctx: MethodContext, loss: str, eta: float, anneal: bool = True,
           stage_particles: int = 1) -> tuple[Any, float, dict[str, Any]]:
    """(trained result, its wall time, its record fields) for the case; counted apart from
    ctx.model / ctx.reward so the sampling columns stay per-sample costs."""
    model = CountingModel(ctx.model.model)
    reward = CountingReward(ctx.reward.reward)
    tick = time.perf_counter()
    config = bench_train_config(ctx, loss, eta)
    if anneal:
        result = train_annealed(model, ctx.family.schedule, reward, config, shape=(ctx.case.dim,),
                                ess_fraction=ANNEAL_ESS, stage_particles=stage_particles, progress=False)
    else:
        result = train_guidance(model, ctx.family.schedule, reward, config, shape=(ctx.case.dim,), progress=False)
    setup = time.perf_counter() - tick
    rec = result.record
    stages = {} if "anneal" not in rec else {"anneal_lambdas": [round(s["lambda"], 4) for s in rec["anneal"]["stages"]],
                                             "base_weights_ess": rec["anneal"]["base_weights_ess"]}
    return result, setup, {**stages,
        "train_model_evals": model.sample_evals, "train_reward_evals": reward.evals,
        "train_wall_s": rec["train_wall_s"], "train_loss": rec["final_loss"], "train_steps": rec["steps"],
        "train_data": rec["data_size"], "train_objective": loss, "train_eta": eta,
        "train_weights_ess": rec["weights_ess"]["min"]}


def run_learned(ctx: MethodContext, loss: str = DEFAULT_LOSS, eta: float = DEFAULT_ETA,
                anneal: bool = True, stage_particles: int = 1) -> MethodOutput:
    result, setup, record = _train(ctx, loss, eta, anneal, stage_particles)
    samples = ctx.run_sampler(GuidedModel(ctx.model, ctx.family.schedule, result.guidance))
    return MethodOutput(samples, setup_s=setup, extra=record)


@register_method_pattern(r"twisted-(single-|nohandoff-)?smc-(\d+)", example="twisted-smc-<N>")
def _twisted_smc_factory(match: re.Match[str]) -> MethodRunner:
    """Twisted SMC: the learned network's log potential is the twist (handed over to the plug-in
    near the data unless ``nohandoff``), its drift the proposal."""
    particles = particle_count(match, group=2)
    anneal = match.group(1) != "single-"
    handoff = match.group(1) != "nohandoff-"

    def run(ctx: MethodContext) -> MethodOutput:
        result, setup, record = _train(ctx, DEFAULT_LOSS, DEFAULT_ETA, anneal)
        outs = run_smc_chunks(ctx, particles, result.guidance, result.guidance.log_twist, handoff=handoff)
        per_step = torch.tensor([o.ess for o in outs], dtype=torch.float64).mean(0)
        handoff_t = [o.handoff_t for o in outs if o.handoff_t is not None]
        return MethodOutput(torch.cat([o.samples for o in outs]), setup_s=setup, extra={
            "sampler": SMC_SAMPLER, "smc_steps": smc_steps(ctx), "particles": particles, "handoff": handoff,
            "handoff_t": [min(handoff_t), max(handoff_t)] if handoff_t else None,
            "ess_per_step": [round(float(v), 4) for v in per_step],
            "ess_min": float(per_step.min()), "log_z": float(torch.cat([o.log_z for o in outs]).mean()),
            "log_z_exact": float(ctx.tilted.log_z), **record})

    return run


register_method("learned", default=True)(lambda ctx: run_learned(ctx))
register_method("learned-noconsistency")(lambda ctx: run_learned(ctx, DEFAULT_LOSS, 0.0))
register_method("learned-poisson")(lambda ctx: run_learned(ctx, "poisson", DEFAULT_ETA))
register_method("learned-mse")(lambda ctx: run_learned(ctx, "mse", DEFAULT_ETA))
register_method("learned-single")(lambda ctx: run_learned(ctx, anneal=False))


@register_method_pattern(r"learned-stagesmc-(\d+)", example="learned-stagesmc-<N>")
def _stage_smc_factory(match: re.Match[str]) -> MethodRunner:
    """Annealed learned guidance whose later stages train on weighted twisted-SMC particles."""
    particles = particle_count(match)
    return lambda ctx: run_learned(ctx, stage_particles=particles)

"""Benchmark methods of training-free guidance and particle samplers (issue: training-free).

* ``trainingfree`` (default grid) and ``trainingfree-<variant>``: :class:`TrainingFreeGuidance`.
* ``trainingfree-bank`` and ``trainingfree-bank-<variant>`` (not in the default grid: at the full
  settings the [4000, 4096] kernel matrices make each row take minutes): the same with a
  :class:`SampleBank` of ``BANK_SIZE`` unguided base samples as its prior; drawing and scoring
  the bank is setup (``setup_*`` fields), like training for learned guidance.
* ``tweedie-damped`` (default grid): the damped plug-in baseline (:class:`TweedieGuidance` with
  ``damping``), also a drift for the particle methods.
* ``exact-ddpm``: the exact tilt sampled with SMC's sampler and steps, the floor of the SMC rows.
* ``bestofn-<N>[+<drift>]`` and ``smc-<N>[+<drift>]``: particle methods (not in the default
  grid: each output sample costs N trajectories). ``<drift>`` is any name of :data:`DRIFTS`
  (``exact``, ``tweedie``, ``trainingfree``, ``trainingfree-<variant>``, and whatever later
  modules add with :func:`register_drift`).

Particle methods run n independent populations of N particles (batched in chunks of at
most ``MAX_PARTICLES``) and return one sample per population, so the counters, divided by
n, charge each output sample with its whole population. SMC uses the ``ddpm`` sampler
(stochastic, so resampled copies diverge and the proposal density is known) with as many
steps as the benchmark's sampler makes model evaluations (Heun's 25 steps are 49 calls, so
49 ``ddpm`` steps): a particle's trajectory costs what one guided trajectory costs. With
the bench's step count instead, the first-order ``ddpm`` sampler's own error dominated, and
more particles converged to the tilt of that less accurate distribution. ``BenchSettings.smc_steps``
(``--smc-steps``) sets another count. The record's ``sampler`` and ``smc_steps`` fields say what ran.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

import torch
from torch import Tensor

from ..backends.gaussian_mixture import GaussianMixture
from ..core.model import CountingModel
from ..core.reward import CountingReward
from ..core.samplers import evals_per_sample
from ..errors import TiltgenError
from ..tilt import ExactGuidance, GuidanceEstimator, GuidedModel, TweedieGuidance
from ..tilt.bank import SampleBank
from ..tilt.particles import ParticleResult, best_of_n, smc_sample
from ..tilt.training_free import VARIANTS, TrainingFreeGuidance
from .analytic_bench import MethodContext, MethodOutput, MethodRunner, register_method, register_method_pattern

DEFAULT_VARIANT = "bounded"  # chosen by the analytic benchmark (docs/training-free-guidance.md)
MAX_PARTICLES = 1 << 16  # particles per batch: bounds memory for n = 4000, N = 64
SMC_SAMPLER = "ddpm"
BANK_SIZE = 4096  # unguided base samples in training-free guidance's sample bank
BANK_SEED = 2_000_003  # offset of the bank's seeds from the bench's (disjoint from every method's)

DriftFactory = Callable[[MethodContext], GuidanceEstimator]
DRIFTS: dict[str, DriftFactory] = {}


def register_drift(name: str) -> Callable[[DriftFactory], DriftFactory]:
    """Register a guidance estimator by benchmark name so particle methods can use it as a drift."""

    def decorate(factory: DriftFactory) -> DriftFactory:
        if name in DRIFTS:
            raise ValueError(f"drift {name!r} is already registered")
        DRIFTS[name] = factory
        return factory

    return decorate


def drift_estimator(name: str, ctx: MethodContext) -> GuidanceEstimator:
    if name not in DRIFTS:
        raise TiltgenError(f"unknown drift {name!r} for a particle method; choose one of: {', '.join(sorted(DRIFTS))}")
    return DRIFTS[name](ctx)


def data_covariance(mixture: GaussianMixture) -> Tensor:
    """The data's covariance [D, D] (between-mode spread included): what a user would estimate
    from unguided samples of a low-dimensional model. Training-free guidance's proxy prior."""
    mean = mixture.weights @ mixture.means
    second = torch.einsum("k,kij->ij", mixture.weights,
                          mixture.covs + torch.einsum("ki,kj->kij", mixture.means, mixture.means))
    return second - torch.outer(mean, mean)


def _training_free(ctx: MethodContext, variant: str) -> TrainingFreeGuidance:
    return TrainingFreeGuidance(ctx.reward, ctx.beta, ctx.family.schedule, data_cov=data_covariance(ctx.case.base),
                                variant=variant)


register_drift("exact")(lambda ctx: ExactGuidance(ctx.oracle))
register_drift("tweedie")(lambda ctx: TweedieGuidance(ctx.reward, ctx.beta))
register_drift("tweedie-damped")(lambda ctx: TweedieGuidance(ctx.reward, ctx.beta, damping=True,
                                                              schedule=ctx.family.schedule))
register_drift("trainingfree")(lambda ctx: _training_free(ctx, DEFAULT_VARIANT))
for _variant in VARIANTS:
    register_drift(f"trainingfree-{_variant}")(lambda ctx, v=_variant: _training_free(ctx, v))


def _guided_runner(drift: str) -> MethodRunner:
    def run(ctx: MethodContext) -> MethodOutput:
        guided = GuidedModel(ctx.model, ctx.family.schedule, drift_estimator(drift, ctx))
        return MethodOutput(ctx.run_sampler(guided))

    return run


def build_bank(ctx: MethodContext, size: int = BANK_SIZE) -> tuple[SampleBank, dict[str, Any]]:
    """``size`` unguided samples of the case's base model (the bench's sampler, seeds apart from
    the bench's) scored by its reward: the bank and its setup cost, counted apart from ctx's
    counters so the sampling columns stay per-sample costs."""
    model, reward = CountingModel(ctx.model.model), CountingReward(ctx.reward.reward)
    tick = time.perf_counter()
    seeds = range(ctx.settings.seed + BANK_SEED, ctx.settings.seed + BANK_SEED + size)
    x0 = ctx._sample(model, list(seeds))
    bank = SampleBank.from_samples(x0, reward)
    return bank, {"bank_size": size, "setup_model_evals": model.sample_evals, "setup_reward_evals": reward.evals,
                  "setup_wall_s": time.perf_counter() - tick}


def _bank_runner(variant: str) -> MethodRunner:
    def run(ctx: MethodContext) -> MethodOutput:
        bank, record = build_bank(ctx)
        estimator = TrainingFreeGuidance(ctx.reward, ctx.beta, ctx.family.schedule,
                                         data_cov=data_covariance(ctx.case.base), variant=variant, bank=bank)
        samples = ctx.run_sampler(GuidedModel(ctx.model, ctx.family.schedule, estimator))
        return MethodOutput(samples, record, setup_s=record["setup_wall_s"])

    return run


register_method("trainingfree", default=True)(_guided_runner("trainingfree"))
register_method("trainingfree-bank")(_bank_runner(DEFAULT_VARIANT))
for _variant in VARIANTS:
    register_method(f"trainingfree-bank-{_variant}")(_bank_runner(_variant))
# the damped plug-in of arXiv 2606.02884 (tilt/tweedie.py): the baseline training-free is held to
register_method("tweedie-damped", default=True)(_guided_runner("tweedie-damped"))
for _variant in VARIANTS:
    register_method(f"trainingfree-{_variant}")(_guided_runner(f"trainingfree-{_variant}"))


def _chunks(n: int, particles: int) -> list[tuple[int, int]]:
    """(first population, count) batches of at most MAX_PARTICLES particles."""
    per = max(1, MAX_PARTICLES // particles)
    return [(start, min(per, n - start)) for start in range(0, n, per)]


def particle_count(match: re.Match[str], group: int = 1) -> int:
    """N of a parameterised particle method's name (``group`` of the match), checked."""
    particles = int(match.group(group))
    if particles < 1:
        raise TiltgenError(f"the number of particles N must be >= 1, got {particles} in {match.group(0)!r}")
    return particles


def run_smc_chunks(ctx: MethodContext, particles: int, drift: GuidanceEstimator | None = None,
                   twist: Callable[[Tensor, Tensor, object], Tensor] | None = None,
                   handoff: bool = False) -> list[ParticleResult]:
    """SMC over the bench's n samples in chunks of populations, on the bench's seeds: the
    ParticleResult of each chunk (``drift``, ``twist``, ``handoff`` as in :func:`smc_sample`)."""
    s = ctx.settings
    return [smc_sample(ctx.model, ctx.family.schedule, ctx.reward, ctx.beta, n=count, particles=particles,
                       shape=(ctx.case.dim,), drift=drift, twist=twist, handoff=handoff, sampler=SMC_SAMPLER,
                       steps=smc_steps(ctx),
                       spacing=ctx.family.spacing, seed=s.seed + 7919 * start, dtype=torch.float64)
            for start, count in _chunks(s.n, particles)]


def smc_steps(ctx: MethodContext) -> int:
    """SMC's ``ddpm`` steps: the model evaluations of one trajectory of the bench's sampler,
    unless the settings name them (``smc_steps``)."""
    if ctx.settings.smc_steps is not None:
        return ctx.settings.smc_steps
    return evals_per_sample(ctx.settings.sampler, ctx.settings.steps)


def _parse(match: re.Match[str]) -> tuple[int, str | None]:
    particles = particle_count(match)
    drift = match.group(2)
    if drift is not None and drift not in DRIFTS:
        raise TiltgenError(f"unknown drift {drift!r} in {match.group(0)!r}; choose one of: {', '.join(sorted(DRIFTS))}")
    return particles, drift


@register_method("exact-ddpm")
def _exact_smc_sampler(ctx: MethodContext) -> MethodOutput:
    """The exact tilt sampled by SMC's sampler at SMC's steps: the closest any particle method
    (whose target is the tilt of that sampler's own base distribution) can get at this cost."""
    guided = GuidedModel(ctx.model, ctx.family.schedule, ExactGuidance(ctx.oracle))
    samples = ctx.run_sampler(guided, sampler=SMC_SAMPLER, steps=smc_steps(ctx))
    return MethodOutput(samples, {"sampler": SMC_SAMPLER, "smc_steps": smc_steps(ctx)}, retime=False)


@register_method_pattern(r"smc-(\d+)(?:\+(.+))?", example="smc-<N>[+<drift>]")
def _smc_factory(match: re.Match[str]) -> MethodRunner:
    particles, drift = _parse(match)

    def run(ctx: MethodContext) -> MethodOutput:
        estimator = None if drift is None else drift_estimator(drift, ctx)
        outs = run_smc_chunks(ctx, particles, estimator)
        return MethodOutput(torch.cat([o.samples for o in outs]), {
            "sampler": SMC_SAMPLER, "smc_steps": smc_steps(ctx), "particles": particles,
            "resamples_per_sample": sum(o.resamples for o in outs) / ctx.settings.n})

    return run


@register_method_pattern(r"bestofn-(\d+)(?:\+(.+))?", example="bestofn-<N>[+<drift>]")
def _bestofn_factory(match: re.Match[str]) -> MethodRunner:
    particles, drift = _parse(match)

    def run(ctx: MethodContext) -> MethodOutput:
        s = ctx.settings
        model = ctx.model if drift is None else GuidedModel(ctx.model, ctx.family.schedule, drift_estimator(drift, ctx))
        parts: list[Tensor] = []
        for start, count in _chunks(s.n, particles):
            out = best_of_n(model, ctx.family.schedule, ctx.reward, n=count, particles=particles,
                            shape=(ctx.case.dim,), sampler=s.sampler, steps=s.steps, spacing=ctx.family.spacing,
                            seed=s.seed + start * particles, dtype=torch.float64)
            parts.append(out.samples)
        return MethodOutput(torch.cat(parts), {"particles": particles})

    return run

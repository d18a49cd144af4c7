"""``tiltgen bench analytic``: cases x families x methods on exact tilted Gaussian mixtures.

Every method samples the same base model from the same per-sample seeds; its samples are
compared with exact samples of the tilted target. Methods are registered by name (exact
names, or regular-expression patterns such as ``bestofn-<N>``), so later estimators plug
in without touching the loop.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..backends.gaussian_mixture import MixtureTiltOracle, TiltedMixture
from ..core.model import CountingModel, Model
from ..core.reward import CountingReward
from ..core.samplers import sample
from ..errors import TiltgenError
from ..tilt import ExactGuidance, GuidedModel, TweedieGuidance
from .analytic_cases import CASES, FAMILIES, AnalyticCase, Family, get_case
from .metrics import energy_distance, energy_floor, mode_weight_error


@dataclass(frozen=True)
class BenchSettings:
    """Sizes of one benchmark run."""

    n: int = 4000
    steps: int = 100
    sampler: str = "heun"
    floor_pairs: int = 20
    seed: int = 0
    # wall_s is the fastest of this many interleaved timings of each method's sampling
    timing_repeats: int = 2
    # ddpm steps of the SMC rows; None: as many as the bench's sampler makes model evaluations
    # (a particle's trajectory then costs one guided trajectory)
    smc_steps: int | None = None
    # learned guidance, trained inside the bench: optimiser steps, samples, noised pool size.
    # A pool visited many times over is memorised, noise draws and all (docs/learned-guidance.md);
    # 4000 steps of batch 1024 visit the 2^20 pool about four times, and still beat 1500 steps on
    # every row rerun (the 32-D case had been under-trained: 12.6 -> 4.0 x the floor).
    # The base samples are many, so that the exp(r/beta) weights keep an effective sample size
    # of hundreds where the tilt is strong: the data, not the network, limited those cases
    train_steps: int = 4000
    train_data: int = 1 << 16
    train_pool: int = 1 << 20

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(n=1000, steps=25, train_steps=3000, train_data=1 << 16, train_pool=1 << 18, timing_repeats=1)

    def __post_init__(self) -> None:
        if self.n < 2:
            raise TiltgenError(f"n must be >= 2, got {self.n}")
        if self.steps < 1:
            raise TiltgenError(f"steps must be >= 1, got {self.steps}")
        if self.timing_repeats < 1:
            raise TiltgenError(f"timing_repeats must be >= 1, got {self.timing_repeats}")
        if self.smc_steps is not None and self.smc_steps < 1:
            raise TiltgenError(f"smc_steps must be >= 1, got {self.smc_steps}")
        for name in ("train_steps", "train_pool"):
            if getattr(self, name) < 1:
                raise TiltgenError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_data < 2:
            raise TiltgenError(f"train_data must be >= 2 (the weights are normalised over it), got {self.train_data}")


@dataclass
class MethodContext:
    """Everything a method needs: the counted base model and reward, the case and settings."""

    case: AnalyticCase
    family: Family
    tilted: TiltedMixture
    oracle: MixtureTiltOracle
    model: CountingModel
    reward: CountingReward
    settings: BenchSettings
    sampled: list[tuple[Model, dict[str, Any]]] = field(default_factory=list)  # run_sampler's calls, for re-timing

    @property
    def beta(self) -> float:
        return self.case.beta

    def run_sampler(self, model: Model, seeds: Sequence[int] | None = None, *, sampler: str | None = None,
                    steps: int | None = None) -> Tensor:
        """The benchmark's sampler (or ``sampler`` at ``steps``) on ``model`` from the shared per-sample seeds."""
        self.sampled.append((model, {"sampler": sampler, "steps": steps}))
        return self._sample(model, seeds, sampler=sampler, steps=steps)

    def _sample(self, model: Model, seeds: Sequence[int] | None = None, *, sampler: str | None = None,
                steps: int | None = None) -> Tensor:
        s = self.settings
        seeds = list(range(s.seed, s.seed + s.n)) if seeds is None else seeds
        return sample(model, self.family.schedule, shape=(self.case.dim,), seeds=seeds, steps=steps or s.steps,
                      sampler=sampler or s.sampler, spacing=self.family.spacing, dtype=torch.float64, progress=False)


@dataclass
class MethodOutput:
    """A method's samples [n, d], extra record fields (e.g. training compute) and the seconds
    of one-off setup (training) that ``wall_s`` excludes: wall_ratio compares sampling."""

    samples: Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    setup_s: float = 0.0
    retime: bool = True  # False: timed once (the exact oracle, whose cost is not a claim)


MethodRunner = Callable[[MethodContext], MethodOutput]
_METHODS: dict[str, MethodRunner] = {}
_DEFAULTS: list[str] = []  # methods run when none are named, in registration order
_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], MethodRunner], str]] = []


def register_method(name: str, default: bool = False) -> Callable[[MethodRunner], MethodRunner]:
    """Register a benchmark method under an exact name; ``default`` puts it in the default grid."""

    def decorate(runner: MethodRunner) -> MethodRunner:
        if name in _METHODS:
            raise ValueError(f"benchmark method {name!r} is already registered")
        _METHODS[name] = runner
        if default:
            _DEFAULTS.append(name)
        return runner

    return decorate


def register_method_pattern(pattern: str, example: str, defaults: Sequence[str] = ()) -> Callable:
    """Register a parameterised method family, e.g. ``r"bestofn-(\\d+)"``; the factory gets the match.

    ``example`` is shown in error messages; ``defaults`` are concrete names (e.g.
    ``["smc-16"]``) added to the default grid.
    """

    def decorate(factory: Callable[[re.Match[str]], MethodRunner]) -> Callable[[re.Match[str]], MethodRunner]:
        _PATTERNS.append((re.compile(pattern), factory, example))
        _DEFAULTS.extend(defaults)
        return factory

    return decorate


def available_methods() -> list[str]:
    return sorted(_METHODS) + [example for _, _, example in _PATTERNS]


def resolve_method(name: str) -> MethodRunner:
    if name in _METHODS:
        return _METHODS[name]
    for pattern, factory, _ in _PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return factory(match)
    raise TiltgenError(f"unknown method {name!r}; choose from: {', '.join(available_methods())}")


@register_method("unguided", default=True)
def _unguided(ctx: MethodContext) -> MethodOutput:
    return MethodOutput(ctx.run_sampler(ctx.model))


@register_method("exact", default=True)
def _exact(ctx: MethodContext) -> MethodOutput:
    guided = GuidedModel(ctx.model, ctx.family.schedule, ExactGuidance(ctx.oracle))
    return MethodOutput(ctx.run_sampler(guided), retime=False)


@register_method("tweedie", default=True)
def _tweedie(ctx: MethodContext) -> MethodOutput:
    guided = GuidedModel(ctx.model, ctx.family.schedule, TweedieGuidance(ctx.reward, ctx.beta))
    return MethodOutput(ctx.run_sampler(guided))


def default_methods() -> list[str]:
    """The methods run when none are named: every method registered with ``default=True``."""
    return list(_DEFAULTS)


@dataclass
class BenchResult:
    records: list[dict[str, Any]]
    samples: dict[tuple[str, str, str], Tensor]  # (case, family, method) -> samples, 2-D cases only


def _retime(runs: list[tuple[dict[str, Any], MethodContext]], repeats: int) -> None:
    """Re-time each method's sampling (training and other setup excluded) ``repeats - 1``
    more times, interleaved across methods so drifts in machine speed hit all alike, and keep
    the fastest in ``wall_s``. Methods with their own loops (particles) and those that ask
    not to be re-timed (``timing_repeats`` = 1 in their record) keep one timing."""
    for _ in range(repeats - 1):
        for record, ctx in runs:
            if record["timing_repeats"] > 1:
                start = time.perf_counter()
                model, overrides = ctx.sampled[0]
                ctx._sample(model, **overrides)
                record["wall_s"] = min(record["wall_s"], time.perf_counter() - start)
    base = next(r for r, _ in runs if r["method"] == "unguided")["wall_s"]
    for record, _ in runs:
        record["wall_ratio"] = record["wall_s"] / base


def _exact_sampler(tilted: TiltedMixture, seed: int) -> Callable[[int], Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return lambda n: tilted.tilted.sample(n, generator)


def run_analytic_bench(cases: Sequence[str] | None = None, families: Sequence[str] | None = None,
                       methods: Sequence[str] | None = None, settings: BenchSettings | None = None,
                       progress: bool = True) -> BenchResult:
    """Run the grid and return one record per (case, family, method)."""
    settings = settings or BenchSettings()
    case_list = [get_case(c) for c in (cases or list(CASES))]
    for f in families or ():
        if f not in FAMILIES:
            raise TiltgenError(f"unknown family {f!r}; choose one of: {', '.join(FAMILIES)}")
    family_list = [FAMILIES[f] for f in (families or list(FAMILIES))]
    method_names = list(methods or default_methods())
    runners = {m: resolve_method(m) for m in method_names}  # fail on a typo before any work
    if "unguided" not in method_names:  # the wall-time reference is always measured
        method_names.insert(0, "unguided")
        runners["unguided"] = _METHODS["unguided"]
    else:
        method_names.remove("unguided")
        method_names.insert(0, "unguided")

    records: list[dict[str, Any]] = []
    samples: dict[tuple[str, str, str], Tensor] = {}
    total = len(case_list) * len(family_list) * len(method_names)
    bar = tqdm(total=total, desc="bench analytic", disable=not progress)
    for case in case_list:
        tilted = case.tilt()
        draw = _exact_sampler(tilted, settings.seed + 10_000)
        floor = energy_floor(draw, settings.n, pairs=settings.floor_pairs)
        reference = draw(settings.n)
        reward_exact = tilted.tilted.expected_reward(case.reward)
        nll_exact = float(-tilted.tilted.log_prob(reference).mean())
        for family in family_list:
            oracle = tilted.oracle(family.schedule)
            runs: list[tuple[dict[str, Any], MethodContext]] = []
            for method in method_names:
                bar.set_postfix_str(f"{case.name} {family.name} {method}")
                ctx = MethodContext(case, family, tilted, oracle,
                                    CountingModel(case.base.model(family.schedule, family.prediction)),
                                    CountingReward(case.reward), settings)
                start = time.perf_counter()
                out = runners[method](ctx)
                wall = time.perf_counter() - start - out.setup_s
                x = out.samples.detach().to(torch.float64)
                if x.shape != (settings.n, case.dim):
                    raise TiltgenError(f"method {method!r} returned samples of shape {tuple(x.shape)}, "
                                       f"expected {(settings.n, case.dim)}")
                records.append({
                    "case": case.name, "beta": case.beta, "dim": case.dim, "family": family.name,
                    "method": method, "sampler": settings.sampler, "steps": settings.steps, "n": settings.n,
                    "energy_distance": energy_distance(x, reference), "energy_floor": floor,
                    "reward_mean": float(case.reward(x).mean()), "reward_exact": reward_exact,
                    "nll": float(-tilted.tilted.log_prob(x).mean()), "nll_exact": nll_exact,
                    "mode_weight_error": mode_weight_error(tilted.tilted.responsibilities(x), tilted.tilted.weights),
                    "model_evals": ctx.model.sample_evals / settings.n,
                    "reward_evals": ctx.reward.evals / settings.n,
                    "reward_grad_evals": ctx.reward.grad_evals / settings.n,
                    "wall_s": wall, "timing_repeats": settings.timing_repeats if len(ctx.sampled) == 1 and out.retime else 1,
                    **out.extra,
                })
                runs.append((records[-1], ctx))
                if case.dim == 2:
                    samples[(case.name, family.name, method)] = x
                bar.update()
            _retime(runs, settings.timing_repeats)
    bar.close()
    return BenchResult(records, samples)


COLUMNS = [("case", "{}"), ("family", "{}"), ("method", "{}"), ("energy_distance", "{:.4f}"),
           ("energy_floor", "{:.4f}"), ("reward_mean", "{:.3f}"), ("reward_exact", "{:.3f}"), ("nll", "{:.3f}"),
           ("mode_weight_error", "{:.3f}"), ("model_evals", "{:g}"), ("reward_evals", "{:g}"),
           ("reward_grad_evals", "{:g}"), ("wall_ratio", "{:.2f}")]
HEADERS = {"energy_distance": "energy_dist", "energy_floor": "floor", "reward_mean": "reward",
           "reward_exact": "reward*", "mode_weight_error": "mode_err", "model_evals": "model_ev",
           "reward_evals": "reward_ev", "reward_grad_evals": "grad_ev", "wall_ratio": "wall_x"}


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of the records (reward* is the exact tilted mean reward)."""
    rows = [[HEADERS.get(key, key) for key, _ in COLUMNS]]
    rows += [[fmt.format(r[key]) for key, fmt in COLUMNS] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)



def format_markdown(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the records with the ratios the docs quote.

    ED/floor: energy distance over the exact-vs-exact floor; ED/unguided: the fraction of
    the unguided sampler's distance left; reward gap: |reward - reward*| over
    |reward* - unguided reward|; train / setup: model evals / reward evals / seconds of training
    (learned guidance) or of the one-off setup (training-free guidance's sample bank).
    """
    unguided = {(r["case"], r["family"]): r for r in records if r["method"] == "unguided"}
    lines = ["| case | family | method | energy dist. | ED/floor | ED/unguided | reward (exact) | reward gap | "
             "mode err. | model / reward / grad evals | wall ratio | train / setup |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        u = unguided.get((r["case"], r["family"]))
        ed_u = f"{r['energy_distance'] / u['energy_distance']:.4f}" if u else "—"
        gap = f"{abs(r['reward_mean'] - r['reward_exact']) / abs(r['reward_exact'] - u['reward_mean']):.1%}" if u else "—"
        train = next((f"{r[k + '_model_evals']:,} / {r[k + '_reward_evals']:,} / {r[k + '_wall_s']:.1f} s"
                      for k in ("train", "setup") if k + "_wall_s" in r), "—")
        lines.append(f"| {r['case']} | {r['family']} | {r['method']} | {r['energy_distance']:.4f} | "
                     f"{r['energy_distance'] / r['energy_floor']:.2f} | {ed_u} | {r['reward_mean']:.3f} "
                     f"({r['reward_exact']:.3f}) | {gap} | {r['mode_weight_error']:.3f} | {r['model_evals']:g} / "
                     f"{r['reward_evals']:g} / {r['reward_grad_evals']:g} | {r['wall_ratio']:.2f} | {train} |")
    return "\n".join(lines)

# Methods of later layers register themselves on import; imported last to avoid a cycle.
from . import methods_learned, methods_trainingfree  # noqa: E402,F401

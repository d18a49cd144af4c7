"""``tiltgen demo``: reward-tilted sampling of the built-in text-to-image models, measured.

Every row is a (model, method): the SD-like diffusion model, its one-step distillation and the
SD3-like flow, sampled unguided, with Tweedie (plug-in) guidance, learned guidance, training-free
guidance and best-of-N at matched compute. Each prompt is sampled ``n`` times with the same
seeds in every row, so a column of the grid shows what a method did to one seed. Per (model,
prompt, method) it reports the target reward (the learned proxy preference), the held-out gold
preference it stands in for (reward hacking shows there), prompt fidelity, the binary check,
diversity, network evaluations and the wall time relative to the same model's unguided row.

Wall ratios come from interleaved repeats (every row of a model once, then again, ...) and the
fastest repeat of each row; a ratio below 1 for a method that does strictly more work than
unguided sampling, or one whose repeats disagree by more than 30 %, is flagged as unreliable.
When the prompts split into as many equal blocks as there are repeats, each repeat samples one
block (the same work: as many images, steps and calls), so the repeats cost one pass over the
prompts instead of several; a block's wall times the number of blocks is the row's wall.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.model import CountingModel
from ..errors import TiltgenError
from ..tilt.base import GuidedModel
from .estimators import build_banks, build_estimator, default_data_var, default_variant
from .particle_images import best_candidates, candidate_seed

TARGET_REWARD = "world-proxy"
GOLD_REWARD = "world-gold"
BINARY_REWARD = "world-binary"
DEFAULT_BETA = 0.05
MODELS = {"diffusion": "builtin:world-diffusion", "onestep": "builtin:world-onestep", "flow": "builtin:world-flow"}
#: Every row the demo can run, per model.
METHODS: dict[str, tuple[str, ...]] = {
    "diffusion": ("unguided", "tweedie", "learned", "learned-binary", "twisted-binary", "smc-binary", "bestofn"),
    "onestep": ("unguided", "tweedie", "learned", "bestofn"),
    "flow": ("unguided", "trainingfree", "trainingfree-bank", "tweedie", "bestofn"),
}
GUIDANCE = {("diffusion", "learned"): "builtin:guidance-diffusion-proxy",
            ("onestep", "learned"): "builtin:guidance-onestep-proxy",
            ("diffusion", "learned-binary"): "builtin:guidance-diffusion-binary",
            ("diffusion", "twisted-binary"): "builtin:guidance-diffusion-binary"}
#: Rows that run SMC (``settings.particles`` per image). Twisted: the learned network is the twist
#: and its drift the proposal; plain: the base model proposes, the twist is r(x0_hat) / beta.
PARTICLE_ROWS = {"twisted-binary": "twisted", "smc-binary": "plain"}
DEFAULT_ROWS = ("diffusion:unguided", "diffusion:tweedie", "diffusion:learned", "diffusion:bestofn",
                "onestep:unguided", "onestep:learned", "onestep:bestofn",
                "flow:unguided", "flow:trainingfree", "flow:trainingfree-bank", "flow:tweedie", "flow:bestofn")
UNRELIABLE_SPREAD = 1.3


@dataclass
class DemoSettings:
    prompts: Sequence[str]
    prompt_set: str = "demo"
    n: int = 6
    beta: float = DEFAULT_BETA
    seed: int = 0
    rows: Sequence[tuple[str, str]] = ()
    timing_repeats: int = 2
    best_of: int | None = None  # None: matched to the costliest guided row of the same model
    particles: int = 4  # particles per image of the twisted-SMC rows
    bank: int = 32  # unguided samples per prompt in the trainingfree-bank row's sample bank
    guidance: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, method) -> network, over GUIDANCE


def guidance_for(settings: DemoSettings, name: str, method: str) -> str | None:
    """The guidance network of a (model, method) row: the settings' own, else the shipped one."""
    return settings.guidance.get((name, method), GUIDANCE.get((name, method)))


def parse_guidance(items: Sequence[str] | None) -> dict[tuple[str, str], str]:
    """``MODEL:METHOD=FOLDER`` items -> {(model, method): folder}, for rows that use a network."""
    out: dict[tuple[str, str], str] = {}
    for item in items or ():
        row, sep, folder = item.partition("=")
        if not sep or not folder.strip():
            raise TiltgenError(f"--guidance wants MODEL:METHOD=FOLDER, got {item!r}")
        (model, method), = parse_rows(row)
        if (model, method) not in GUIDANCE:
            choices = ", ".join(f"{m}:{k}" for m, k in GUIDANCE)
            raise TiltgenError(f"demo row {row.strip()!r} uses no guidance network; rows that do: {choices}")
        out[(model, method)] = folder.strip()
    return out


@dataclass
class RowResult:
    model: str
    method: str
    images: Tensor                  # [P * n, 3, H, W], prompt-major
    walls: list[float]
    model_evals: float              # network evaluations per image (CFG counts 2)
    backward: bool                  # back-propagates through the generator
    beta: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_rows(text: str | Sequence[str] | None) -> list[tuple[str, str]]:
    """``model:method,...`` -> rows (None: the default rows)."""
    items = list(DEFAULT_ROWS) if not text else \
        [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    rows = []
    for item in items:
        model, _, method = item.partition(":")
        model = model.removeprefix("world-")
        if method not in METHODS.get(model, ()):
            choices = ", ".join(f"{m}:{k}" for m, ks in METHODS.items() for k in ks)
            raise TiltgenError(f"unknown demo row {item!r}; choose from: {choices}")
        rows.append((model, method))
    return rows


# --------------------------------------------------------------------------------------------
# Sampling one row
# --------------------------------------------------------------------------------------------

def _seeds(settings: DemoSettings, prompts: Sequence[str]) -> list[int]:
    # the same n seeds for every prompt, so column j of the grid is one seed under every method
    return [settings.seed + i % settings.n for i in range(len(prompts) * settings.n)]


def prompt_blocks(settings: DemoSettings) -> list[list[str]]:
    """The prompts as ``timing_repeats`` equal consecutive blocks, one per timed repeat, or one
    block (every prompt, sampled ``timing_repeats`` times) when they do not split evenly."""
    prompts, repeats = list(settings.prompts), settings.timing_repeats
    if repeats > 1 and len(prompts) % repeats == 0:
        size = len(prompts) // repeats
        return [prompts[i * size:(i + 1) * size] for i in range(repeats)]
    return [prompts]


Runner = Callable[[Sequence[str]], Tensor]  # samples one block of prompts, n images each, prompt-major


def _encode_blocks(model: Any, settings: DemoSettings, copies: int = 1) -> dict[tuple[str, ...], Any]:
    """Each prompt block's condition (every prompt n * ``copies`` times), encoded before timing."""
    return {tuple(block): model.encode([p for p in block for _ in range(settings.n * copies)])
            for block in prompt_blocks(settings)}


def _guided_runner(model: Any, method: str, name: str, settings: DemoSettings, reward: Any
                   ) -> tuple[Runner, CountingModel, float | None, float | None]:
    learned = method.startswith("learned")  # a learned network tilts at the beta it was trained for
    estimator, beta = build_estimator(model, "learned" if learned else method, reward,
                                      None if learned else settings.beta, guidance=guidance_for(settings, name, method))
    counter = CountingModel(model)
    wrapped = counter if estimator is None else GuidedModel(counter, model.schedule, estimator)
    steps = model.backend.default_steps

    conds = _encode_blocks(model, settings)

    def run(block: Sequence[str]) -> Tensor:
        counter.calls = counter.sample_evals = 0
        return model.sample(conds[tuple(block)], seeds=_seeds(settings, block), steps=steps, model=wrapped).images

    return run, counter, beta, getattr(estimator, "scale", None)


def _bank_runner(model: Any, method: str, name: str, settings: DemoSettings, reward: Any
                 ) -> tuple[Runner, CountingModel, float | None, float | None]:
    """Training-free guidance over a sample bank of ``settings.bank`` unguided images per prompt,
    drawn inside the timed run and through the row's counter: the row pays for its bank."""
    counter = CountingModel(model)
    steps = model.backend.default_steps

    conds = _encode_blocks(model, settings)

    def run(block: Sequence[str]) -> Tensor:
        counter.calls = counter.sample_evals = 0
        banks = build_banks(model, reward, [(p, None, settings.seed) for p in block], settings.bank,
                            steps=steps, batch_size=max(settings.n, 8), sampling_model=counter)
        estimator, _ = build_estimator(model, "trainingfree", reward, settings.beta, bank=banks)
        return model.sample(conds[tuple(block)], seeds=_seeds(settings, block), steps=steps,
                            model=GuidedModel(counter, model.schedule, estimator)).images

    return run, counter, settings.beta, 1.0


def _smc_runner(model: Any, method: str, name: str, settings: DemoSettings, reward: Any
                ) -> tuple[Runner, CountingModel, float | None, float | None]:
    """SMC with one population of ``settings.particles`` per image; the reward weighs the last
    step. Twisted rows: the learned network's log h_t twists and its guided drift proposes, at
    the network's beta. Plain rows: the base model proposes, r(x0_hat) / beta twists."""
    from ..tilt.particles import smc_sample

    estimator, beta = None, settings.beta
    twin = guidance_for(settings, name, method.replace("smc-", "twisted-"))
    if PARTICLE_ROWS[method] == "twisted":
        estimator, beta = build_estimator(model, "learned", None, None, guidance=guidance_for(settings, name, method))
    elif twin is not None:
        # the plain row aims at its twisted twin's target: the beta that network was trained at
        from ..builtin import resolve_weights
        from ..tilt.learned.pretrained import read_guidance_record

        beta = float(read_guidance_record(resolve_weights(twin, "guidance network"))["beta"])
    counter = CountingModel(model)
    latent_reward = model.latent_reward(reward)

    def run(block: Sequence[str]) -> Tensor:
        prompts = [p for p in block for _ in range(settings.n)]
        # one generator per population batch: a block's seed follows from its first prompt's index
        seed = settings.seed + list(settings.prompts).index(block[0])
        counter.calls = counter.sample_evals = 0
        result = smc_sample(counter, model.schedule, latent_reward, beta, n=len(prompts), particles=settings.particles,
                            shape=model.latent_shape, cond=prompts, steps=model.backend.default_steps,
                            seed=seed, drift=estimator,
                            twist=None if estimator is None else estimator.log_twist)
        return model.decode(result.samples)

    return run, counter, beta, None if estimator is None else estimator.scale


def _best_of_runner(model: Any, settings: DemoSettings, reward: Any, best_of: int
                    ) -> tuple[Runner, CountingModel]:
    counter = CountingModel(model)
    steps = model.backend.default_steps

    conds = _encode_blocks(model, settings, best_of)

    def run(block: Sequence[str]) -> Tensor:
        prompts = [p for p in block for _ in range(settings.n)]
        cond = conds[tuple(block)]
        seeds = [candidate_seed(s, k) for s in _seeds(settings, block) for k in range(best_of)]
        counter.calls = counter.sample_evals = 0
        images = model.sample(cond, seeds=seeds, steps=steps, model=counter).images
        pick = best_candidates(reward, images, cond, best_of) + torch.arange(len(prompts)) * best_of
        return images[pick]

    return run, counter


def _time_rows(runners: dict[str, Runner], settings: DemoSettings
               ) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """Every row on every prompt block, interleaved (every row once per repeat): each row's images
    of all prompts (prompt-major) and its wall per repeat, scaled to all prompts."""
    blocks = prompt_blocks(settings)
    runs = blocks if len(blocks) > 1 else blocks * settings.timing_repeats
    images: dict[str, list[Tensor]] = {k: [] for k in runners}
    walls: dict[str, list[float]] = {k: [] for k in runners}
    for i, block in enumerate(runs):
        for key, run in runners.items():
            start = time.perf_counter()
            out = run(block)
            walls[key].append((time.perf_counter() - start) * len(blocks))
            if i < len(blocks):
                images[key].append(out)
    return {k: torch.cat(v) for k, v in images.items()}, walls


def run_model_rows(name: str, methods: Sequence[str], settings: DemoSettings, rewards: dict[str, Any],
                   progress: Any = None) -> list[RowResult]:
    """All rows of one model (``methods`` starts with "unguided"), timed against its unguided row."""
    from ..backends.diffusers import DiffusersBackend

    model = DiffusersBackend.from_pretrained(MODELS[name]).at()
    model.backend.check_prompts(settings.prompts)
    prompts = [p for p in settings.prompts for _ in range(settings.n)]
    warm = prompts[:2]
    model.sample(model.encode(warm), seeds=list(range(len(warm))), steps=1)  # first-call initialisation, untimed
    runners: dict[str, Runner] = {}
    meta: dict[str, tuple[CountingModel, float | None, float | None]] = {}
    for method in ["unguided"] + [m for m in methods if m not in ("unguided", "bestofn")]:
        reward = rewards["binary" if method.endswith("-binary") else "target"]
        make = _smc_runner if method in PARTICLE_ROWS else _bank_runner if method == "trainingfree-bank" \
            else _guided_runner
        run, counter, beta, scale = make(model, method, name, settings, reward)
        runners[method], meta[method] = run, (counter, beta, scale)
    images, walls = _time_rows(runners, settings)
    if progress is not None:
        progress.update(len(runners))
    evals_per_call = model.evals_per_call(model.encode(prompts[:1]))
    block_images = len(prompt_blocks(settings)[-1]) * settings.n  # the counters hold the last block's calls
    results = {m: RowResult(name, m, images[m], walls[m], meta[m][0].sample_evals / block_images * evals_per_call,
                            m == "tweedie", None if m == "unguided" else meta[m][1]) for m in runners}
    for m in results:
        if m.startswith("learned") or PARTICLE_ROWS.get(m) == "twisted":  # the network's calibrated scale, or 1
            results[m].extra["scale"] = meta[m][2]
        if m in PARTICLE_ROWS:
            results[m].extra.update(particles=settings.particles, smc=PARTICLE_ROWS[m])
        if (name, m) in GUIDANCE:
            results[m].extra["guidance"] = guidance_for(settings, name, m)
    for m in ("trainingfree", "trainingfree-bank"):
        if m in results:
            results[m].extra.update(variant=default_variant(model), data_var=default_data_var(model))
    if "trainingfree-bank" in results:
        results["trainingfree-bank"].extra["bank"] = settings.bank
    if "bestofn" in methods:
        base = min(walls["unguided"])
        best_of = settings.best_of or max(2, round(max([min(w) / base for m, w in walls.items() if m != "unguided"],
                                                       default=2.0)))
        run, counter = _best_of_runner(model, settings, rewards["target"], best_of)
        more_images, more_walls = _time_rows({"bestofn": run, "unguided": runners["unguided"]}, settings)
        results["unguided"].walls += more_walls["unguided"]
        results["bestofn"] = RowResult(name, "bestofn", more_images["bestofn"], more_walls["bestofn"],
                                       counter.sample_evals / block_images * evals_per_call, False, None,
                                       {"best_of": best_of})
        if progress is not None:
            progress.update(1)
    return [results[m] for m in methods]


def run_demo(settings: DemoSettings, progress: bool = True) -> list[RowResult]:
    """Every row of ``settings``, model by model; each model's unguided row is always sampled
    (the reference of gains and wall ratios) and listed first."""
    from ..rewards import get_reward

    if settings.n < 1:
        raise TiltgenError(f"n must be >= 1, got {settings.n}")
    if not settings.prompts:
        raise TiltgenError("the demo needs at least one prompt")
    if settings.timing_repeats < 1:
        raise TiltgenError(f"timing repeats must be >= 1, got {settings.timing_repeats}")
    if settings.particles < 1:
        raise TiltgenError(f"particles must be >= 1, got {settings.particles}")
    if settings.bank < 2:
        raise TiltgenError(f"the sample bank needs at least 2 images per prompt, got {settings.bank}")
    rows = list(settings.rows) or parse_rows(None)
    from ..world import parse_caption

    for p in settings.prompts:
        parse_caption(p)
    from ..builtin import resolve_weights
    from ..tilt.learned.pretrained import read_guidance_record

    for folder in settings.guidance.values():  # before any row runs: a typo should not cost the rows before it
        read_guidance_record(resolve_weights(folder, "guidance network"))
    rewards = {"target": get_reward(TARGET_REWARD), "binary": get_reward(BINARY_REWARD)}
    models = list(dict.fromkeys(m for m, _ in rows))
    bar = tqdm(total=sum(1 + sum(k != "unguided" for mm, k in rows if mm == m) for m in models), desc="demo",
               disable=not progress, dynamic_ncols=True)
    results: list[RowResult] = []
    for name in models:
        bar.set_postfix_str(name)
        methods = list(dict.fromkeys(k for m, k in rows if m == name))
        results += run_model_rows(name, ["unguided"] + [k for k in methods if k != "unguided"], settings, rewards, bar)
    bar.close()
    return results


def wall_ratio(row: RowResult, base: RowResult) -> tuple[float, str | None]:
    """min(row walls) / min(unguided walls), and why it is unreliable (or None)."""
    ratio = min(row.walls) / min(base.walls)
    if row.method == "unguided":
        return 1.0, None
    spread = max(max(w) / min(w) for w in (row.walls, base.walls))
    if ratio < 1.0:
        return ratio, "below 1 for a method that does more work than unguided sampling: timing noise"
    if spread > UNRELIABLE_SPREAD:
        return ratio, f"repeats differ by {100 * (spread - 1):.0f}%: the machine was busy"
    return ratio, None

"""``tiltgen bench world``: guidance against fine-tuning on the built-in world, at equal target.

Every row samples the held-out evaluation prompts ``n`` times and reports the proxy (the
optimised reward), the gold preference (held out: reward hacking shows there), fidelity,
binary success, diversity, the fraction of the exact gain and the attribute TV to p*, and the
compute of every stage: data (base samples and rewards), training, and sampling per image.

Stages are cached by a hash of their content (settings, model fingerprints, code version) in
``work``: a killed run reruns only what it had not finished (fine-tuning resumes inside its own
stage). Trained methods run with several training seeds; intervals are percentile bootstraps
over images (within prompts) and seeds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.compute import measure
from ..core.files import atomic_write, write_json
from ..errors import TiltgenError
from .oracle import attribute_tv, fraction_of_exact_gain, tilted_statistics, weighted_histograms
from .particle_images import best_candidates, candidate_seed
from .world_demo import BINARY_REWARD, DEFAULT_BETA, GOLD_REWARD, GUIDANCE, MODELS, TARGET_REWARD
from .world_report import diversity

STAGE_VERSION = 1
#: sampling-time rows per model (best-of-N and SMC at each particle count are added)
SAMPLING_ROWS = {"diffusion": ("unguided", "tweedie", "learned"), "onestep": ("unguided", "tweedie", "learned"),
                 "flow": ("unguided", "trainingfree", "trainingfree-bank", "tweedie")}
#: plug-in SMC at each particle count
SMC_MODELS = ("diffusion", "flow")
#: twisted SMC (the shipped learned network as twist and drift) at each particle count
TWISTED_SMC_MODELS = ("diffusion",)
#: its rows: the network's twist to the end, and handed over to the plug-in near the data
TWISTED_METHODS = ("twisted-smc", "twisted-handoff-smc")
#: fine-tuning baselines: (method, base model)
#: the second headline counts only fine-tuned rows whose fidelity fell by at most this much
FIDELITY_KEPT = 0.05
FINETUNE_ROWS = (("rwdsm", "diffusion"), ("dpo", "diffusion"), ("draft", "diffusion"), ("draft", "onestep"))


@dataclass
class BenchSettings:
    prompts: tuple[str, ...] = ("", "a red shape", "a shape on a white background", "two shapes")
    n: int = 32                                   # evaluation images per prompt and row
    beta: float = DEFAULT_BETA
    seeds: int = 3                                # training seeds of every fine-tuning method
    oracle_n: dict[str, int] = field(default_factory=lambda: {"diffusion": 1024, "onestep": 4096, "flow": 1024})
    particles: tuple[int, ...] = (2, 4)
    train_prompts: int = 32
    samples_per_prompt: int = 16
    finetune_steps: int = 400
    budgets: tuple[int, ...] = (50, 100, 200, 400)
    finetune_batch: int = 16
    finetune_lr: float = 1e-4
    draft_steps: int = 10                         # sampler steps of draft on the diffusion model
    images_for_total: int = 10_000                # sampling cost counted in a method's total
    bootstrap: int = 1000
    rows: tuple[str, ...] = ()                    # "model:method" rows to run (empty: every row)
    bank: int = 32                                # unguided images per prompt in trainingfree-bank's bank

    def __post_init__(self) -> None:
        if not self.particles or min(self.particles) < 2:
            raise TiltgenError(f"particle counts must be >= 2 (best-of-N and SMC rows), got {self.particles}")
        if self.seeds < 1 or self.n < 1:
            raise TiltgenError(f"seeds and n must be >= 1, got seeds={self.seeds}, n={self.n}")
        if self.bank < 2:
            raise TiltgenError(f"a sample bank needs at least 2 images per prompt, got bank={self.bank}")
        known = row_names()
        unknown = [row for row in self.rows if row not in known]
        if unknown:
            raise TiltgenError(f"unknown bench world row(s) {', '.join(map(repr, unknown))}; choose from: "
                               f"{', '.join(known)}")

    def wants(self, model: str, method: str) -> bool:
        """Whether the row ``model:method`` runs (a model's unguided row runs whenever any of its
        rows does: every gain is measured against it)."""
        if not self.rows:
            return True
        if method == "unguided":
            return any(row.split(":")[0] == model for row in self.rows)
        return f"{model}:{method}" in self.rows

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sampling_rows(particles: Sequence[int]) -> list[tuple[str, str, int]]:
    """Every sampling-time row, as (model, method, particles), in table order (best-of-N and
    SMC at each of ``particles``)."""
    rows = [(name, m, 1) for name, methods in SAMPLING_ROWS.items() for m in methods]
    rows += [(name, "bestofn", k) for name in MODELS for k in particles]
    rows += [(name, "smc", k) for name in SMC_MODELS for k in particles]
    return rows + [(name, m, k) for m in TWISTED_METHODS for name in TWISTED_SMC_MODELS for k in particles]


def row_names() -> list[str]:
    """Every row the bench knows, as ``model:method`` (one name for all particle counts)."""
    names = [f"{name}:{m}" for name, m, _ in _sampling_rows((2,))]
    return names + [f"{name}:finetune-{method}" for method, name in FINETUNE_ROWS]


def sampling_plan(settings: BenchSettings) -> list[tuple[str, str, int]]:
    """The sampling-time rows to run, as (model, method, particles), in table order."""
    return [(name, m, k) for name, m, k in _sampling_rows(settings.particles) if settings.wants(name, m)]


def finetune_plan(settings: BenchSettings) -> list[tuple[str, str]]:
    """The fine-tuning rows to run, as (method, base model)."""
    return [(m, name) for m, name in FINETUNE_ROWS if settings.wants(name, f"finetune-{m}")]


def planned_models(settings: BenchSettings) -> list[str]:
    """The models with at least one row to run (their oracles are needed)."""
    used = {name for name, _, _ in sampling_plan(settings)} | {name for _, name in finetune_plan(settings)}
    return [name for name in MODELS if name in used]


def quick_settings() -> BenchSettings:
    """The --quick grid: one seed, small pools and budgets (about 15 minutes on 2 CPU cores)."""
    return BenchSettings(n=8, seeds=1, oracle_n={"diffusion": 64, "onestep": 512, "flow": 64}, particles=(2,),
                         train_prompts=8, samples_per_prompt=8, finetune_steps=40, budgets=(20, 40), draft_steps=4,
                         bootstrap=200)


# --------------------------------------------------------------------------------------------
# Stage cache
# --------------------------------------------------------------------------------------------

class StageCache:
    """JSON results of stages, named by a hash of their key; written atomically."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.used: dict[str, tuple[str, dict[str, Any]]] = {}  # stage file -> (kind, result), this run's stages

    def path(self, kind: str, key: dict[str, Any]) -> Path:
        text = json.dumps({"kind": kind, "version": STAGE_VERSION, **key}, sort_keys=True, default=str)
        return self.root / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def get(self, kind: str, key: dict[str, Any], compute: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        base = self.path(kind, key)
        done = base.with_suffix(".json")
        if done.is_file():
            result = json.loads(done.read_text())
        else:
            start = time.perf_counter()
            result = compute(base)
            result["stage_wall_s"] = time.perf_counter() - start
            write_json(done, result, indent=None)
        self.used[base.name] = (kind, result)
        return result

    def fresh_run_wall(self, settings: BenchSettings) -> dict[str, Any]:
        """What the stages this run used cost when they were computed, summed per kind: the wall
        time of a run that finds the cache empty, on one process, without scoring the images.
        Stages cached before their wall was recorded whole fall back on the times they record
        (oracle pool, data + training of a fine-tuning run or guidance network, sampling)."""
        by_kind: dict[str, float] = {}
        unknown: list[str] = []
        partial = 0
        for name, (kind, result) in sorted(self.used.items()):
            wall = result.get("stage_wall_s")
            if wall is None:
                wall = _recorded_stage_wall(kind, result, settings)
                partial += wall is not None
            if wall is None:
                unknown.append(name)
                continue
            by_kind[kind] = by_kind.get(kind, 0.0) + float(wall)
        return {"total_s": sum(by_kind.values()), "by_kind_s": by_kind, "stages": len(self.used),
                "stages_without_wall": unknown, "stages_with_partial_wall": partial}


def _recorded_stage_wall(kind: str, result: dict[str, Any], settings: BenchSettings) -> float | None:
    """The wall time a stage's own record gives (for stages cached before ``stage_wall_s``)."""
    if kind == "oracle":
        return result.get("wall_s")
    if kind == "sample":
        return result["sampling_wall_per_image"] * settings.n * len(settings.prompts)
    if kind == "finetune":
        compute = result["record"].get("compute", {})
        parts = [compute.get("data", {}).get("wall_s"), compute.get("train", {}).get("wall_s")]
        return None if None in parts else sum(parts)
    if kind == "guidance":
        path = Path(result["folder"]) / "guidance.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        parts = [record.get("data", {}).get("wall_s"), record.get("train_wall_s")]
        if None in parts:
            return None
        return sum(parts) + float((record.get("calibration") or {}).get("wall_s") or 0.0)
    return None


# --------------------------------------------------------------------------------------------
# Evaluating images
# --------------------------------------------------------------------------------------------

class Judges:
    """The world's rewards and attribute reader, loaded once."""

    def __init__(self) -> None:
        from ..rewards import get_reward
        from ..world.rewards import AttributeReader

        self.proxy, self.gold, self.binary = get_reward(TARGET_REWARD), get_reward(GOLD_REWARD), get_reward(BINARY_REWARD)
        self.reader = AttributeReader()

    def per_image(self, images: Tensor, prompt: str) -> dict[str, Any]:
        """Per-image proxy, gold, binary, fidelity (None where the prompt specifies nothing), readings."""
        from ..world.fidelity import attribute_hits

        with torch.no_grad():
            readings = self.reader.read(images)
            hits = attribute_hits(readings, [prompt] * len(images))
            return {"proxy": self.proxy(images, prompt).double(), "gold": self.gold(images, prompt).double(),
                    "binary": self.binary(images, prompt).double(),
                    "fidelity": [sum(h.values()) / len(h) if h else None for h in hits], "readings": readings}


def prompt_record(judges: Judges, images: Tensor, prompt: str) -> dict[str, Any]:
    values = judges.per_image(images, prompt)
    return {"prompt": prompt, "proxy": values["proxy"].tolist(), "gold": values["gold"].tolist(),
            "binary": values["binary"].tolist(), "fidelity": values["fidelity"], "diversity": diversity(images),
            "histograms": weighted_histograms(values["readings"])}


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _load(model: str) -> Any:
    """The latent model of a pipeline folder, loaded once per run (stages ask for it again to key
    their cache by its fingerprint, even when their result is already there)."""
    from ..backends.diffusers import DiffusersBackend

    return DiffusersBackend.from_pretrained(model).at()


def _seeds(n: int, offset: int = 0) -> list[int]:
    return [offset + i for i in range(n)]


def oracle_stage(cache: StageCache, judges: Judges, name: str, settings: BenchSettings, progress: bool
                 ) -> dict[str, Any]:
    """p*'s statistics per prompt from ``oracle_n`` base samples of the model ``name``."""
    model = _load(MODELS[name])
    n = settings.oracle_n[name]
    key = {"model": model.fingerprint(), "n": n, "beta": settings.beta, "prompts": list(settings.prompts)}

    def compute(_: Path) -> dict[str, Any]:
        out = {}
        bar = tqdm(total=n * len(settings.prompts), desc=f"oracle {name}", disable=not progress, leave=False)
        start = time.perf_counter()
        for prompt in settings.prompts:
            rows = []
            for lo in range(0, n, 256):
                seeds = _seeds(min(256, n - lo), 10_000_000 + lo)
                images = model.sample(model.encode([prompt] * len(seeds)), seeds=seeds,
                                      steps=model.backend.default_steps).images
                values = judges.per_image(images, prompt)
                rows.append(values)
                bar.update(len(seeds))
            proxy = torch.cat([r["proxy"] for r in rows])
            stats = {"gold": torch.cat([r["gold"] for r in rows]), "binary": torch.cat([r["binary"] for r in rows]),
                     "proxy": proxy}
            fid = [f for r in rows for f in r["fidelity"]]
            if all(f is not None for f in fid):
                stats["fidelity"] = torch.tensor(fid, dtype=torch.float64)
            readings = [x for r in rows for x in r["readings"]]
            out[prompt] = tilted_statistics(prompt, proxy, settings.beta, stats, readings).to_json()
        bar.close()
        return {"model": name, "n": n, "prompts": out, "wall_s": time.perf_counter() - start}

    return cache.get("oracle", key, compute)


def _sampling_flops(run: Callable[[int], Tensor]) -> int:
    """FLOPs per image of ``run(k)`` (k images), measured on 2 images."""
    return measure(lambda: run(2)).flops // 2


def sampling_stage(cache: StageCache, judges: Judges, name: str, model_path: str, method: str,
                   settings: BenchSettings, particles: int = 1, guidance: str | None = None) -> dict[str, Any]:
    """Images of every evaluation prompt with one sampling-time method (or the plain model at
    ``model_path``, e.g. a fine-tuned folder), their per-image values and sampling cost."""
    from ..core.model import CountingModel
    from ..tilt.base import GuidedModel
    from ..tilt.particles import smc_sample
    from .estimators import build_estimator

    model = _load(model_path)
    guidance = guidance or GUIDANCE.get((name, "learned"))
    banked = method == "trainingfree-bank"
    key = {"model": model.fingerprint(), "method": method, "particles": particles, "n": settings.n,
           "beta": settings.beta, "prompts": list(settings.prompts),
           "guidance": _guidance_identity(guidance) if method in ("learned",) + TWISTED_METHODS else None,
           **({"bank": settings.bank} if banked else {})}

    def compute(_: Path) -> dict[str, Any]:
        steps = model.backend.default_steps
        proxy_latent = model.latent_reward(judges.proxy)
        estimator = None
        if method in ("tweedie", "trainingfree", "learned") + TWISTED_METHODS:
            learned = method in ("learned",) + TWISTED_METHODS
            estimator, _beta = build_estimator(model, "learned" if learned else method, judges.proxy,
                                               None if learned else settings.beta, guidance=guidance)
        bank_cost = None
        if banked:  # each prompt's bank is its guidance's proxy prior
            banks, bank_cost = _draw_banks(model, judges, settings, steps)
            estimator, _ = build_estimator(model, "trainingfree", judges.proxy, settings.beta, bank=banks)
        counter = CountingModel(model)
        wrapped = counter if estimator is None else GuidedModel(counter, model.schedule, estimator)

        def run(prompt: str, k: int, offset: int = 0) -> Tensor:
            if method in ("smc",) + TWISTED_METHODS:
                # twisted: the learned network's log potential twists (handed over to the plug-in
                # near the data in twisted-handoff-smc), its drift proposes
                twisted = method in TWISTED_METHODS
                res = smc_sample(model, model.schedule, proxy_latent, settings.beta, n=k, particles=particles,
                                 shape=model.latent_shape, cond=[prompt] * k, steps=steps, seed=offset + 7,
                                 drift=estimator if twisted else None, twist=estimator.log_twist if twisted else None,
                                 handoff=method == "twisted-handoff-smc")
                if twisted:
                    smc_trace.append({"ess": res.ess, "log_z": [float(v) for v in res.log_z]})
                return model.decode(res.samples)
            if method == "bestofn":
                seeds = [candidate_seed(s, j) for s in _seeds(k, offset) for j in range(particles)]
                cond = model.encode([prompt] * len(seeds))
                images = model.sample(cond, seeds=seeds, steps=steps, model=counter).images
                pick = best_candidates(judges.proxy, images, prompt, particles)
                return images[pick + torch.arange(k) * particles]
            cond = model.encode([prompt] * k)
            return model.sample(cond, seeds=_seeds(k, offset), steps=steps, model=wrapped).images

        smc_trace: list[dict[str, Any]] = []
        flops = _sampling_flops(lambda k: run(settings.prompts[-1], k, 99_000))
        smc_trace.clear()  # the FLOP count's own run
        records, wall, peak = [], 0.0, 0
        for prompt in settings.prompts:
            cost = measure(lambda: run(prompt, settings.n), count_flops=False, device=model.backend.device)
            wall += cost.wall_s
            peak = max(peak, cost.peak_mem_bytes)
            records.append(prompt_record(judges, cost.value, prompt))
        return {"model": name, "path": model_path, "method": method, "particles": particles, "prompts": records,
                "sampling_flops_per_image": flops, "sampling_wall_per_image": wall / (settings.n * len(settings.prompts)),
                "scale": getattr(estimator, "scale", None), "peak_mem_bytes": peak,
                **({"smc": smc_trace} if smc_trace else {}), **({"bank": bank_cost} if bank_cost else {})}

    return cache.get("sample", key, compute)


def _draw_banks(model: Any, judges: Judges, settings: BenchSettings, steps: int) -> tuple[Any, dict[str, Any]]:
    """One sample bank of ``settings.bank`` unguided images per evaluation prompt (seeds apart
    from the evaluation images'), scored by the proxy, and what drawing them cost: data that a
    user pays once per prompt, not per guided image."""
    from .estimators import build_banks

    def draw() -> Any:
        return build_banks(model, judges.proxy, [(p, None, 0) for p in settings.prompts], settings.bank,
                           steps=steps, batch_size=max(settings.bank // 2, 8))

    cost = measure(draw, device=model.backend.device)
    return cost.value, {"size": settings.bank, "prompts": len(settings.prompts), "flops": int(cost.flops),
                        "wall_s": cost.wall_s}


def finetune_stage(cache: StageCache, method: str, name: str, seed: int, settings: BenchSettings,
                   progress: bool) -> dict[str, Any]:
    """One fine-tuning run (resumable inside its stage folder); its budget folders and record."""
    from ..finetune import FinetuneConfig, finetune
    from ..rewards import get_reward
    from ..world.prompts import guidance_prompts

    prompts = guidance_prompts(settings.train_prompts, seed=1000 + seed)
    extra = {"draft_k": 1, "data_steps": settings.draft_steps} if (method, name) == ("draft", "diffusion") else {}
    config = FinetuneConfig(method=method, beta=settings.beta, steps=settings.finetune_steps,
                            batch_size=settings.finetune_batch, lr=settings.finetune_lr, seed=seed,
                            budgets=tuple(b for b in settings.budgets if b < settings.finetune_steps),
                            samples_per_prompt=settings.samples_per_prompt, checkpoint_every=10, **extra)
    base = _load(MODELS[name])
    key = {"model": base.fingerprint(), "config": config.to_json(), "prompts": prompts}

    def compute(folder: Path) -> dict[str, Any]:
        record = finetune(MODELS[name], get_reward(TARGET_REWARD), prompts, config, folder,
                          resume=(folder / "config.json").is_file(), progress=progress)
        budgets = {int(b.split("-")[1]): str(folder / b) for b in record["budgets"]}
        budgets[settings.finetune_steps] = str(folder)
        return {"method": method, "model": name, "seed": seed, "record": record, "budgets": budgets}

    return cache.get("finetune", key, compute)


def _guidance_identity(folder: str | None) -> str | None:
    """A guidance network's identity for stage keys: the hash of its weights file."""
    if folder is None:
        return None
    from ..builtin import resolve_weights

    path = resolve_weights(folder, "guidance network") / "guidance.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else str(folder)


def shipped_recipe(name: str) -> list[str]:
    """The arguments of ``python -m tiltgen.builtin.recipes.guidance`` that made the shipped
    network of model ``name``, read from its README (without --out and --seed)."""
    import shlex

    from ..builtin import resolve_weights

    readme = (resolve_weights(GUIDANCE[(name, "learned")], "guidance network") / "README.md").read_text()
    line = next((ln for ln in readme.splitlines() if ln.startswith("python -m tiltgen.builtin.recipes.guidance")),
                None)
    if line is None:
        raise TiltgenError(f"the shipped guidance network of {name} has no recipe command in its README")
    words = shlex.split(line)[3:]
    out: list[str] = []
    skip = False
    for w in words:
        if skip:
            skip = False
            continue
        if w in ("--out", "--seed"):
            skip = True
            continue
        out.append(w)
    return out


def guidance_stage(cache: StageCache, name: str, seed: int, progress: bool) -> str:
    """The learned guidance network of model ``name`` for training seed ``seed``: the shipped
    one for seed 0, else one trained (and calibrated) by the shipped recipe with that seed."""
    if seed == 0:
        return GUIDANCE[(name, "learned")]
    args = shipped_recipe(name)
    key = {"model": _load(MODELS[name]).fingerprint(), "recipe": args, "seed": seed}

    def compute(folder: Path) -> dict[str, Any]:
        from ..builtin.recipes.guidance import main as recipe

        split = args.index("--") if "--" in args else len(args)
        resume = ["--resume"] if (folder / ".work" / "config.json").is_file() else []
        command = args[:split] + ["--out", str(folder), "--seed", str(seed), *resume] + args[split:]
        if not progress and "--no-progress" not in command:
            command = command + (["--no-progress"] if "--" in command else ["--", "--no-progress"])
        if recipe(command):
            raise TiltgenError(f"training the guidance network of {name} with seed {seed} failed")
        return {"folder": str(folder)}

    return cache.get("guidance", key, compute)["folder"]


def guidance_training_flops(name: str, folder: str, judges: Judges) -> dict[str, Any]:
    """Compute of a learned guidance network of model ``name``: data (its sample count x the
    FLOPs of one sample with decoding and reward) and training (its steps x the FLOPs of one
    forward and backward step at its batch size). Networks trained since FLOPs are recorded
    carry both per-unit figures; for older ones (the shipped networks) they are measured here."""
    from ..builtin import resolve_weights
    from ..tilt.learned import load_guidance, prompt_encoder

    folder = resolve_weights(folder, "guidance network")
    record = json.loads((folder / "guidance.json").read_text())
    model = _load(MODELS[name])
    data_steps = int(record["train"].get("data_steps") or model.backend.default_steps)

    def one_sample(k: int) -> None:
        images = model.sample(model.encode(["a red shape"] * k), seeds=_seeds(k), steps=data_steps).images
        with torch.no_grad():
            judges.proxy(images, "a red shape")

    recorded = record.get("data", {}).get("flops_per_sample")
    per_sample = recorded or measure(lambda: one_sample(2)).flops // 2
    guidance = load_guidance(folder)
    potential = guidance.potential
    batch = int(record["train"]["batch_size"])
    x = torch.randn(batch, *record["shape"])
    t = torch.rand(batch, dtype=torch.float64).clamp(0.01, 1.0)
    encoder = prompt_encoder(model, record)
    emb = encoder(["a red shape"] * batch) if encoder is not None else None

    def one_step() -> None:
        potential.net.zero_grad()
        potential.logit(x, t, emb).sum().backward()

    per_step = record.get("train_flops_per_step") or measure(one_step).flops
    data_flops = int(record["data_size"]) * per_sample
    train_flops = int(record["steps"]) * per_step
    return {"data_flops": data_flops, "train_flops": train_flops, "per_sample_flops": per_sample,
            "per_step_flops": per_step, "data_samples": int(record["data_size"]), "steps": int(record["steps"]),
            "calibration": record.get("calibration")}


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def bootstrap_interval(groups: Sequence[Sequence[Sequence[float]]], draws: int, seed: int = 0
                       ) -> tuple[float, float] | None:
    """95 % percentile interval of the mean over prompts of per-prompt means, resampling seeds
    (outer list) and images within each prompt. ``groups[s][p]`` = values of seed s, prompt p."""
    groups = [[torch.tensor([v for v in g if v is not None], dtype=torch.float64) for g in seed_groups]
              for seed_groups in groups]
    if not groups or any(len(g) == 0 for seed_groups in groups for g in seed_groups):
        return None
    gen = torch.Generator().manual_seed(seed)
    means = torch.empty(draws, dtype=torch.float64)
    for d in range(draws):
        s = groups[int(torch.randint(len(groups), (1,), generator=gen))]
        means[d] = torch.stack([g[torch.randint(len(g), (len(g),), generator=gen)].mean() for g in s]).mean()
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def summarise(rows: Sequence[dict[str, Any]], oracle: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    """One table row from the sampling stages of one method (one per training seed)."""
    prompts = list(settings.prompts)
    out: dict[str, Any] = {}
    for key in ("proxy", "gold", "binary", "fidelity"):
        per_seed = [[rec[key] for rec in row["prompts"]] for row in rows]
        means = [_mean([_mean(vals) for vals in seed]) for seed in per_seed]
        out[key] = _mean(means)
        out[f"{key}_ci"] = bootstrap_interval(per_seed, settings.bootstrap)
    out["diversity"] = _mean([_mean([rec["diversity"] for rec in row["prompts"]]) for row in rows])
    shares, tvs, ess = [], [], []
    for p, prompt in enumerate(prompts):
        star = oracle["prompts"][prompt]
        proxy = _mean([_mean(row["prompts"][p]["proxy"]) for row in rows])
        shares.append(fraction_of_exact_gain(proxy, star["base"]["proxy"], star["tilted"]["proxy"]))
        tvs.append(_mean([attribute_tv(row["prompts"][p]["histograms"], star["histograms"]) for row in rows]))
        ess.append(star["ess"])
    out["fraction_of_exact_gain"] = _mean(shares)
    out["attribute_tv"] = _mean(tvs)
    out["oracle_ess"] = _mean(ess)
    out["oracle"] = {"proxy": _mean([oracle["prompts"][p]["tilted"]["proxy"] for p in prompts]),
                     "gold": _mean([oracle["prompts"][p]["tilted"]["gold"] for p in prompts])}
    out["seeds"] = len(rows)
    return out


def _compute(row_stage: dict[str, Any], data_flops: int = 0, train_flops: int = 0, data_wall: float = 0.0,
             train_wall: float = 0.0, settings: BenchSettings | None = None) -> dict[str, Any]:
    images = settings.images_for_total if settings else 10_000
    sampling = int(row_stage["sampling_flops_per_image"])
    return {"data_flops": int(data_flops), "train_flops": int(train_flops), "sampling_flops_per_image": sampling,
            "total_flops": int(data_flops + train_flops + images * sampling),
            "data_wall_s": data_wall, "train_wall_s": train_wall,
            "sampling_wall_per_image_s": row_stage["sampling_wall_per_image"],
            "total_wall_s": data_wall + train_wall + images * row_stage["sampling_wall_per_image"],
            # GPU: the allocator's peak while sampling; CPU: the process's peak RSS so far
            "sampling_peak_mem_bytes": row_stage.get("peak_mem_bytes")}


def setup_cost(stage: dict[str, Any], method: str, shipped_cost: Sequence[dict[str, Any]] | None
               ) -> tuple[int, int, float]:
    """(data FLOPs, training FLOPs, data wall) a sampling-time row pays before its first image:
    a bank row its banks (one per evaluation prompt, drawn once), a twisted-SMC row its shipped
    network's data, calibration and training (seed 0 of the learned row), the others nothing."""
    if "bank" in stage:
        return int(stage["bank"]["flops"]), 0, float(stage["bank"]["wall_s"])
    if method in TWISTED_METHODS:
        shipped = (shipped_cost or [{}])[0]
        return (shipped.get("data_flops", 0) + shipped.get("calibration_flops", 0), shipped.get("train_flops", 0),
                0.0)
    return 0, 0, 0.0


def run_bench(settings: BenchSettings, work: Path, progress: bool = True) -> dict[str, Any]:
    """Every stage (cached in ``work``), then the table rows and the headline figures."""
    start = time.perf_counter()
    cache = StageCache(work)
    judges = Judges()
    oracles = {name: oracle_stage(cache, judges, name, settings, progress) for name in planned_models(settings)}
    rows: list[dict[str, Any]] = []
    base_rows: dict[str, dict[str, Any]] = {}
    plan = sampling_plan(settings)
    bar = tqdm(plan, desc="bench world: sampling rows", disable=not progress)
    guidance_cost = {}
    for name, method, k in bar:
        if method == "learned":
            rows.append(_learned_row(cache, judges, name, oracles[name], settings, guidance_cost, progress))
            continue
        stage = sampling_stage(cache, judges, name, MODELS[name], method, settings, particles=k)
        row = {"model": name, "method": method if k == 1 else f"{method}-{k}", "family": "sampling",
               **summarise([stage], oracles[name], settings),
               "compute": _compute(stage, *setup_cost(stage, method, guidance_cost.get(name)), settings=settings)}
        if "smc" in stage:
            ess = torch.tensor([trace["ess"] for trace in stage["smc"]], dtype=torch.float64)
            row["smc_ess_min"] = float(ess.mean(0).min())
            row["smc_log_z"] = float(torch.tensor([v for trace in stage["smc"] for v in trace["log_z"]]).mean())
        rows.append(row)
        if method == "unguided":
            base_rows[name] = row
    bar.close()
    for method, name in finetune_plan(settings):
        runs = [finetune_stage(cache, method, name, seed, settings, progress) for seed in range(settings.seeds)]
        for budget in sorted(runs[0]["budgets"], key=int):
            stages = [sampling_stage(cache, judges, name, run["budgets"][budget], "unguided", settings)
                      for run in runs]
            records = [run["record"] for run in runs]
            frac = int(budget) / settings.finetune_steps
            data = _mean([r["compute"]["data"]["flops"] for r in records]) or 0
            train = (_mean([r["compute"]["train"]["flops_per_step"] for r in records]) or 0) * int(budget)
            data_wall = _mean([r["compute"]["data"]["wall_s"] for r in records]) or 0.0
            train_wall = (_mean([r["compute"]["train"]["wall_s"] for r in records]) or 0.0) * frac
            merged = dict(stages[0], sampling_flops_per_image=_mean([s["sampling_flops_per_image"] for s in stages]),
                          sampling_wall_per_image=_mean([s["sampling_wall_per_image"] for s in stages]))
            rows.append({"model": name, "method": f"finetune-{method}", "budget": int(budget), "family": "finetune",
                         **summarise(stages, oracles[name], settings),
                         "compute": _compute(merged, data, train, data_wall, train_wall, settings),
                         "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records)})
    for row in rows:
        base = base_rows[row["model"]]
        row["proxy_gain"] = row["proxy"] - base["proxy"]
        row["gold_gain"] = row["gold"] - base["gold"]
        row["fidelity_change"] = (None if row["fidelity"] is None or base["fidelity"] is None
                                  else row["fidelity"] - base["fidelity"])
    flag_reward_hacking(rows, base_rows)
    return {"settings": settings.to_json(), "rows": rows, "oracle": oracles, "guidance_cost": guidance_cost,
            "headline": headline(rows), "headline_fidelity_kept": headline(rows, FIDELITY_KEPT),
            "fresh_run_wall": cache.fresh_run_wall(settings), "wall_s": time.perf_counter() - start}


def flag_reward_hacking(rows: Sequence[dict[str, Any]], base_rows: dict[str, dict[str, Any]]) -> None:
    """Set ``hacking``, ``hacking_beyond_noise`` and ``hacking_against`` on every row.

    A row is flagged when, against an earlier point of its own curve, its proxy is higher and its
    gold lower. A curve starts at its model's unguided row; a fine-tuning method's curve then runs
    through its budgets in order (so a gold that falls from budget to budget while the proxy climbs
    is caught even when it stays above the base model's). The earlier point compared against is
    the one with the highest gold among those with a lower proxy. Beyond noise: the row's gold
    interval lies wholly below that point's mean gold."""
    curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        curves.setdefault((row["model"], row["method"]), []).append(row)
    for (model, _), curve in curves.items():
        base = base_rows[model]
        earlier = [("unguided", base)]
        for row in sorted(curve, key=lambda r: r.get("budget") or 0):
            below = [(name, r) for name, r in earlier if r["proxy"] < row["proxy"] and r["gold"] > row["gold"]]
            name, point = max(below, key=lambda item: item[1]["gold"]) if below else (None, None)
            row["hacking"] = point is not None and row is not base
            row["hacking_against"] = name if row["hacking"] else None
            row["hacking_beyond_noise"] = bool(row["hacking"] and row["gold_ci"] is not None
                                               and row["gold_ci"][1] < point["gold"])
            if row.get("budget") is not None:
                earlier.append((f"@{row['budget']}", row))


def fill_stages_in_parallel(settings: BenchSettings, work: Path, processes: Any, progress: bool = True) -> None:
    """Compute the bench's stages split over ``processes`` (stage i of each phase on process
    i mod N): the oracles, then every training run (guidance seeds, fine-tuning runs), then every
    sampling row's images; a barrier after each phase. :func:`run_bench` on the main process then
    finds them all in the cache. Any stage left out here is computed there, so the table is the
    same; only the wall-time columns differ, since the processes share the machine."""
    cache = StageCache(work)
    judges = Judges()
    mine = lambda jobs: processes.mine(jobs)  # noqa: E731

    def phase(jobs: list[Callable[[], Any]]) -> None:
        for job in mine(jobs):
            job()
        processes.wait()

    phase([lambda name=name: oracle_stage(cache, judges, name, settings, progress and processes.is_main)
           for name in planned_models(settings)])
    plan = sampling_plan(settings)
    tuned = finetune_plan(settings)
    learned = [name for name, method, _ in plan if method == "learned"]
    phase([lambda name=name, seed=seed: guidance_stage(cache, name, seed, False)
           for name in learned for seed in range(1, settings.seeds)]
          + [lambda m=m, name=name, seed=seed: finetune_stage(cache, m, name, seed, settings, False)
             for m, name in tuned for seed in range(settings.seeds)])
    jobs: list[Callable[[], Any]] = []
    for name, method, k in plan:
        if method == "learned":
            jobs += [lambda name=name, seed=seed: sampling_stage(
                cache, judges, name, MODELS[name], "learned", settings,
                guidance=guidance_stage(cache, name, seed, False)) for seed in range(settings.seeds)]
        else:
            jobs.append(lambda name=name, method=method, k=k: sampling_stage(cache, judges, name, MODELS[name], method,
                                                                             settings, particles=k))
    for method, name in tuned:
        for seed in range(settings.seeds):
            run = finetune_stage(cache, method, name, seed, settings, False)  # cached by the phase above
            jobs += [lambda name=name, folder=folder: sampling_stage(cache, judges, name, folder, "unguided", settings)
                     for folder in run["budgets"].values()]
    phase(jobs)


def _learned_row(cache: StageCache, judges: Judges, name: str, oracle: dict[str, Any], settings: BenchSettings,
                 guidance_cost: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Learned guidance of model ``name`` over training seeds (seed 0: the shipped network)."""
    folders = [guidance_stage(cache, name, seed, progress) for seed in range(settings.seeds)]
    unguided = sampling_stage(cache, judges, name, MODELS[name], "unguided", settings)
    stages, costs = [], []
    for folder in folders:
        stage = sampling_stage(cache, judges, name, MODELS[name], "learned", settings, guidance=folder)
        cost = cache.get("guidance-cost", {"model": _load(MODELS[name]).fingerprint(),
                                           "net": _guidance_identity(folder)},
                         lambda _: guidance_training_flops(name, folder, judges))
        cost = {**cost, "calibration_flops": _calibration_flops(cost, stage, unguided)}
        stages.append(stage)
        costs.append(cost)
    guidance_cost[name] = costs
    merged = dict(stages[0], sampling_flops_per_image=_mean([s["sampling_flops_per_image"] for s in stages]),
                  sampling_wall_per_image=_mean([s["sampling_wall_per_image"] for s in stages]))
    data = _mean([c["data_flops"] + c["calibration_flops"] for c in costs]) or 0
    train = _mean([c["train_flops"] for c in costs]) or 0
    return {"model": name, "method": "learned", "family": "sampling", **summarise(stages, oracle, settings),
            "compute": _compute(merged, data, train, settings=settings),
            "scale": [s.get("scale") for s in stages], "guidance": folders}


def _calibration_flops(cost: dict[str, Any], guided: dict[str, Any], unguided: dict[str, Any]) -> int:
    """Calibration samples (the default 16 prompts x 32, unguided and at every scale tried)."""
    from ..tilt.learned.calibrate import CalibrationConfig

    calibration = cost.get("calibration") or {}
    if not calibration:
        return 0
    config = CalibrationConfig()
    samples = config.n * config.max_conditions
    scales = len(calibration.get("tried", []))
    return int(samples * (unguided["sampling_flops_per_image"] + scales * guided["sampling_flops_per_image"]))


def headline(rows: Sequence[dict[str, Any]], max_fidelity_drop: float | None = None) -> dict[str, Any]:
    """Learned one-step guidance against the best fine-tuned baseline (by proxy), in total FLOPs.

    ``max_fidelity_drop``: only fine-tuned rows whose fidelity fell by at most this much against
    their base model count (a comparison at equal proxy *and* kept prompt fidelity)."""
    learned = next((r for r in rows if r["model"] == "onestep" and r["method"] == "learned"), None)
    tuned = [r for r in rows if r["family"] == "finetune"]
    if max_fidelity_drop is not None:
        tuned = [r for r in tuned if r.get("fidelity_change") is not None
                 and r["fidelity_change"] >= -max_fidelity_drop]
    if learned is None or not tuned:
        return {}
    best = max(tuned, key=lambda r: r["proxy"])
    out = {"learned_onestep": {"proxy": learned["proxy"], "total_flops": learned["compute"]["total_flops"]},
           "best_finetune": {"method": best["method"], "model": best["model"], "budget": best.get("budget"),
                             "proxy": best["proxy"], "total_flops": best["compute"]["total_flops"]},
           "reached": learned["proxy"] >= best["proxy"], "max_fidelity_drop": max_fidelity_drop}
    out["ratio"] = learned["compute"]["total_flops"] / best["compute"]["total_flops"] if out["reached"] else None
    matched = [r for r in tuned if r["proxy"] >= learned["proxy"]]
    if matched:
        cheapest = min(matched, key=lambda r: r["compute"]["total_flops"])
        out["cheapest_finetune_matching_learned"] = {
            "method": cheapest["method"], "model": cheapest["model"], "budget": cheapest.get("budget"),
            "proxy": cheapest["proxy"], "total_flops": cheapest["compute"]["total_flops"],
            "ratio": learned["compute"]["total_flops"] / cheapest["compute"]["total_flops"]}
    return out


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"[{value[0]:.{digits}f}, {value[1]:.{digits}f}]"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _flops(value: float | int | None) -> str:
    return "–" if not value else f"{float(value):.2e}"


def _processes(result: dict[str, Any]) -> str:
    n = int(result.get("processes", 1))
    return "" if n == 1 else f", {n} processes"


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = ["# tiltgen bench world", "",
             f"Target `{TARGET_REWARD}` at beta = {settings['beta']}; held-out `{GOLD_REWARD}`; "
             f"{settings['n']} images per held-out prompt ({', '.join(repr(p) for p in settings['prompts'])}); "
             f"fine-tuning: {settings['seeds']} training seed(s), {settings['train_prompts']} training prompts; "
             f"total compute counts data, training and sampling {settings['images_for_total']} images; "
             f"{result['wall_s']:.0f} s in this invocation (stages found in the cache cost nothing)"
             f"{_processes(result)}.{_fresh_run_sentence(result)}", "",
             "| model | method | budget | proxy | proxy 95% | gold | gold 95% | fidelity | fidelity change | binary | diversity | "
             "share of exact gain | attribute TV to p* | oracle ESS | data FLOPs | train FLOPs | sampling FLOPs/img | "
             "total FLOPs | total wall (s) | proxy up, gold down |",
             "|" + "---|" * 20]
    for r in result["rows"]:
        c = r["compute"]
        lines.append("| " + " | ".join([
            r["model"], r["method"], _f(r.get("budget")), _f(r["proxy"]), _f(r["proxy_ci"]), _f(r["gold"]),
            _f(r["gold_ci"]), _f(r["fidelity"]), _f(r.get("fidelity_change")), _f(r["binary"]), _f(r["diversity"]), _f(r["fraction_of_exact_gain"], 2),
            _f(r["attribute_tv"]), _f(r["oracle_ess"], 1), _flops(c["data_flops"]), _flops(c["train_flops"]),
            _flops(c["sampling_flops_per_image"]), _flops(c["total_flops"]), _f(c["total_wall_s"], 0),
            _hacking_cell(r)]) + " |")
    for title, h in (("Headline", result.get("headline") or {}),
                     (f"Headline among fine-tuned rows that kept fidelity (drop at most {FIDELITY_KEPT})",
                      result.get("headline_fidelity_kept") or {})):
        lines += ["", f"## {title}", ""] + (_headline_lines(h) if h else ["No fine-tuned row qualifies."])
    hacked = [f"{r['model']} {r['method']}{'' if r.get('budget') is None else ' @' + str(r['budget'])} "
              f"(against {r.get('hacking_against') or 'unguided'}{'' if r['hacking_beyond_noise'] else ', within noise'})"
              for r in result["rows"] if r["hacking"]]
    lines += ["", "Rows whose proxy rose while their gold fell, against their model's unguided row or an earlier "
              "budget of their own curve: " + ("; ".join(hacked) if hacked else "none") + "."]
    return "\n".join(lines) + "\n"


def _fresh_run_sentence(result: dict[str, Any]) -> str:
    fresh = result.get("fresh_run_wall")
    if not fresh:
        return ""
    notes = [", ".join(f"{kind} {seconds / 60:.0f} min" for kind, seconds in sorted(fresh["by_kind_s"].items())),
             "the shipped guidance networks' own training not included"]
    if fresh.get("stages_with_partial_wall"):
        notes.append(f"{fresh['stages_with_partial_wall']} stage(s) cached before whole-stage times were recorded "
                     "count only their own sampling, data and training times, not scoring their images")
    if fresh["stages_without_wall"]:
        notes.append(f"{len(fresh['stages_without_wall'])} stage(s) recorded no wall time")
    return (f" With an empty cache, on one process, the stages this table used would take "
            f"{fresh['total_s'] / 60:.0f} min as they were recorded ({'; '.join(notes)}).")


def _hacking_cell(row: dict[str, Any]) -> str:
    if not row["hacking"]:
        return ""
    against = f" vs {row.get('hacking_against') or 'unguided'}"
    return f"**yes**{against}" if row["hacking_beyond_noise"] else f"yes{against} (within noise)"


def _headline_lines(h: dict[str, Any]) -> list[str]:
    best = h["best_finetune"]
    lines = [f"Best fine-tuned baseline by proxy: {best['method']} on {best['model']} at {best['budget']} steps, "
             f"proxy {best['proxy']:.3f}, {_flops(best['total_flops'])} FLOPs in total. Learned one-step guidance: "
             f"proxy {h['learned_onestep']['proxy']:.3f}, {_flops(h['learned_onestep']['total_flops'])} FLOPs."]
    if h["reached"]:
        lines.append(f"It reaches that proxy at **{h['ratio']:.3f}×** the baseline's total FLOPs.")
    else:
        lines.append("It does **not** reach that proxy, so the paper's ratio is undefined here.")
    m = h.get("cheapest_finetune_matching_learned")
    if m:
        lines.append(f"The cheapest fine-tuned row that matches learned one-step guidance's proxy is {m['method']} on "
                     f"{m['model']} at {m['budget']} steps ({_flops(m['total_flops'])} FLOPs): learned one-step costs "
                     f"{m['ratio']:.3f}× that.")
    return lines


def plot(result: dict[str, Any], path: Path) -> Path:
    """Gold and proxy against total FLOPs (log axis), one curve per method across budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharex=True)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"]:
        groups.setdefault(f"{r['model']} {r['method']}", []).append(r)
    # colour names the method, marker and line style the model: no two curves look alike
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    colours = plt.get_cmap("tab20").colors
    markers = {"diffusion": "o", "onestep": "s", "flow": "^"}
    lines = {"diffusion": "-", "onestep": "--", "flow": ":"}
    for ax, key in zip(axes, ("proxy", "gold")):
        for label, rs in groups.items():
            rs = sorted(rs, key=lambda r: r["compute"]["total_flops"])
            model = rs[0]["model"]
            ax.plot([r["compute"]["total_flops"] for r in rs], [r[key] for r in rs],
                    marker=markers.get(model, "o"), ms=5,
                    color=colours[methods.index(rs[0]["method"]) % len(colours)],
                    ls=lines.get(model, "-") if len(rs) > 1 else "none", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(f"total FLOPs (data + training + {result['settings']['images_for_total']} images)")
        ax.set_ylabel(key)
        ax.set_title(f"{key} vs compute (lines: fine-tuning budgets)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path

"""Training loop for the guidance network: data, pool, steps, checkpoints, resume, record.

Output directory layout (every file written atomically: temp file, then rename)::

    config.json          everything needed to rebuild the run (beta, losses, network, schedule)
    data.safetensors     the generated samples, rewards and the noised training pool
    checkpoint.safetensors  weights + optimiser state + RNG state; run state in its metadata
    guidance.safetensors final weights          guidance.json  record (beta, reward, model,
    loss.png             loss curve                              data size, training compute)
    README.md            the model card (base model and fingerprint, reward, beta, prompts)

Resuming re-reads the data and the latest checkpoint and continues from its step with
the same minibatch RNG state, so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ...core.compute import measure
from ...core.distributed import Processes, average_gradients
from ...core.files import atomic_write, read_tensors, write_json
from ...core.model import Model, as_model
from ...core.reward import Reward, as_reward, reward_name
from ...core.schedules import Schedule, schedule_from_config
from ...errors import TiltgenError, check_beta, check_choice
from .data import (GuidanceData, Pool, build_pool, check_data_size, data_units, generate_data, generate_unit,
                   join_units, noised_states, split_rows, training_times)
from .losses import EXACT_STATE_LOSSES, LOSSES, consistency_loss, tilt_loss
from .networks import build_network
from .potential import CondEncoder, GuidancePotential, LearnedGuidance
from .pretrained import PROMPT_POOLINGS, read_guidance_record, tiltgen_version, write_model_card

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
SHARDS = "data-shards"  # finished batches of data generation, kept until data.safetensors is written
LOW_ESS = 10.0  # below this many effective samples per condition the data, not the network, limits the estimate
VAL_DRAWS = 8  # noised states per held-out sample (fixed, so the held-out loss is comparable across steps)
# TrainConfig keys that decide the generated samples and rewards (data can be reused when they match)
DATA_KEYS = ("n_data", "sampler", "data_steps", "spacing", "seed", "trajectory", "data_dtype")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``n_data`` samples per condition; ``steps`` optimiser steps."""

    beta: float
    loss: str | None = None               # None: log-mse with noise_tilt (exact there), logistic otherwise
    eta: float = 1.0                      # consistency weight (0 = off)
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 3e-3
    n_data: int = 2000
    pool_size: int = 65536
    time_levels: int = 64                 # discrete training times (ignored if ``times`` is set)
    times: tuple[float, ...] | None = None
    spacing: str = "uniform"              # time grid of data sampling and training levels
    sampler: str = "heun"
    data_steps: int = 50
    trajectory: bool = False              # train on the sampler's own states
    noise_tilt: bool = False              # one-step generators: learn h of the input noise, tilt the input
    data_dtype: str = "float32"
    net: dict | None = None               # network config; default from the sample shape
    checkpoint_every: int = 200
    fresh_noise: bool = False             # new noise and time for every minibatch instead of a fixed pool
    val_fraction: float = 0.0             # conditions held out; the weights kept are the best on them
    seed: int = 0
    prompt_pooling: str = "padded"        # how the model embeds a prompt for the network (its prompt_embedding)

    def __post_init__(self) -> None:
        if self.loss is None:  # frozen: the resolved default is stored, so records and resumes name it
            object.__setattr__(self, "loss", "log-mse" if self.noise_tilt else "logistic")
        check_beta(self.beta)
        check_choice("guidance loss", self.loss, LOSSES)
        check_choice("data dtype", self.data_dtype, _DTYPES)
        check_choice("prompt pooling", self.prompt_pooling, PROMPT_POOLINGS)
        if self.eta < 0:
            raise TiltgenError(f"eta (the consistency weight) must be >= 0, got {self.eta}")
        for name in ("steps", "batch_size", "n_data", "pool_size", "time_levels", "data_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TiltgenError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TiltgenError(f"lr must be > 0, got {self.lr}")
        if self.fresh_noise and (self.trajectory or self.eta > 0):
            raise TiltgenError("fresh_noise noises the samples afresh at every step: it needs trajectory=False "
                               "(trajectory mode trains on the sampler's own states) and eta=0 (the consistency "
                               "loss needs the frozen model's x0_hat at fixed states)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TiltgenError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.noise_tilt and not (self.trajectory and self.eta == 0):
            raise TiltgenError("noise_tilt learns h of a generator's own input states: it needs trajectory=True "
                               "and eta=0 (the consistency regulariser is defined for x0 shifts)")
        if self.loss in EXACT_STATE_LOSSES and not self.noise_tilt:
            others = ", ".join(kind for kind in LOSSES if kind not in EXACT_STATE_LOSSES)
            raise TiltgenError(f"the {self.loss} loss fits E[log w | x_t], which is log h_t only where the reward is "
                               "a function of the state: use it with noise_tilt (a one-step generator's input), "
                               f"or pick one of {others}")

    def to_json(self) -> dict:
        out = asdict(self)
        out["times"] = list(self.times) if self.times is not None else None
        if out["prompt_pooling"] == "padded":
            del out["prompt_pooling"]  # the default is left out, so records and cache keys of earlier runs still match
        return out

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        if data.get("times") is not None:
            data["times"] = tuple(data["times"])
        return cls(**data)


def default_net(shape: Sequence[int], cond_dim: int = 0, coords: bool = False) -> dict:
    """MLP for vectors [d], conv net for images [C, H, W] (``coords``: with coordinate channels)."""
    if len(shape) == 1:
        return {"kind": "mlp", "dim": int(shape[0]), "hidden": 128, "depth": 3, "cond_dim": cond_dim,
                "linear_skip": True, "quadratic_skip": True}
    if len(shape) == 3:
        net = {"kind": "conv", "channels": int(shape[0]), "width": 32, "depth": 3, "cond_dim": cond_dim}
        return {**net, "coords": True} if coords else net
    raise TiltgenError(f"no default guidance network for samples of shape {tuple(shape)}; pass TrainConfig(net=...)")


@dataclass
class TrainResult:
    guidance: LearnedGuidance
    record: dict
    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 20):]
        return sum(tail) / len(tail)


# --- atomic file IO -------------------------------------------------------------------------
def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


class Adam:
    """Plain Adam (Kingma & Ba) whose whole state is named tensors, so a checkpoint is one
    safetensors file. Also avoids torch.optim, whose first use imports torch._dynamo
    (seconds of start-up per process, more than a whole quick-bench training)."""

    def __init__(self, params: Sequence[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.count = 0

    @torch.no_grad()
    def step(self) -> None:
        self.count += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.count, 1 - b2**self.count
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def tensors(self) -> dict[str, Tensor]:
        out = {f"opt.m.{i}": m for i, m in enumerate(self.m)}
        out.update({f"opt.v.{i}": v for i, v in enumerate(self.v)})
        out["opt.count"] = torch.tensor(self.count, dtype=torch.int64)
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        for i in range(len(self.params)):
            self.m[i].copy_(tensors[f"opt.m.{i}"])
            self.v[i].copy_(tensors[f"opt.v.{i}"])
        self.count = int(tensors["opt.count"])


# --- the run ---------------------------------------------------------------------------------
class _Run:
    """Mutable state of one training run (so train_guidance stays a short script of steps)."""

    def __init__(self, config: TrainConfig, potential: GuidancePotential, pool: Pool, data: GuidanceData,
                 embeddings: Tensor | None, schedule: Schedule, times: Tensor, train_rows: Tensor,
                 held_rows: Tensor, processes: Processes | None = None, reference: GuidancePotential | None = None):
        self.config = config
        # a frozen potential the network is trained relative to (a stage of annealed training):
        # the loss sees logit - reference logit, so the network itself learns the sum
        self.reference = reference
        self.processes = processes or Processes()
        if config.batch_size % self.processes.world_size:
            raise TiltgenError(f"batch size {config.batch_size} does not split evenly over "
                               f"{self.processes.world_size} processes")
        # each process draws its share of the global minibatch from its own stream
        self.local_batch = config.batch_size // self.processes.world_size
        self.step_flops = 0  # FLOPs of one training step, measured on the first step run
        self.potential = potential
        self.pool = pool
        self.data = data
        self.embeddings = embeddings
        self.schedule = schedule
        self.times = times
        self.train_rows = train_rows
        self.weights = data.weights(config.beta)
        self.held = self._held_out_states(held_rows)
        self.opt = Adam(list(potential.parameters()), lr=config.lr)
        self.rng = torch.Generator().manual_seed(config.seed + 1 + 7919 * self.processes.rank)
        self.step = 0
        self.losses: list[float] = []
        self.val_losses: list[tuple[int, float]] = []
        self.best: dict[str, Tensor] | None = None  # weights with the lowest held-out loss so far
        self.best_val = math.inf
        self.best_step = 0
        self.train_wall = 0.0

    def _held_out_states(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """Fixed noised states of the held-out samples (VAL_DRAWS per sample): (rows, x_t, t)."""
        if rows.numel() == 0:
            return None
        g = torch.Generator().manual_seed(self.config.seed + 3)
        rows = rows.repeat(VAL_DRAWS)
        if self.data.states is not None:  # trajectory mode: the sampler's own states
            step = torch.randint(0, self.data.states.shape[0], (rows.numel(),), generator=g)
            return rows, self.data.states[step, rows], self.data.times[step]
        x_t, t = noised_states(self.data.x0[rows], self.schedule, self.times, g)
        return rows, x_t, t

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """The tilt loss on the held-out states (nan without a split)."""
        if self.held is None:
            return math.nan
        rows, x_t, t = self.held
        total = 0.0
        for part in torch.arange(rows.numel()).split(4096):
            r = rows[part]
            emb = self.embeddings[self.data.prompt[r]] if self.embeddings is not None else None
            logit = self._logit(x_t[part].to(self.potential.dtype), t[part], emb)
            total += float(tilt_loss(self.config.loss, logit, self.weights[r])) * r.numel()
        return total / rows.numel()

    def validate(self) -> None:
        """Record the held-out loss and keep the weights if they are the best so far."""
        value = self.held_out_loss()
        if math.isnan(value):
            return
        self.val_losses.append((self.step, value))
        if value < self.best_val:
            self.best_val, self.best_step = value, self.step
            self.best = {k: v.detach().clone() for k, v in self.potential.net.state_dict().items()}

    def final_weights(self) -> dict[str, Tensor]:
        """The weights to ship: the best on the held-out conditions, else the last."""
        return self.best if self.best is not None else self.potential.net.state_dict()

    def lr_at(self, step: int) -> float:
        # cosine decay to 5% of lr: a stateless schedule, so resuming needs only the step
        return self.config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / self.config.steps)))

    def _logit(self, x: Tensor, t: Tensor, emb: Tensor | None) -> Tensor:
        logit = self.potential.logit(x, t, emb)
        if self.reference is None:
            return logit
        with torch.no_grad():
            ref = self.reference.logit(x, t, emb)
        return logit - ref

    def _logit_and_shift(self, x: Tensor, t: Tensor, emb: Tensor | None) -> tuple[Tensor, Tensor]:
        logit, shift = self.potential.logit_and_shift(x, t, emb)
        if self.reference is None:
            return logit, shift
        with torch.no_grad():
            ref_logit, ref_shift = self.reference.logit_and_shift(x, t, emb)
        return logit - ref_logit.detach(), shift - ref_shift.detach()

    def train_step(self) -> float:
        cfg, pool = self.config, self.pool
        dtype = self.potential.dtype
        if cfg.fresh_noise:  # an endless pool: each step noises training samples afresh
            rows = self.train_rows[torch.randint(0, self.train_rows.numel(), (self.local_batch,), generator=self.rng)]
            x, t = noised_states(self.data.x0[rows], self.schedule, self.times, self.rng)
            x, w, prompt = x.to(dtype), self.weights[rows], self.data.prompt[rows]
        else:
            idx = torch.randint(0, len(pool), (self.local_batch,), generator=self.rng)
            x, t, w, prompt = pool.x_t[idx].to(dtype), pool.t[idx], pool.w[idx], pool.prompt[idx]
        emb = self.embeddings[prompt] if self.embeddings is not None else None
        if cfg.eta > 0:
            logit, shift = self._logit_and_shift(x, t, emb)
            loss = tilt_loss(cfg.loss, logit, w) + cfg.eta * consistency_loss(
                pool.x0_hat[idx].to(dtype), shift, pool.x0[idx].to(dtype), w.to(dtype), self.potential.s_data)
        else:
            loss = tilt_loss(cfg.loss, self._logit(x, t, emb), w)
        if not torch.isfinite(loss):
            raise TiltgenError(f"training loss became non-finite at step {self.step} (lower lr, or raise beta)")
        self.opt.lr = self.lr_at(self.step)
        self.opt.zero_grad()
        loss.backward()
        (loss,) = average_gradients(self.potential.parameters(), [float(loss.detach())], self.processes)
        self.opt.step()
        self.step += 1
        return loss

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"net.{k}": v for k, v in self.potential.net.state_dict().items()}
        if self.best is not None:
            out.update({f"best.{k}": v for k, v in self.best.items()})
        out.update(self.opt.tensors())
        out["rng"] = self.rng.get_state()
        if self.processes.distributed:  # every process's minibatch stream (a collective: all must call)
            from accelerate.utils import gather_object

            for rank, state in enumerate(gather_object([self.rng.get_state()])):
                out[f"rng.{rank}"] = state
        return out

    def state_meta(self) -> dict[str, str]:
        return {"step": str(self.step), "losses": json.dumps(self.losses), "train_wall": repr(self.train_wall),
                "val_losses": json.dumps(self.val_losses), "best_val": repr(self.best_val),
                "best_step": str(self.best_step), "processes": str(self.processes.world_size)}

    def restore(self, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        self.potential.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        self.best = best or None
        saved_processes = int(meta.get("processes", "1"))
        if saved_processes != self.processes.world_size:
            raise TiltgenError(f"cannot resume: the checkpoint was written by {saved_processes} process(es), this run "
                               f"has {self.processes.world_size}; resume with the same number")
        self.opt.load(tensors)
        self.rng.set_state(tensors[f"rng.{self.processes.rank}" if self.processes.distributed else "rng"])
        self.step = int(meta["step"])
        self.losses = json.loads(meta["losses"])
        self.train_wall = float(meta["train_wall"])
        self.val_losses = [tuple(v) for v in json.loads(meta.get("val_losses", "[]"))]
        self.best_val = float(meta.get("best_val", "inf"))
        self.best_step = int(meta.get("best_step", "0"))


def _describe(obj: Any) -> str:
    name = getattr(obj, "name", None)
    return str(name) if name is not None else type(obj).__name__


def _differing(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _check_resume_dir(out_dir: Path | None, config: TrainConfig) -> dict | None:
    """The saved config.json of the run to resume; None when it was stopped during data
    generation (its finished batches are in data-shards/)."""
    if out_dir is None:
        raise TiltgenError("resume needs the output directory of the interrupted run")
    if not (out_dir / "config.json").is_file() or not (out_dir / "data.safetensors").is_file():
        if (out_dir / SHARDS / "identity.json").is_file():
            return None
        raise TiltgenError(f"cannot resume: {out_dir} has no config.json / data.safetensors from an earlier run")
    saved = json.loads((out_dir / "config.json").read_text())
    if saved["train"] != config.to_json():
        keys = ", ".join(_differing(saved["train"], config.to_json()))
        raise TiltgenError(f"cannot resume: the training config differs from the one saved in {out_dir}/config.json "
                           f"({keys})")
    return saved


def _generate_sharded(model: Model, schedule: Schedule, reward: Reward, config: TrainConfig, shape: Sequence[int],
                      conditions: Sequence[Any] | None, out: Path, identity: dict, processes: Processes,
                      progress: bool) -> GuidanceData:
    """Data generation in batches spread over the processes, each batch saved when done, so an
    interrupted run keeps them and a resumed one makes only the rest. Same data as generate_data."""
    check_data_size(config.n_data)
    folder = out / SHARDS
    conds = [None] if conditions is None else list(conditions)
    units = data_units(len(conds), config.n_data)
    if processes.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "identity.json").is_file():
            old = json.loads((folder / "identity.json").read_text())
            if old != identity:
                raise TiltgenError(f"{folder} holds data generated with different settings "
                                   f"({', '.join(_differing(old, identity))}); use a new --out")
        else:
            write_json(folder / "identity.json", identity)
    processes.wait()
    path = lambda i: folder / f"unit-{i:06d}.safetensors"  # noqa: E731
    done = [i for i in range(len(units)) if path(i).is_file()]
    processes.wait()  # all have listed the finished batches before any adds one
    finished = set(done)
    todo = [i for i in processes.mine(list(range(len(units)))) if i not in finished]
    size = lambda i: units[i][2] - units[i][1]  # noqa: E731
    if done and processes.is_main:
        print(f"resumed guidance data: {sum(size(i) for i in done)} of {len(conds) * config.n_data} samples "
              f"({len(done)} of {len(units)} batches) already generated")
    bar = tqdm(total=sum(size(i) for i in todo), desc="guidance data", disable=not (progress and processes.is_main),
               leave=False)
    counted = False
    for i in todo:
        part = generate_unit(model, schedule, reward, units[i], conds[units[i][0]], shape=shape, n=config.n_data,
                             sampler=config.sampler, steps=config.data_steps, spacing=config.spacing, seed=config.seed,
                             trajectory=config.trajectory, dtype=_DTYPES[config.data_dtype], count_flops=not counted)
        counted = True
        flops = part.pop("flops_per_sample")
        _write_tensors(path(i), part, {"flops_per_sample": str(flops or 0)})
        bar.update(size(i))
    bar.close()
    processes.wait()
    return join_units([_read_unit(path(i)) for i in range(len(units))], sampler=config.sampler,
                      steps=config.data_steps)


def _read_unit(path: Path) -> dict[str, Any]:
    tensors, metadata = read_tensors(path)
    return {**tensors, "flops_per_sample": int(metadata.get("flops_per_sample", "0")) or None}


def _generate(model: Model, schedule: Schedule, reward: Reward, config: TrainConfig, shape: Sequence[int],
              conditions: Sequence[Any] | None, progress: bool) -> GuidanceData:
    return generate_data(model, schedule, reward, shape=shape, n=config.n_data, conditions=conditions,
                         sampler=config.sampler, steps=config.data_steps, spacing=config.spacing, seed=config.seed,
                         trajectory=config.trajectory, dtype=_DTYPES[config.data_dtype], progress=progress)


def _saved_sample_flops(folder: Path) -> int | None:
    """The per-sample FLOPs an earlier run recorded (None if it did not)."""
    try:
        return json.loads((folder / "config.json").read_text())["data"].get("flops_per_sample")
    except (OSError, KeyError, ValueError):
        return None


def _make_pool(data: GuidanceData, model: Model, schedule: Schedule, config: TrainConfig, times: Tensor,
               conditions: Sequence[Any] | None, train_rows: Tensor, progress: bool) -> Pool:
    if config.fresh_noise:  # no fixed pool: minibatches are noised afresh
        return Pool(*(torch.zeros(0) for _ in range(5)), x0_hat=None)
    return build_pool(data, model, schedule, beta=config.beta, size=config.pool_size, times=times,
                      conditions=conditions, with_x0_hat=config.eta > 0, seed=config.seed + 2, progress=progress,
                      rows=None if config.val_fraction == 0 else train_rows)


def _data_identity(config: TrainConfig, base_model: dict | None, reward: str, conditions: list[str] | None,
                   shape: Sequence[int]) -> dict:
    """Everything that decides the generated samples and their rewards."""
    train = config.to_json()
    return {"train": {k: train[k] for k in DATA_KEYS}, "base_model": base_model, "reward": reward,
            "conditions": conditions, "shape": list(shape)}


def _reuse_data(source: Path, identity: dict, shape: tuple[int, ...]) -> tuple[GuidanceData, float]:
    """Samples and rewards of an earlier run whose data settings equal ``identity``."""
    if not (source / "config.json").is_file() or not (source / "data.safetensors").is_file():
        raise TiltgenError(f"cannot reuse data: {source} has no config.json / data.safetensors from an earlier run")
    saved = json.loads((source / "config.json").read_text())
    theirs = _data_identity(TrainConfig.from_json(saved["train"]), saved.get("base_model"), saved.get("reward"),
                            saved.get("conditions"), saved.get("shape", []))
    differ = sorted({f"train.{k}" for k in DATA_KEYS if theirs["train"][k] != identity["train"][k]}
                    | {k for k in ("base_model", "reward", "conditions", "shape") if theirs[k] != identity[k]})
    if differ:
        raise TiltgenError(f"cannot reuse the data in {source}: it was generated with different {', '.join(differ)}")
    data, _, wall = _load_saved_data(source, saved, shape)
    return data, wall


def _load_saved_data(out: Path, saved: dict, shape: tuple[int, ...]) -> tuple[GuidanceData, Pool, float]:
    """Data, pool and their original generation time from an earlier run's directory."""
    tensors = load_file(str(out / "data.safetensors"))
    meta = saved["data"]
    data = GuidanceData(tensors["x0"], tensors["reward"], tensors["prompt"], tensors.get("states"),
                        tensors.get("times"), meta["model_evals"], meta["reward_evals"],
                        log_weight=tensors.get("log_weight"))
    if tuple(data.x0.shape[1:]) != shape:
        raise TiltgenError(f"cannot resume: saved samples have shape {tuple(data.x0.shape[1:])}, expected {shape}")
    pool = Pool.from_tensors(tensors, meta["pool_model_evals"]) if "pool.t" in tensors else None
    return data, pool, float(meta["wall_s"])


def _restore_checkpoint(path: Path, run: "_Run") -> None:
    run.restore(*read_tensors(path))
    if run.processes.is_main:
        print(f"resumed from step {run.step} of {run.config.steps}")


def _optimise(run: "_Run", out: Path | None, progress: bool, on_step: Callable[[int, float], None] | None) -> None:
    """Steps from run.step to config.steps; checkpoints periodically, at the end and on Ctrl-C."""
    config = run.config

    def checkpoint() -> None:
        if out is not None:
            tensors = run.state_tensors()  # on every process: it gathers their minibatch streams
            if run.processes.is_main:
                _write_tensors(out / "checkpoint.safetensors", tensors, run.state_meta())

    bar = tqdm(total=config.steps, initial=run.step, desc="train guidance",
               disable=not (progress and run.processes.is_main))
    try:
        while run.step < config.steps:
            tick = time.perf_counter()
            if run.step_flops == 0:  # FLOPs of one step (forward and backward), counted once per process
                cost = measure(run.train_step)
                loss, run.step_flops = cost.value, cost.flops
            else:
                loss = run.train_step()
            run.train_wall += time.perf_counter() - tick
            run.losses.append(loss)
            bar.update()
            if run.step % 20 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")
            if run.step % config.checkpoint_every == 0 or run.step == config.steps:
                run.validate()
                if run.best_step:
                    bar.set_postfix(loss=f"{loss:.4f}", held_out=f"{run.best_val:.4f}@{run.best_step}")
                checkpoint()
            if on_step is not None:
                on_step(run.step, loss)
    except KeyboardInterrupt:
        if not run.processes.distributed:  # several processes: the periodic checkpoint is the one kept
            checkpoint()  # keep every finished step; resume continues from here
        raise
    finally:
        bar.close()


def train_guidance(model: Model, schedule: Schedule, reward: Reward, config: TrainConfig, *,
                   shape: Sequence[int], conditions: Sequence[Any] | None = None,
                   cond_encoder: CondEncoder | None = None, out_dir: str | Path | None = None,
                   resume: bool = False, data_from: str | Path | None = None, progress: bool = True,
                   on_step: Callable[[int, float], None] | None = None,
                   processes: Processes | None = None, data: GuidanceData | None = None,
                   relative_to: LearnedGuidance | None = None) -> TrainResult:
    """Train a guidance network for ``reward`` at ``config.beta`` on samples of ``model``.

    ``conditions``: the distinct conditionings (prompts) to train on, each passed as the
    ``cond`` of a batch to the model and reward; ``cond_encoder(cond) -> [1 or N, E]``
    embeds one for the network. ``on_step(step, loss)`` is called after every step.
    With ``out_dir``: checkpoints every ``config.checkpoint_every`` steps (and on Ctrl-C),
    and ``resume=True`` continues an interrupted run from its last checkpoint.
    ``data_from``: reuse the samples and rewards of an earlier run's directory (refused, naming
    the keys, unless they were generated with the same model, reward, prompts and data settings).
    With ``config.val_fraction`` > 0 a share of the conditions is held out and the weights kept
    are those with the lowest held-out loss (checked every ``checkpoint_every`` steps).
    ``processes`` (from ``core.distributed.join_processes``, under torchrun or accelerate launch):
    data generation is split between them, and each step's minibatch too (gradients averaged),
    so N processes run the same optimisation as one; the main process writes the files.
    ``data``: samples and rewards already generated from ``model`` (no generation).
    ``relative_to``: a trained guidance the network starts from and is trained relative to (the
    loss sees its logit minus that network's), so it learns log h_t(x_t) + log E[w | x_t], where
    ``model`` samples the tilt ``relative_to`` guides to; one stage of :func:`.anneal.train_annealed`.
    """
    processes = processes or Processes()
    if data is not None and (resume or data_from is not None or processes.distributed):
        raise TiltgenError("data= (samples already in memory) is for a fresh single-process run: not with resume, "
                           "data_from or several processes")
    if processes.distributed and out_dir is None:
        raise TiltgenError("training in several processes needs out_dir (they share the data through it)")
    model = as_model(model)
    reward = as_reward(reward)
    out = Path(out_dir) if out_dir is not None else None
    saved = _check_resume_dir(out, config) if resume else None
    shape = tuple(int(s) for s in shape)
    if conditions is not None and cond_encoder is None:
        raise TiltgenError("conditions were given without a cond_encoder to embed them for the network")
    embeddings = None if conditions is None else torch.cat([cond_encoder(c).reshape(1, -1) for c in conditions])

    base_model = ({"name": _describe(model), "fingerprint": model.fingerprint()}
                  if callable(getattr(model, "fingerprint", None)) else None)
    cond_names = None if conditions is None else [repr(c) for c in conditions]
    times = training_times(schedule, config.time_levels, config.spacing, config.times)

    start = time.perf_counter()
    pool: Pool | None = None
    if data is not None:
        data_wall = 0.0
    elif saved is not None:
        data, pool, data_wall = _load_saved_data(out, saved, shape)  # type: ignore[arg-type]
    elif data_from is not None:
        identity = _data_identity(config, base_model, reward_name(reward), cond_names, shape)
        data, data_wall = _reuse_data(Path(data_from), identity, shape)
    elif out is not None:
        identity = _data_identity(config, base_model, reward_name(reward), cond_names, shape)
        data, data_wall = _generate_sharded(model, schedule, reward, config, shape, conditions, out, identity,
                                            processes, progress), 0.0
    else:
        data, data_wall = _generate(model, schedule, reward, config, shape, conditions, progress), 0.0
    ess = data.ess(config.beta)
    _warn_low_ess(ess, config, processes)
    train_rows, held_rows = split_rows(data.prompt, config.val_fraction, config.seed + 4)
    shared_pool = pool is None and processes.distributed and not processes.is_main and not config.fresh_noise
    if pool is None and not shared_pool:
        pool = _make_pool(data, model, schedule, config, times, conditions, train_rows, progress)
    data_wall += time.perf_counter() - start
    if saved is not None:
        sample_flops = (saved.get("data") or {}).get("flops_per_sample")
    elif data_from is not None:
        sample_flops = _saved_sample_flops(Path(data_from))
    else:
        sample_flops = data.flops_per_sample

    s_data = float(data.x0.to(torch.float64).std()) or 1.0
    net_config = dict(config.net or default_net(shape, 0 if embeddings is None else embeddings.shape[1]))
    reference = None
    if relative_to is not None:  # start from its network (same architecture and data scale)
        reference = relative_to.potential
        net_config, s_data = dict(relative_to.record.get("net") or net_config), reference.s_data
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        potential = GuidancePotential(build_network(net_config), schedule, s_data, noise_tilt=config.noise_tilt)
    if reference is not None:
        potential.net.load_state_dict(reference.net.state_dict())
    if shared_pool:  # the main process built the pool; the others read it
        processes.wait()
        pool = Pool.from_tensors(load_file(str(out / "data.safetensors")),  # type: ignore[operator]
                                 json.loads((out / "config.json").read_text())["data"]["pool_model_evals"])  # type: ignore[operator]
    run = _Run(config, potential, pool, data, embeddings, schedule, times, train_rows, held_rows, processes,
               reference)
    full_config = {"train": config.to_json(), "net": net_config, "schedule": schedule.config(), "s_data": s_data,
                   "shape": list(shape), "prediction": model.prediction, "model": _describe(model),
                   # which base model this network belongs to (checked when it is loaded for sampling)
                   "base_model": base_model,
                   "reward": reward_name(reward),
                   # effective samples of the exp(r/beta) weights per condition (min, median over conditions)
                   "weights_ess": {"min": float(ess.min()), "median": float(ess.median()),
                                   "samples_per_condition": config.n_data},
                   # network evaluations per model call (2 for a model with classifier-free guidance)
                   "evals_per_model_call": int(model.evals_per_call()) if hasattr(model, "evals_per_call") else 1,
                   "conditions": cond_names,
                   "held_out_conditions": (None if conditions is None or config.val_fraction == 0 else
                                           [cond_names[i] for i in torch.unique(data.prompt[held_rows]).tolist()]),
                   "data": {"model_evals": data.model_evals, "reward_evals": data.reward_evals,
                            "pool_model_evals": pool.model_evals, "wall_s": data_wall,
                            "flops_per_sample": sample_flops,
                            "flops": None if sample_flops is None else sample_flops * int(data.x0.shape[0])}}
    if out is not None and saved is None and processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_tensors(out / "data.safetensors", {**data.tensors(), **(pool.tensors() if len(pool) else {})})
        write_json(out / "config.json", full_config)
        shutil.rmtree(out / SHARDS, ignore_errors=True)  # now in data.safetensors
    if processes.distributed and saved is None and not shared_pool:
        processes.wait()  # releases the processes waiting for the pool above
    if saved is not None and (out / "checkpoint.safetensors").is_file():  # type: ignore[operator]
        _restore_checkpoint(out / "checkpoint.safetensors", run)  # type: ignore[operator]
    _optimise(run, out, progress, on_step)
    potential.net.load_state_dict(run.final_weights())

    record = _record(full_config, run, data, pool, data_wall)
    if out is not None and processes.is_main:
        _write_tensors(out / "guidance.safetensors", run.final_weights())
        write_json(out / "guidance.json", record)
        write_model_card(out, record)
        plot_losses(run.losses, out / "loss.png", title=f"{record['reward']} beta={config.beta:g} ({config.loss})",
                    held_out=run.val_losses)
    guidance = LearnedGuidance(potential, cond_encoder)
    guidance.record = record
    return TrainResult(guidance, record, run.losses)


def _warn_low_ess(ess: Tensor, config: TrainConfig, processes: Processes) -> None:
    if float(ess.min()) >= LOW_ESS or not processes.is_main:
        return
    low = int((ess < LOW_ESS).sum())
    warnings.warn(f"the exp(r/beta) weights of the training data have an effective sample size of {float(ess.min()):.1f} "
                  f"(of {config.n_data} samples) on {low} of {ess.numel()} condition(s): the network learns the tilt "
                  f"there from a handful of samples and cannot reach regions the base samples never visit; raise "
                  f"n_data (--n-data) or beta (beta={config.beta:g})", stacklevel=3)


def _record(full_config: dict, run: _Run, data: GuidanceData, pool: Pool, data_wall: float) -> dict:
    tail = run.losses[-max(1, len(run.losses) // 20):]
    return {**full_config, "beta": run.config.beta, "loss": run.config.loss, "eta": run.config.eta,
            "data_size": int(data.x0.shape[0]), "pool_size": len(pool), "steps": run.step,
            "final_loss": sum(tail) / len(tail),
            "held_out_loss": None if run.best_step == 0 else run.best_val, "best_step": run.best_step or run.step,
            "held_out_curve": run.val_losses,
            "train_model_evals": data.model_evals + pool.model_evals, "train_reward_evals": data.reward_evals,
            "train_wall_s": data_wall + run.train_wall,
            "train_flops_per_step": run.step_flops, "train_flops": run.step_flops * run.step,
            "tiltgen_version": tiltgen_version()}


def plot_losses(losses: Sequence[float], path: Path, title: str = "",
                held_out: Sequence[tuple[int, float]] = ()) -> Path:
    """Loss per step, its running mean and the held-out loss (step, value), as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.tensor(losses, dtype=torch.float64)
    k = max(1, len(losses) // 50)
    smooth = torch.nn.functional.avg_pool1d(values[None, None], k, 1)[0, 0] if len(losses) >= k else values
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(values.numpy(), alpha=0.3, lw=0.8, label="loss")
    ax.plot(range(k - 1, k - 1 + len(smooth)), smooth.numpy(), lw=1.5, label=f"mean of {k}")
    if held_out:
        ax.plot([s for s, _ in held_out], [v for _, v in held_out], "o-", ms=3, lw=1.2, label="held-out conditions")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return path


def load_guidance(out_dir: str | Path, cond_encoder: CondEncoder | None = None,
                  scale: float | None = None, record: dict[str, Any] | None = None) -> LearnedGuidance:
    """The trained estimator saved in ``out_dir`` (guidance.json + guidance.safetensors);
    ``record``: its guidance.json when the caller has already read it.

    ``scale=None``: the scale recorded by ``tiltgen calibrate-guidance`` (``calibration.scale``
    in guidance.json), else 1 (the network's own estimate of the tilt)."""
    out = Path(out_dir)
    record = read_guidance_record(out) if record is None else record
    net = build_network(record["net"])
    net.load_state_dict(load_file(str(out / "guidance.safetensors")))
    potential = GuidancePotential(net, schedule_from_config(record["schedule"]), record["s_data"],
                                  noise_tilt=bool(record.get("train", {}).get("noise_tilt", False)))
    if scale is None:
        scale = float((record.get("calibration") or {}).get("scale", 1.0))
    guidance = LearnedGuidance(potential, cond_encoder, scale)
    guidance.record = record
    return guidance

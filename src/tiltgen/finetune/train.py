"""``finetune``: one loop for the three baselines, with budgets, checkpoints and resume.

Output folder ``out`` (files written atomically)::

    config.json           the run's FinetuneConfig, base model, reward and prompts
    .work/pool.safetensors   base samples and rewards (rwdsm, dpo), written per prompt
    .work/checkpoint.pt   trainable weights, optimiser, step, log, accumulated compute
    log.jsonl             one line per step: loss (and the batch's mean reward for draft)
    step-XXXXXX/          a pipeline folder at each budget
    model_index.json ...  the final pipeline (``out`` itself loads in diffusers)
    finetune.json         the record: compute per stage (FLOPs, wall, peak memory), budgets
    loss.png              the loss curve (and the reward curve of draft)

Every step draws its minibatch, times and noise from a generator seeded by (seed, step),
so a resumed run continues exactly where the killed one stopped. Under torchrun / accelerate
launch each process takes every N-th row of that minibatch and the gradients are averaged, so
N processes take the same steps as one; the main process writes every file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..backends.diffusers import DiffusersBackend
from ..backends.diffusers.loading import resolve_model_path
from ..core.compute import measure, peak_memory
from ..core.distributed import Processes, average_gradients
from ..core.files import atomic_write, write_json
from ..core.reward import as_reward, reward_name
from ..errors import TiltgenError
from .config import FinetuneConfig, differing_keys
from .data import BasePool, base_pool
from .losses import dpo_loss, draft_loss, dsm_loss
from .weights import TrainableDenoiser, write_pipeline

STEP_SEED_STRIDE = 1_000_033


def _check_inputs(backend: Any, config: FinetuneConfig, reward: Any, prompts: Sequence[str]) -> None:
    if not prompts:
        raise TiltgenError("fine-tuning needs at least one prompt")
    backend.check_prompts(list(prompts))
    if config.method == "draft" and not getattr(reward, "differentiable", False):
        raise TiltgenError(f"draft back-propagates the reward, but reward {reward_name(reward)!r} is not "
                           "differentiable; use rwdsm or dpo, which need reward values only")
    if config.method in ("rwdsm", "dpo") and backend.default_steps <= 1:
        raise TiltgenError(f"{config.method} trains a multi-step denoiser, but {backend.name} is a one-step "
                           "generator (default steps 1); use --method draft (direct reward fine-tuning)")


def _prepare_out(out: Path, wanted: dict[str, Any], resume: bool) -> None:
    saved_path = out / "config.json"
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        if not resume:
            raise TiltgenError(f"{out} already holds a fine-tuning run; pass --resume to continue it, "
                               "or choose another --out")
        diff = differing_keys(saved, wanted)
        if diff:
            raise TiltgenError(f"cannot resume {out}: the configuration differs in {', '.join(diff)}")
    elif out.exists() and any(out.iterdir()):
        raise TiltgenError(f"{out} exists and is not a fine-tuning run folder; choose an empty or new --out")
    (out / ".work").mkdir(parents=True, exist_ok=True)
    write_json(saved_path, wanted)


class _Step:
    """One optimiser step of ``config.method``; returns (loss, mean reward or None)."""

    def __init__(self, model: Any, trainable: TrainableDenoiser, config: FinetuneConfig, prompts: list[str],
                 reward: Any, pool: BasePool | None, steps: int, processes: Processes):
        self.model, self.trainable, self.config, self.prompts = model, trainable, config, prompts
        self.pool, self.steps = pool, steps
        # the minibatch's rows are cut into world_size x grad_accum equal parts; part j is rows j, j + P, ...
        self.parts = processes.world_size * config.grad_accum
        self.first_part = processes.rank * config.grad_accum
        self.latent_reward = model.latent_reward(reward)
        family = model.backend.family
        # training conditions are the prompts alone: no CFG (FLUX keeps its embedded guidance)
        self.train_cond = model.encode(prompts, guidance_scale=None if family == "flux" else 1.0)
        if pool is not None:
            self.weights = pool.weights(config.beta)

    def _times(self, n: int, g: torch.Generator) -> torch.Tensor:
        return self.config.t_min + (1 - self.config.t_min) * torch.rand(n, generator=g, dtype=torch.float64)

    def __call__(self, step: int, micro: int = 0) -> tuple[torch.Tensor, float | None]:
        """Loss (mean over micro-batch ``micro`` of this process's rows of step ``step``'s
        minibatch) and the mean reward of those rows (draft)."""
        g = torch.Generator().manual_seed(self.config.seed * STEP_SEED_STRIDE + step)
        b, dev = self.config.batch_size, self.model.backend.device
        mine = slice(self.first_part + micro, None, self.parts)
        if self.config.method == "draft":
            which = torch.randint(len(self.prompts), (b,), generator=g).tolist()[mine]
            seeds = torch.randint(2**31 - 1, (b,), generator=g).tolist()[mine]
            cond = self.model.encode([self.prompts[i] for i in which])
            loss, r = draft_loss(self.model, self.trainable.reference, self.latent_reward, cond,
                                 self.model.initial_latents(seeds), self.model.times(self.steps),
                                 self.config.draft_k, self.config.beta, self.config.reg)
            return loss, float(r.mean())
        pool = self.pool
        assert pool is not None
        if self.config.method == "rwdsm":
            rows = torch.multinomial(self.weights, b, replacement=True, generator=g)
            t = self._times(b, g)
            eps = torch.randn(pool.latents[rows].shape, generator=g)
            rows, t, eps = rows[mine], t[mine], eps[mine]
            return dsm_loss(self.model, pool.latents[rows].to(dev), self.train_cond.select(pool.prompt[rows]),
                            t.to(dev), eps.to(dev)), None
        which = torch.randint(len(self.prompts), (b,), generator=g)
        a, c = [], []
        for p in which.tolist():
            rows = pool.rows_of(p)
            pick = torch.randperm(len(rows), generator=g)[:2]
            a.append(rows[pick[0]])
            c.append(rows[pick[1]])
        a, c = torch.stack(a), torch.stack(c)
        t = self._times(b, g)
        eps = torch.randn(pool.latents[a].shape, generator=g)
        a, c, which, t, eps = a[mine], c[mine], which[mine], t[mine].to(dev), eps[mine].to(dev)
        p_a = torch.sigmoid((pool.reward[a] - pool.reward[c]) / self.config.beta).float().to(dev)
        x_a, x_c = pool.latents[a].to(dev), pool.latents[c].to(dev)
        return dpo_loss(self.model, self.trainable.reference, x_a, x_c, self.train_cond.select(which), t, eps,
                        p_a, self.config.dpo_scale), None


def finetune(model: str | os.PathLike, reward: Any, prompts: Sequence[str], config: FinetuneConfig,
             out: str | os.PathLike, *, resume: bool = False, progress: bool = True, device: str = "cpu",
             dtype: torch.dtype | None = None, cache_dir: str | None = None,
             gradient_checkpointing: bool = False, processes: Processes | None = None) -> dict[str, Any]:
    """Fine-tune the pipeline folder (or built-in / cached model) ``model`` and write pipeline
    folders to ``out`` (see the module docstring). Returns the record saved as finetune.json.
    ``processes`` (from ``core.distributed.join_processes``): split each minibatch between them."""
    processes = processes or Processes(device=device)
    if config.batch_size % processes.world_size:
        raise TiltgenError(f"--batch-size {config.batch_size} does not split evenly over {processes.world_size} "
                           "processes")
    prompts = [str(p) for p in prompts]
    reward = as_reward(reward)
    out = Path(out)
    base = resolve_model_path(str(model), cache_dir=cache_dir)
    backend = DiffusersBackend.from_pretrained(str(model), device=device, dtype=dtype, cache_dir=cache_dir,
                                               gradient_checkpointing=gradient_checkpointing)
    _check_inputs(backend, config, reward, prompts)
    wanted = {"config": config.to_json(), "base_model": str(model), "reward": reward_name(reward), "prompts": prompts}
    if processes.is_main:
        _prepare_out(out, wanted, resume)
    processes.wait()
    latent = backend.at(config.height, config.width, guidance_scale=config.cfg)
    steps = config.data_steps or backend.default_steps
    pool = None
    if config.method in ("rwdsm", "dpo"):
        def make_pool() -> BasePool:
            return base_pool(latent, prompts, reward, n=config.samples_per_prompt, seed=config.seed, steps=steps,
                             path=out / ".work" / "pool.safetensors", progress=progress and processes.is_main)

        pool = make_pool() if processes.is_main else None
        processes.wait()
        if pool is None:
            pool = make_pool()  # the others read the main process's finished pool
    trainable = TrainableDenoiser(backend, config.lora_rank)
    optimiser = torch.optim.AdamW(trainable.parameters(), lr=config.lr, weight_decay=0.0)
    scaler = loss_scaler(config.mixed_precision, processes.device)
    state = {"step": 0, "log": [], "train_wall_s": 0.0, "flops_per_step": 0, "peak_mem_bytes": 0, "written": []}
    ckpt = out / ".work" / "checkpoint.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        trainable.load_state_dict(saved["trainable"])
        optimiser.load_state_dict(saved["optimiser"])
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        if processes.is_main:
            print(f"resumed from step {state['step']} of {config.steps}")
    one_step = _Step(latent, trainable, config, prompts, reward, pool, steps, processes)

    def checkpoint() -> None:
        if not processes.is_main:
            return
        atomic_write(ckpt, lambda p: torch.save({"trainable": trainable.state_dict(),
                                                 "optimiser": optimiser.state_dict(), "scaler": scaler.state_dict(),
                                                 "state": state}, p))

    def record() -> dict[str, Any]:
        return _record(config, wanted, state, pool, trainable, backend)

    bar = tqdm(total=config.steps, initial=state["step"], desc=f"finetune {config.method}",
               disable=not (progress and processes.is_main), dynamic_ncols=True)
    while state["step"] < config.steps:
        step = state["step"]

        def train_step() -> tuple[float, float | None]:
            optimiser.zero_grad(set_to_none=True)
            total, rewards = torch.zeros(()), []
            for micro in range(config.grad_accum):  # gradients add up over the micro-batches
                with autocast(config.mixed_precision, processes.device):
                    loss, r = one_step(step, micro)
                if not torch.isfinite(loss):
                    raise TiltgenError(f"non-finite loss at step {step}; lower --lr")
                scaler.scale(loss / config.grad_accum).backward()
                total += loss.detach().float().cpu() / config.grad_accum
                rewards += [] if r is None else [r]
            r = sum(rewards) / len(rewards) if rewards else None
            # every process holds the same scale, so the averaged gradients stay consistently scaled
            loss, mean_r = average_gradients(trainable.parameters(), [total, 0.0 if r is None else r], processes)
            r = None if r is None else mean_r
            scaler.unscale_(optimiser)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
            scaler.step(optimiser)  # skipped (and the scale lowered) when fp16 gradients overflowed
            scaler.update()
            return loss, r

        cost = measure(train_step, count_flops=state["flops_per_step"] == 0, device=processes.device)
        loss, r = cost.value
        if state["flops_per_step"] == 0:
            state["flops_per_step"] = cost.flops * processes.world_size  # every process does an equal share
        state["train_wall_s"] += cost.wall_s
        state["peak_mem_bytes"] = max(state["peak_mem_bytes"], cost.peak_mem_bytes)
        state["log"].append({"step": step + 1, "loss": loss, **({} if r is None else {"reward": r})})
        state["step"] = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", **({} if r is None else {"reward": f"{r:.3f}"}))
        at_budget = state["step"] in config.budgets and state["step"] < config.steps
        if at_budget and processes.is_main:
            folder = out / f"step-{state['step']:06d}"
            write_pipeline(base, folder, backend, trainable, {**record(), "steps_done": state["step"]})
            state["written"].append(folder.name)
        if at_budget or state["step"] % config.checkpoint_every == 0 or state["step"] == config.steps:
            checkpoint()
    bar.close()
    final = record()
    if not processes.is_main:
        return final
    write_pipeline(base, out, backend, trainable, {**final, "steps_done": state["step"]})
    (out / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in state["log"]))
    _plot(state["log"], out / "loss.png", f"{config.method}, beta {config.beta}, {reward_name(reward)}")
    write_json(out / "finetune.json", final)
    return final


def loss_scaler(mixed_precision: str, device: str) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaling (small gradients would underflow in half precision); a
    pass-through scaler for bf16 and float32."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=mixed_precision == "fp16")


def autocast(mixed_precision: str, device: str) -> Any:
    """The forward passes' autocast context for ``mixed_precision`` (no, bf16, fp16)."""
    import contextlib

    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _record(config: FinetuneConfig, wanted: dict[str, Any], state: dict[str, Any], pool: BasePool | None,
            trainable: TrainableDenoiser, backend: Any) -> dict[str, Any]:
    data = {"samples": 0, "model_evals": 0, "flops": 0, "wall_s": 0.0}
    if pool is not None:
        data = {"samples": int(pool.latents.shape[0]), "model_evals": pool.model_evals, "flops": pool.flops,
                "wall_s": pool.wall_s}
    train = {"steps": state["step"], "flops_per_step": state["flops_per_step"],
             "flops": state["flops_per_step"] * state["step"], "wall_s": state["train_wall_s"],
             "peak_mem_bytes": state["peak_mem_bytes"], "trainable_parameters": trainable.num_trainable(),
             "lora_rank": config.lora_rank}
    return {"method": config.method, "beta": config.beta, "base_model": wanted["base_model"],
            "reward": wanted["reward"], "prompts": len(wanted["prompts"]), "config": config.to_json(),
            "compute": {"data": data, "train": train, "total_flops": data["flops"] + train["flops"]},
            "budgets": list(state["written"]), "peak_mem_bytes": max(state["peak_mem_bytes"],
                                                                     peak_memory(backend.device))}


def _plot(log: list[dict[str, Any]], path: Path, title: str) -> None:
    """The loss curve, and for draft the batch's mean reward beside it."""
    from ..tilt.learned.train import plot_losses

    plot_losses([row["loss"] for row in log], path, title)
    rewards = [row["reward"] for row in log if "reward" in row]
    if rewards:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        axes[0].plot([row["loss"] for row in log], lw=0.8)
        axes[0].set_title("loss", fontsize=9)
        axes[1].plot(rewards, lw=0.8, color="C2")
        axes[1].set_title("batch mean reward", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)

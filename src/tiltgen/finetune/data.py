"""Base samples with rewards: the offline data of ``rwdsm`` and ``dpo``.

Sample i of prompt p has the seed ``seed * SEED_STRIDE + p * n + i``, so the pool does not
depend on the batch size and a killed run resumes after the last prompt it finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..core.compute import measure
from ..core.files import atomic_write, read_tensors
from ..core.reward import evaluate_reward
from ..tilt.learned.data import tilt_weights

SEED_STRIDE = 1_000_003


@dataclass
class BasePool:
    """``latents`` [N, C, h, w] (canonical x0), ``reward`` [N] float64, ``prompt`` [N] index
    into ``prompts``; the compute it took (FLOPs of one prompt's batch, scaled to all)."""

    latents: Tensor
    reward: Tensor
    prompt: Tensor
    prompts: list[str]
    model_evals: int
    flops: int
    wall_s: float

    def weights(self, beta: float) -> Tensor:
        """exp(r / beta) normalised to mean 1 within each prompt [N] (float64)."""
        return tilt_weights(self.reward, self.prompt, beta)

    def rows_of(self, p: int) -> Tensor:
        return torch.nonzero(self.prompt == p).flatten()


def sample_seeds(seed: int, p: int, n: int) -> list[int]:
    return [seed * SEED_STRIDE + p * n + i for i in range(n)]


def _save(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p),
                                           metadata={"meta": json.dumps(meta)}))


def _load(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, metadata = read_tensors(path)
    return tensors, json.loads(metadata["meta"])


def base_pool(model: Any, prompts: Sequence[str], reward: Any, *, n: int, seed: int, steps: int,
              path: Path | None = None, progress: bool = True, chunk: int = 64) -> BasePool:
    """``n`` base samples per prompt of the latent ``model`` (its default CFG), scored by
    ``reward`` on decoded images; saved to ``path`` after every prompt and resumed from it."""
    latent_reward = model.latent_reward(reward)
    lat, rew, idx = [], [], []
    meta = {"done": 0, "flops_per_sample": 0, "wall_s": 0.0, "evals_per_sample": 0}
    if path is not None and path.is_file():
        saved, meta = _load(path)
        lat, rew, idx = [saved["latents"]], [saved["reward"]], [saved["prompt"]]
    bar = tqdm(total=len(prompts) * n, initial=meta["done"] * n, desc="base samples", disable=not progress,
               dynamic_ncols=True)
    for p in range(meta["done"], len(prompts)):
        seeds = sample_seeds(seed, p, n)
        for start in range(0, n, chunk):
            part = seeds[start:start + chunk]

            def draw() -> tuple[Tensor, Tensor, bool]:
                cond = model.encode([prompts[p]] * len(part))
                x0 = model.sample(cond, seeds=part, steps=steps, decode=False).latents
                with torch.no_grad():
                    return x0, evaluate_reward(latent_reward, x0, cond.prompts).detach().double(), cond.uses_cfg

            cost = measure(draw, count_flops=meta["flops_per_sample"] == 0)
            x0, r, uses_cfg = cost.value
            if meta["flops_per_sample"] == 0:
                meta["flops_per_sample"] = cost.flops // len(part)
                meta["evals_per_sample"] = (2 if uses_cfg else 1) * steps
            meta["wall_s"] += cost.wall_s
            lat.append(x0.detach().float().cpu())
            rew.append(r.cpu())
            idx.append(torch.full((len(part),), p, dtype=torch.long))
            bar.update(len(part))
        meta["done"] = p + 1
        if path is not None:
            _save(path, {"latents": torch.cat(lat), "reward": torch.cat(rew), "prompt": torch.cat(idx)}, meta)
    bar.close()
    total = len(prompts) * n
    return BasePool(torch.cat(lat), torch.cat(rew), torch.cat(idx), list(prompts),
                    model_evals=total * meta["evals_per_sample"], flops=total * meta["flops_per_sample"],
                    wall_s=meta["wall_s"])

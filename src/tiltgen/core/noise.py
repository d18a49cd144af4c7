"""Per-sample seeding: a sample's noise depends on its own seed, never on its batch.

Each sample owns a ``torch.Generator`` seeded with its seed; the initial noise and every
stochastic step's noise are drawn from it in order. Sample i with seed s therefore gets the
same trajectory whether it is generated alone or inside any batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import TiltgenError


class SeededNoise:
    """Draws standard normal noise of shape [N, *shape], row i from generator seeds[i]."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise TiltgenError("need at least one seed")
        self.seeds = seeds
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self._generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def __call__(self) -> Tensor:
        # Drawn on CPU in float32 then cast, so results match across devices and dtypes.
        rows = [torch.randn(self.shape, generator=g) for g in self._generators]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)


def seeds_for(n: int, seed: int) -> list[int]:
    """The default seeds of a run of ``n`` samples with base ``seed``: seed, seed+1, ..."""
    if n < 1:
        raise TiltgenError(f"number of samples must be >= 1, got {n}")
    return [seed + i for i in range(n)]

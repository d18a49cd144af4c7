"""Compute accounting: FLOPs (``torch.utils.flop_counter.FlopCounterMode``), wall time and
peak memory of one piece of work, so every stage of a method can be priced the same way."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Measured:
    """What one call cost: ``flops`` (forward and backward matmuls/convolutions/attention as
    counted by FlopCounterMode), ``wall_s``, ``peak_mem_bytes`` (GPU: peak allocated during
    the call; CPU: the process's peak resident size so far)."""

    value: Any
    flops: int
    wall_s: float
    peak_mem_bytes: int


def peak_memory(device: torch.device | str | None = None) -> int:
    """Peak memory in bytes: the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: only the total is read here, and the tracker's
    multi-grad hooks on module inputs make ``torch.autograd.grad(..., inputs=leaf)`` inside the
    counted work fail ("A leaf node was passed to _will_engine_execute_node"), which is how a
    guidance network takes its input gradient for the consistency loss."""

    parents = {"Global"}

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def measure(fn: Callable[[], Any], *, count_flops: bool = True, device: torch.device | str | None = None
            ) -> Measured:
    """Run ``fn()`` once and report its FLOPs, wall time and peak memory."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
        with counter:
            value = fn()
        flops = int(counter.get_total_flops())
    else:
        value, flops = fn(), 0
    if cuda:
        torch.cuda.synchronize(device)
    return Measured(value, flops, time.perf_counter() - start, peak_memory(device))

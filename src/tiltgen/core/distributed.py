"""Processes of one job: a plain process, or several launched by ``torchrun`` / ``accelerate launch``.

Several processes are joined through ``accelerate``'s ``PartialState`` (NCCL on GPUs, gloo on
CPUs); a plain process needs no ``accelerate`` at all. Each process also gets its share of the
machine's cores, so N processes on one machine do not oversubscribe it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from ..errors import TiltgenError

THREADS_ENV = "TILTGEN_THREADS"


@dataclass
class Processes:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_world_size`` on this
    machine, and the ``device`` it computes on."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: str = "cpu"
    state: Any = None  # accelerate's PartialState when there are several processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def mine(self, items: list) -> list:
        """The items this process handles: every ``world_size``-th, starting at ``rank``."""
        return items[self.rank::self.world_size]


def launched_processes() -> int:
    """The number of processes the launcher started (1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_processes(device: str | None = None) -> Processes:
    """This process's :class:`Processes`; under a launcher with several processes, joins them.

    ``device`` None picks the launcher's device for this process (``cuda:<local rank>`` when
    GPUs are there), else the CPU; an explicit device is kept.
    """
    if launched_processes() <= 1:
        return Processes(device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from accelerate import PartialState

    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(state.num_processes)))
    return Processes(rank=state.process_index, world_size=state.num_processes, local_world_size=local,
                     device=device or str(state.device), state=state)


def leave_processes() -> None:
    """Leave the job's process group, if this process joined one: a barrier, then the group's
    teardown. Without it a worker that finishes first exits while the others still hold gloo
    connections to it, and its unjoined gloo threads abort it at exit (SIGABRT, "terminate called
    without an active exception"), failing a run whose work was done."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def launch_config() -> dict[str, Any]:
    """What ``accelerate launch`` passes down from its config file or flags to every process:
    ``mixed_precision`` ("no", "bf16", "fp16") and ``grad_accum`` (gradient accumulation steps),
    each only when the launcher set it (``ACCELERATE_MIXED_PRECISION``,
    ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``). A command's own flags take precedence."""
    out: dict[str, Any] = {}
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if mixed:
        if mixed not in ("no", "bf16", "fp16"):
            raise TiltgenError(f"the accelerate launch configuration asks for mixed precision {mixed!r}; tiltgen "
                               "supports no, bf16 and fp16")
        out["mixed_precision"] = mixed
    steps = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "").strip()
    if steps and steps != "auto":
        out["grad_accum"] = int(steps)
    return out


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_process(local_world_size: int, requested: int | None = None) -> int:
    """Intra-op threads for one of ``local_world_size`` processes on this machine: ``requested``
    (or $TILTGEN_THREADS, or $OMP_NUM_THREADS, which launchers such as torchrun set) when given,
    else this machine's cores / processes."""
    if requested is None and os.environ.get(THREADS_ENV):
        requested = int(os.environ[THREADS_ENV])
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        requested = int(os.environ["OMP_NUM_THREADS"])
    if requested is not None:
        return max(1, requested)
    return max(1, available_cores() // max(1, local_world_size))


def set_threads(local_world_size: int, requested: int | None = None) -> int:
    """Set torch's intra-op threads to :func:`threads_per_process`; returns the count."""
    threads = threads_per_process(local_world_size, requested)
    torch.set_num_threads(threads)
    return threads


def average_gradients(params: Iterable[torch.Tensor], values: Sequence[float], processes: Processes) -> list[float]:
    """Mean of the parameters' gradients (in place) and of the scalars ``values`` over the
    processes, in one all-reduce: the step of the whole minibatch when each process holds an equal
    share. One process: the values as they are."""
    if not processes.distributed:
        return [float(v) for v in values]
    from accelerate.utils import reduce

    params = [q for q in params if q.grad is not None]
    grad = params[0].grad
    extra = torch.tensor([float(v) for v in values], dtype=grad.dtype, device=grad.device)
    flat = reduce(torch.cat([q.grad.reshape(-1) for q in params] + [extra]), reduction="mean")
    offset = 0
    for q in params:
        q.grad.copy_(flat[offset:offset + q.grad.numel()].view_as(q.grad))
        offset += q.grad.numel()
    return [float(v) for v in flat[offset:]]

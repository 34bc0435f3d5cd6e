"""Which process this is in a training run: one process, or one of several under
``torchrun`` (NCCL on CUDA, gloo on CPU).

The main process (rank 0) writes everything a run leaves behind; work that must happen
once (a store's statistics, motion targets) is done by it first while the others wait at
a barrier, then read from its cache by the others. A process waits for the others at a
collective for ``timeout_minutes`` (default :data:`TIMEOUT_MINUTES`, long enough for that
work on a large store; NCCL's own default, 10 minutes, is not) before the run fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from ditvla.devices import device_named

T = TypeVar("T")

TIMEOUT_MINUTES = 60.0


@dataclass(frozen=True)
class Processes:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def main_first(self, work: Callable[[], T]) -> T:
        """``work()`` on the main process, then on the others (reading what it cached)."""
        if self.main:
            result = work()
        self.barrier()
        if not self.main:
            result = work()
        return result

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes."""
        if not self.distributed:
            return value
        reduced = torch.tensor([value], device=self.device)
        dist.all_reduce(reduced)
        return reduced.item() / self.world


def join_processes(device_name: str, timeout_minutes: float = TIMEOUT_MINUTES) -> Processes:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), each CUDA
    process on its local GPU; else the one process. A collective that waits longer than
    ``timeout_minutes`` for a process fails the run."""
    device = device_named(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(0, 1, device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes)
    )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Processes(dist.get_rank(), dist.get_world_size(), device)

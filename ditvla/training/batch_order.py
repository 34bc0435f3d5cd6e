"""The order in which training reads its samples, resumable at any step.

Each epoch is a seeded permutation of the dataset split across ranks; the position is
counted in samples consumed, so a run resumed from (epoch, consumed) draws exactly the
batches an uninterrupted run would have drawn, whatever the DataLoader workers had read
ahead when it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ditvla.errors import ConfigError


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, started at any position."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _mine(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        return order[self.rank :: self.world][self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._mine().tolist())

    def __len__(self) -> int:
        return len(self._mine())


class EndlessBatches:
    """Batches of ``micro_batch`` samples, epoch after epoch. Each epoch's DataLoader gets
    a generator seeded from (seed, epoch), so augmentation draws resume too."""

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochSampler,
        micro_batch: int,
        *,
        seed: int,
        num_workers: int,
    ):
        self.dataset, self.sampler, self.micro_batch = dataset, sampler, micro_batch
        self.seed, self.num_workers = seed, num_workers
        self.epoch, self.consumed = 0, 0
        self._iterator: Iterator | None = None

    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, self.consumed)
        return DataLoader(
            self.dataset,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            num_workers=self.num_workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch),
        )

    def next(self) -> dict[str, Any]:
        while True:
            if self._iterator is None:
                self._iterator = iter(self._loader())
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.consumed == 0:
                    raise ConfigError(
                        f"the dataset has {len(self.dataset)} samples per process, fewer than "
                        f"one batch of {self.micro_batch}"
                    ) from None
                self._iterator, self.epoch, self.consumed = None, self.epoch + 1, 0
                continue
            self.consumed += self.micro_batch
            return batch

    def position(self) -> dict[str, int]:
        """Where the next batch comes from (saved in checkpoints)."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def seek(self, position: dict[str, int]) -> None:
        """Continue from a saved :meth:`position`."""
        self.epoch, self.consumed = position["epoch"], position["consumed"]
        self._iterator = None

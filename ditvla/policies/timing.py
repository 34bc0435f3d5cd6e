"""Latency measurement for reports and benchmarks: alternatives timed in turn."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ditvla.devices import synchronize


def paired_median_ms(
    fns: Sequence[Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Median wall time (ms) of each function, calling them in turn ``repeats`` times after
    ``warmup`` untimed calls each, so that load changes on a shared machine hit all of them
    alike (timing one after the other lets a busy minute favour whichever ran later). On a
    CUDA ``device`` the clock is read once the device has finished each call's work (not
    when its kernels were launched)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            bucket.append((time.perf_counter() - start) * 1000)
    return [statistics.median(bucket) for bucket in times]

"""Normalization statistics of a replay buffer.

Statistics per data key: ``mean``, ``std``, ``min``, ``max``, ``q01``, ``q99`` over every
frame (per channel for cameras, in [0, 1] units, from an evenly spaced subsample of
frames). They are computed once and stored in the store's attributes under ``stats``,
tagged with the frame count they describe; appending an episode drops them, and the next
reader recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ditvla.contract import STAT_NAMES, Stats
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.store_index import is_url

MAX_IMAGE_FRAMES_FOR_STATS = 512


def _array_stats(values: np.ndarray) -> dict[str, list[float]]:
    """Per-feature statistics of (N, ...) values, reduced over every axis but the last."""
    flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
    q01, q99 = np.quantile(flat, [0.01, 0.99], axis=0)
    return {
        "mean": flat.mean(0).tolist(),
        "std": flat.std(0).tolist(),
        "min": flat.min(0).tolist(),
        "max": flat.max(0).tolist(),
        "q01": q01.tolist(),
        "q99": q99.tolist(),
    }


def compute_stats(buffer: ReplayBuffer, keys: Sequence[str] | None = None) -> Stats:
    """Statistics of ``data/<key>`` for every key (default: all arrays of the store)."""
    stats: Stats = {}
    for key in keys or buffer.keys:
        if buffer.n_frames == 0:
            continue
        if key in buffer.cameras:
            count = min(buffer.n_frames, MAX_IMAGE_FRAMES_FOR_STATS)
            frames = np.linspace(0, buffer.n_frames - 1, count).astype(np.int64)
            values = buffer.read_frames(key, frames).astype(np.float32) / 255.0
        else:
            values = buffer.read_all(key)
            if values.ndim == 1:
                values = values[:, None]
        stats[key] = _array_stats(values)
    return stats


def _fits(cached: Any, buffer: ReplayBuffer) -> bool:
    return (
        isinstance(cached, dict)
        and cached.get("n_frames") == buffer.n_frames
        and set(cached.get("keys", {})) >= set(buffer.keys)
    )


def stats_cache_file(location: str) -> Path:
    """Where the statistics of a store by URL are kept on this machine: one file per URL
    under ``$DITVLA_CACHE`` (default ``~/.cache/ditvla``), shared by every run."""
    root = Path(os.environ.get("DITVLA_CACHE", Path.home() / ".cache" / "ditvla"))
    return root / "stats" / f"{hashlib.sha256(location.encode()).hexdigest()[:24]}.json"


def load_or_compute_stats(buffer: ReplayBuffer) -> Stats:
    """The store's statistics, computed and saved with the store the first time (for a
    store by URL, which opens read-only, in a file on this machine instead)."""
    cached = buffer.attrs.get("stats")
    if _fits(cached, buffer):
        return cached["keys"]
    if is_url(buffer.path):
        cache = stats_cache_file(buffer.path)
        if cache.exists() and _fits(cached := json.loads(cache.read_text()), buffer):
            return cached["keys"]
        stats = compute_stats(buffer)
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps({"n_frames": buffer.n_frames, "keys": stats}))
        os.replace(partial, cache)
        return stats
    stats = compute_stats(buffer)
    if buffer.writable:
        buffer.set_attrs(stats={"n_frames": buffer.n_frames, "keys": stats})
    else:
        try:
            ReplayBuffer.open(buffer.path, mode="a").set_attrs(
                stats={"n_frames": buffer.n_frames, "keys": stats}
            )
        except Exception as exc:  # read-only medium, zarr v2 store: keep them in memory
            warnings.warn(
                f"{buffer.path}: normalization statistics not saved ({exc})", stacklevel=2
            )
    return stats


def concat_stats(parts: Sequence[Mapping[str, list[float]]]) -> dict[str, list[float]]:
    """Statistics of features concatenated along the last axis (e.g. a composed state)."""
    return {name: [v for part in parts for v in part[name]] for name in STAT_NAMES}

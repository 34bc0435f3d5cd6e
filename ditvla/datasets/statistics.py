"""Normalization statistics of a replay buffer.

Statistics per data key: ``mean``, ``std``, ``min``, ``max``, ``q01``, ``q99`` over every
frame (per channel for cameras, in [0, 1] units, from an evenly spaced subsample of
frames). They are computed once and stored in the store's attributes under ``stats``,
tagged with the frame count they describe; appending an episode drops them, and the next
reader recomputes them. A store by URL opens read-only: its statistics are kept in its
cache folder instead (:func:`~ditvla.datasets.url_stores.cache_folder`: a training run's
``<out>/cache``, else this machine's ``$DITVLA_CACHE``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ditvla.contract import STAT_NAMES, Stats
from ditvla.datasets.errors import DatasetError
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.store_layout import valid_mask_key
from ditvla.datasets.url_stores import cache_folder, is_url

MAX_IMAGE_FRAMES_FOR_STATS = 512


def _array_stats(values: np.ndarray, valid: np.ndarray | None = None) -> dict[str, list[float]]:
    """Per-feature statistics of (N, ...) values, reduced over every axis but the last;
    only over the entries ``valid`` marks (a padded array's real columns) when given."""
    flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
    if valid is not None:
        valid = valid.reshape(flat.shape)
        if not valid.any(0).all():
            raise DatasetError(
                f"columns {np.flatnonzero(~valid.any(0)).tolist()} are marked padding in "
                "every frame"
            )
        flat = np.where(valid, flat, np.nan)
    q01, q99 = np.nanquantile(flat, [0.01, 0.99], axis=0)
    return {
        "mean": np.nanmean(flat, 0).tolist(),
        "std": np.nanstd(flat, 0).tolist(),
        "min": np.nanmin(flat, 0).tolist(),
        "max": np.nanmax(flat, 0).tolist(),
        "q01": q01.tolist(),
        "q99": q99.tolist(),
    }


def compute_stats(buffer: ReplayBuffer, keys: Sequence[str] | None = None) -> Stats:
    """Statistics of ``data/<key>`` for every key (default: all arrays of the store); a
    padded privileged array's over its real columns only (its ``valid_mask_key`` array)."""
    stats: Stats = {}
    for key in keys or buffer.keys:
        if buffer.n_frames == 0:
            continue
        valid = None
        if key in buffer.cameras:
            count = min(buffer.n_frames, MAX_IMAGE_FRAMES_FOR_STATS)
            frames = np.linspace(0, buffer.n_frames - 1, count).astype(np.int64)
            values = buffer.read_frames(key, frames).astype(np.float32) / 255.0
        else:
            values = buffer.read_all(key)
            if values.ndim == 1:
                values = values[:, None]
            if valid_mask_key(key) in buffer.keys:
                valid = buffer.read_all(valid_mask_key(key))
        try:
            stats[key] = _array_stats(values, valid)
        except DatasetError as exc:
            raise DatasetError(f"{buffer.path}: data/{key}: {exc}") from None
    return stats


def _fits(cached: Any, buffer: ReplayBuffer) -> bool:
    return (
        isinstance(cached, dict)
        and cached.get("n_frames") == buffer.n_frames
        and set(cached.get("keys", {})) >= set(buffer.keys)
    )


def _stats_kept_in(cache: Path, buffer: ReplayBuffer) -> Stats:
    """The statistics of ``buffer`` (a store by URL) kept in the file ``cache``, computed
    and written there (atomically) when it is missing or describes other frames."""
    if cache.exists() and _fits(cached := json.loads(cache.read_text()), buffer):
        return cached["keys"]
    stats = compute_stats(buffer)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps({"url": buffer.path, "n_frames": buffer.n_frames, "keys": stats}))
    os.replace(partial, cache)
    return stats


def load_or_compute_stats(buffer: ReplayBuffer, cache_dir: str | Path | None = None) -> Stats:
    """The store's statistics, computed and saved with the store the first time; for a
    store by URL, which opens read-only, in its cache folder under ``cache_dir`` (a
    training run's ``<out>/cache``; default: this machine's ``$DITVLA_CACHE``)."""
    cached = buffer.attrs.get("stats")
    if _fits(cached, buffer):
        return cached["keys"]
    if is_url(buffer.path):
        return _stats_kept_in(cache_folder(buffer.path, cache_dir) / "stats.json", buffer)
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

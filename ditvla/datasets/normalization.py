"""Normalization statistics of a replay buffer, and the module that applies them.

Statistics per data key: ``mean``, ``std``, ``min``, ``max``, ``q01``, ``q99`` over every
frame (per channel for cameras, in [0, 1] units, from an evenly spaced subsample of
frames). They are computed once and stored in the store's attributes under ``stats``,
tagged with the frame count they describe; appending an episode drops them, and the next
reader recomputes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from ditvla.datasets.replay_buffer import ReplayBuffer

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
MAX_IMAGE_FRAMES_FOR_STATS = 512

Stats = dict[str, dict[str, list[float]]]
NormMode = Literal["mean_std", "min_max", "quantile", "identity"]


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


def load_or_compute_stats(buffer: ReplayBuffer) -> Stats:
    """The store's statistics, computed and saved with the store the first time."""
    cached = buffer.attrs.get("stats")
    if (
        cached
        and cached.get("n_frames") == buffer.n_frames
        and set(cached["keys"]) >= set(buffer.keys)
    ):
        return cached["keys"]
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


class Normalizer(nn.Module):
    """Maps features to a normalized range and back, with statistics kept as buffers.

    Modes: ``mean_std`` (zero mean, unit variance), ``min_max`` and ``quantile`` (the
    [min, max] or [q01, q99] range to [-1, 1]; ``quantile`` clips outliers to [-1.5, 1.5]
    on the way in), ``identity``. Features whose spread is ~0 pass through centred.
    The buffers travel with ``state_dict``, so a saved policy carries its statistics.
    """

    def __init__(
        self, stats: Mapping[str, Mapping[str, Sequence[float]]], modes: Mapping[str, NormMode]
    ):
        super().__init__()
        self.modes = dict(modes)
        for key, mode in self.modes.items():
            if mode == "identity":
                continue
            if key not in stats:
                raise KeyError(f"no statistics for {key!r} (have: {', '.join(stats)})")
            s = {name: torch.tensor(stats[key][name], dtype=torch.float32) for name in STAT_NAMES}
            if mode == "mean_std":
                center, scale = s["mean"], s["std"]
            elif mode == "min_max":
                center, scale = (s["max"] + s["min"]) / 2, (s["max"] - s["min"]) / 2
            elif mode == "quantile":
                center, scale = (s["q99"] + s["q01"]) / 2, (s["q99"] - s["q01"]) / 2
            else:
                raise ValueError(f"unknown normalization mode {mode!r} for {key!r}")
            scale = torch.where(scale < 1e-6, torch.ones_like(scale), scale)
            self.register_buffer(self._name(key, "center"), center)
            self.register_buffer(self._name(key, "scale"), scale)

    @staticmethod
    def _name(key: str, what: str) -> str:
        return f"{key.replace('.', '__')}__{what}"

    def _center_scale(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self._name(key, "center")), getattr(self, self._name(key, "scale"))

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        mode = self.modes.get(key, "identity")
        if mode == "identity":
            return x
        center, scale = self._center_scale(key)
        y = (x - center) / scale
        return y.clamp(-1.5, 1.5) if mode == "quantile" else y

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        if self.modes.get(key, "identity") == "identity":
            return y
        center, scale = self._center_scale(key)
        return y * scale + center

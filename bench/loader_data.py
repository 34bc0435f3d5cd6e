"""What the loader benches share: a store of camera-like episodes, the DataLoader they
time, and how they time it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

CAMERAS = ("agentview", "wrist")


def add_loader_arguments(parser: argparse.ArgumentParser, batches: int) -> None:
    """The store and loader options every loader bench takes (``batches``: the default
    number of timed batches per loader)."""
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--length", type=int, default=120, help="frames per episode")
    parser.add_argument("--size", type=int, default=128, help="camera side in pixels")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for each")
    parser.add_argument("--batches", type=int, default=batches, help="timed batches per loader")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", help="where to write the stores (default: a temp dir)")


def smooth_frames(length: int, seed: int, size: int) -> np.ndarray:
    """Moving gradients with a drifting blob: camera-like content video codecs expect."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None, None]
    phase = rng.uniform(0, 6.28, 3)
    cx = size / 2 + size / 4 * np.sin(t / 15 + phase[0])
    blob = 90 * np.exp(-((xx - cx) ** 2 + (yy - size / 2) ** 2) / (2 * (size / 10) ** 2))
    channels = [
        100 + 50 * np.sin((xx + 2 * t) / 11 + phase[c]) + 30 * np.cos(yy / 9 + c) + blob
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def write_episodes(path: Path, episodes: int, length: int, size: int) -> None:
    from ditvla.datasets.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.create(path, fps=10, cameras=CAMERAS, overwrite=True)
    rng = np.random.default_rng(0)
    for e in range(episodes):
        buffer.append_episode(
            {
                "agentview": smooth_frames(length, 2 * e, size),
                "wrist": smooth_frames(length, 2 * e + 1, size),
                "state": rng.normal(size=(length, 9)),
                "action": rng.normal(size=(length, 7)),
            },
            task=f"task {e % 5}",
            instruction=f"do task {e % 5}",
        )


def loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """Shuffled batches, as training reads them, through ``workers`` processes."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def samples_per_second(loader: DataLoader, batches: int, warmup: int = 3) -> float:
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    count = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        count += len(batch["action"])
    return count / (time.perf_counter() - start)

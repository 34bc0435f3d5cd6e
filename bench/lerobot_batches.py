"""Our data in LeRobot's shapes: batches and statistics under LeRobot's feature names.

Every LeRobot peer in the benches (SmolVLA, DiffusionPolicy behind our evaluator) reads
the same samples our policy reads; converting them in one place keeps the comparison on
the same data: the same frames, state and instruction, only renamed and rescaled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def lerobot_batch(images: dict[str, Any], state: Any, tasks: list[str] | None = None) -> dict:
    """Our arrays -> LeRobot's keys: ``observation.images.<cam>`` float [0, 1] (B, [T,] 3,
    H, W) from uint8 (B, [T,] H, W, 3), ``observation.state``, ``task``."""
    batch = {}
    for cam, frames in images.items():
        x = torch.as_tensor(np.asarray(frames)).float() / 255.0
        batch[f"observation.images.{cam}"] = x.movedim(-1, -3)
    batch["observation.state"] = torch.as_tensor(np.asarray(state)).float()
    if tasks is not None:
        batch["task"] = list(tasks)
    return batch


def lerobot_stats(data) -> dict[str, dict[str, torch.Tensor]]:
    """A ditvla DataSpec's statistics under LeRobot's feature names."""
    stats = {
        "observation.state": data.stats["state"],
        "action": data.stats["action"],
        **{f"observation.images.{cam}": data.stats[cam] for cam in data.cameras},
    }
    out = {}
    for key, values in stats.items():
        out[key] = {name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()}
        if key.startswith("observation.images."):  # per channel: (3, 1, 1)
            out[key] = {name: v.view(3, 1, 1) for name, v in out[key].items()}
    return out


def batches_for_lerobot(store: Path, spec, *, batch_size: int, seed: int = 0):
    """Endless LeRobot batches of the store's samples, as our policy reads them."""
    from torch.utils.data import DataLoader

    from ditvla.datasets.torch_dataset import ReplayBufferDataset

    dataset = ReplayBufferDataset(
        store,
        n_obs_steps=1,
        horizon=spec.horizon,
        cameras=spec.cameras,
        state_keys=spec.state_keys,
    )
    generator = torch.Generator().manual_seed(seed)
    while True:
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
        )
        for sample in loader:
            batch = lerobot_batch(
                {cam: frames[:, -1].numpy() for cam, frames in sample["images"].items()},
                sample["state"][:, -1],
                list(sample["instruction"]),
            )
            batch["action"] = sample["action"]
            batch["action_is_pad"] = sample["action_is_pad"]
            yield batch

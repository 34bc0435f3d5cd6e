"""Observation batches drawn from a store, in the policy observation schema.

For work that feeds a trained policy frames of its data rather than training samples:
quantization's calibration (the first 80% of a store's episodes) and its held-out action
error (the rest); the choice of denoising steps (held-out frames and their demonstrated
chunks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ditvla.contract import PolicySpec
from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer
from ditvla.datasets.torch_dataset import ReplayBufferDataset

CALIBRATION_SHARE = 0.8


def observations_from_store(
    path: str | Path,
    spec: PolicySpec,
    frames: int,
    *,
    held_out: bool = False,
    batch: int = 8,
    seed: int = 0,
    with_actions: bool = False,
) -> list[dict[str, Any]]:
    """Batches of ``frames`` random frames of a store, as the policy of ``spec`` reads them
    (its cameras, its state keys): from the first 80% of the episodes, or from the rest
    (``held_out``). Each batch is ``{"images": {camera: uint8 (B, S, S, 3)}, "state":
    float32 (B, D), "instruction": [str] * B}``; ``with_actions`` adds the demonstrated
    chunk from each frame, ``"action"`` float32 (B, H, A) and ``"action_is_pad"`` (B, H)."""
    buffer = ReplayBuffer.open(path)
    missing = [c for c in spec.cameras if c not in buffer.cameras]
    if missing:
        raise DatasetError(
            f"{path}: the store lacks camera(s) {', '.join(missing)} that the policy reads "
            f"(store cameras: {', '.join(buffer.cameras) or 'none'})"
        )
    split = max(1, int(buffer.n_episodes * CALIBRATION_SHARE))
    episodes = range(split, buffer.n_episodes) if held_out else range(split)
    dataset = ReplayBufferDataset(
        path,
        n_obs_steps=1,
        horizon=spec.horizon if with_actions else 1,
        cameras=spec.cameras,
        state_keys=spec.state_keys if spec.state_dim else (),
        episodes=list(episodes) or None,
    )
    if dataset.state_dim != spec.state_dim:
        raise DatasetError(
            f"{path}: state ({' + '.join(dataset.state_keys)}) has {dataset.state_dim} values, "
            f"the policy reads {spec.state_dim}"
        )
    rng = np.random.default_rng(seed + held_out)
    picks = rng.choice(len(dataset), size=min(frames, len(dataset)), replace=False)
    out = []
    for start in range(0, len(picks), batch):
        samples = dataset.__getitems__(picks[start : start + batch].tolist())
        out.append(
            {
                "images": {
                    c: np.stack([s["images"][c][-1].numpy() for s in samples]) for c in spec.cameras
                },
                "instruction": [s["instruction"] for s in samples],
                "state": np.stack([s["state"][-1].numpy() for s in samples]),
            }
        )
        if with_actions:
            out[-1]["action"] = np.stack([s["action"].numpy() for s in samples])
            out[-1]["action_is_pad"] = np.stack([s["action_is_pad"].numpy() for s in samples])
    return out

"""Scripted demonstrations into a zarr replay buffer: ``ditvla collect``.

Each task's episodes use seeds ``seed_start, seed_start + 1, ...``; the seed of every
stored episode is recorded in the store, so any episode can be replayed. By default only
successful episodes are kept, and failed seeds are replaced by the next ones (at most
twice as many attempts as episodes asked for).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.envs.registry import parse_env


@dataclass
class CollectionReport:
    """What a collection run did, per task: episodes kept and attempts made."""

    kept: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    frames: int = 0

    def success_rate(self, task: str) -> float:
        return self.kept[task] / max(self.attempts[task], 1)


def run_expert_episode(env: Any, seed: int) -> tuple[dict[str, np.ndarray], bool]:
    """One episode of the scripted expert from ``seed``: (arrays by data key, success)."""
    obs, _ = env.reset(seed=seed)
    frames: dict[str, list[np.ndarray]] = {cam: [] for cam in env.cameras}
    states, actions = [], []
    success = False
    while True:
        action = env.expert_action()
        for cam in env.cameras:
            frames[cam].append(obs["images"][cam])
        states.append(obs["state"])
        actions.append(action)
        obs, _, success, truncated, _ = env.step(action)
        if success or truncated:
            break
    episode = {cam: np.stack(f) for cam, f in frames.items()}
    episode["state"] = np.stack(states)
    episode["action"] = np.stack(actions)
    return episode, success


def collect_demonstrations(
    env_spec: str,
    out: str | Path,
    *,
    episodes_per_task: int,
    cameras: Sequence[str] | None = None,
    image_size: int = 64,
    seed_start: int = 0,
    keep_failures: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> CollectionReport:
    """Run the scripted experts of ``env_spec`` and append their episodes to ``out``.

    ``cameras`` defaults to the suite's (metaworld: corner; robosuite: agentview and
    robot0_eye_in_hand).
    """
    suite, tasks = parse_env(env_spec)
    cameras = suite.default_cameras if cameras is None else tuple(cameras)
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    report = CollectionReport()
    buffer: ReplayBuffer | None = None
    bar = tqdm(
        total=episodes_per_task * len(tasks), desc="collect", unit="ep", disable=not progress
    )
    for task in tasks:
        env = suite.make(task, cameras=cameras, image_size=image_size)
        env.reset(seed=seed_start, options={"skip_images": True})
        env.expert_action()  # a task without a scripted expert fails here, before any write
        if buffer is None:
            buffer = ReplayBuffer.create(
                out,
                fps=round(env.fps, 3),
                cameras=list(cameras),
                state_keys=["state"],
                action_space=suite.action_space,
                source=f"{suite.name} scripted experts ({env_spec})",
                overwrite=overwrite,
            )
        report.kept[task] = report.attempts[task] = 0
        seed = seed_start
        try:
            while report.kept[task] < episodes_per_task and (
                report.attempts[task] < 2 * episodes_per_task
            ):
                episode, success = run_expert_episode(env, seed)
                report.attempts[task] += 1
                if success or keep_failures:
                    buffer.append_episode(
                        episode, task=task, instruction=env.instruction, seed=seed
                    )
                    report.kept[task] += 1
                    report.frames += len(episode["action"])
                    bar.update()
                bar.set_postfix_str(f"{task} ok {report.kept[task]}/{report.attempts[task]}")
                seed += 1
        finally:
            env.close()
    bar.close()
    return report

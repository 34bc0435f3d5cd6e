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

import numpy as np
from tqdm.auto import tqdm

from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.envs.metaworld_env import MetaWorldEnv, task_set

METAWORLD_ACTION_SPACE = "metaworld: end-effector xyz delta + gripper effort, each in [-1, 1]"


@dataclass
class CollectionReport:
    """What a collection run did, per task: episodes kept and attempts made."""

    kept: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    frames: int = 0

    def success_rate(self, task: str) -> float:
        return self.kept[task] / max(self.attempts[task], 1)


def parse_env(spec: str) -> tuple[str, list[str]]:
    """``"metaworld:MT10"`` -> ("metaworld", [task, ...]); raises ValueError if unknown."""
    suite, _, name = spec.partition(":")
    if suite != "metaworld" or not name:
        raise ValueError(
            f"unknown environment {spec!r}; expected metaworld:<task>[,<task>...], "
            "metaworld:MT10 or metaworld:MT50"
        )
    return suite, task_set(name)


def run_expert_episode(env: MetaWorldEnv, seed: int) -> tuple[dict[str, np.ndarray], bool]:
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
    cameras: Sequence[str] = ("corner",),
    image_size: int = 64,
    seed_start: int = 0,
    keep_failures: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> CollectionReport:
    """Run the scripted experts of ``env_spec`` and append their episodes to ``out``."""
    _, tasks = parse_env(env_spec)
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    report = CollectionReport()
    buffer: ReplayBuffer | None = None
    bar = tqdm(
        total=episodes_per_task * len(tasks), desc="collect", unit="ep", disable=not progress
    )
    for task in tasks:
        env = MetaWorldEnv(task, cameras=cameras, image_size=image_size)
        if buffer is None:
            buffer = ReplayBuffer.create(
                out,
                fps=round(1.0 / env._env.dt, 3),
                cameras=list(cameras),
                state_keys=["state"],
                action_space=METAWORLD_ACTION_SPACE,
                source=f"metaworld scripted experts ({env_spec})",
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

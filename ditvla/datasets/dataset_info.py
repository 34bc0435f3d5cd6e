"""The human-readable summary that ``ditvla dataset info`` prints."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ditvla.contract import STAT_NAMES
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.statistics import load_or_compute_stats


def _fmt(values: list[float], limit: int = 8) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def describe(buffer: ReplayBuffer, *, with_stats: bool = True) -> str:
    """A multi-line summary: episodes, frames, arrays, tasks and statistics."""
    lengths = buffer.episode_lengths()
    lines = [
        f"{buffer.path}  (zarr v{buffer.zarr_format})",
        f"{buffer.n_episodes} episodes",
        f"{buffer.n_frames} frames"
        + (
            f"  (episode length min {lengths.min()} / mean {lengths.mean():.1f} / max "
            f"{lengths.max()})"
            if len(lengths)
            else ""
        ),
        f"fps: {buffer.fps:g}",
        f"cameras: {', '.join(buffer.cameras) or 'none'}",
        f"state: {' + '.join(buffer.state_keys) or 'none'}",
    ]
    for name in ("action_space", "source", "robot_type"):
        if buffer.attrs.get(name):
            lines.append(f"{name}: {buffer.attrs[name]}")
    if buffer.interrupted_append:
        lines.append("note: an interrupted append was found; its partial episode is ignored")
    lines.append("arrays:")
    for key in buffer.keys:
        array = buffer.array(key)
        lines.append(
            f"  data/{key:<20} {tuple(array.shape[1:])!s:<16} {array.dtype!s:<8} "
            f"chunks {tuple(array.chunks)}"
        )
    counts = Counter(int(i) for i in buffer.episode_task_index)
    if buffer.tasks:
        lines.append(f"tasks ({len(buffer.tasks)}):")
        for index, task in enumerate(buffer.tasks):
            lines.append(
                f"  [{counts.get(index, 0):>4} episodes] {task.name}: {task.instruction!r}"
            )
    seeds = buffer.episode_seed[buffer.episode_seed >= 0]
    if len(seeds):
        lines.append(f"seeds: {len(seeds)} recorded, {np.unique(seeds).size} distinct")
    if with_stats and buffer.n_frames:
        lines.append("stats:")
        for key, stats in load_or_compute_stats(buffer).items():
            lines.append(f"  {key}:")
            for name in STAT_NAMES:
                lines.append(f"    {name:<4} {_fmt(stats[name])}")
    return "\n".join(lines)

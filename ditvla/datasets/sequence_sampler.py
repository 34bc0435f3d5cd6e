"""Which frames make up each training sample: an observation history and an action chunk.

Every frame of every selected episode anchors one sample. For the anchor ``t`` of an
episode spanning frames ``[start, end)``:

- observations at ``t - n_obs_steps + 1 ... t``, frames before ``start`` repeat ``start``;
- actions at ``t ... t + horizon - 1``, frames past ``end - 1`` repeat ``end - 1``.

Padded steps are flagged in ``obs_is_pad`` / ``action_is_pad`` so that a loss can ignore
them. This is the diffusion-policy sampler's padding, computed for a whole batch of
anchors at once with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ditvla.errors import ConfigError


@dataclass(frozen=True)
class SampleFrames:
    """Frame indices of a batch of B samples (global rows of the replay buffer)."""

    anchor: np.ndarray  # (B,) the current frame t
    episode: np.ndarray  # (B,)
    last: np.ndarray  # (B,) the episode's last frame
    obs: np.ndarray  # (B, n_obs_steps)
    obs_is_pad: np.ndarray  # (B, n_obs_steps) bool
    action: np.ndarray  # (B, horizon)
    action_is_pad: np.ndarray  # (B, horizon) bool


class SequenceSampler:
    """Maps sample indices to the frames of their observation and action windows."""

    def __init__(
        self,
        episode_ends: np.ndarray,
        *,
        n_obs_steps: int,
        horizon: int,
        episodes: Sequence[int] | None = None,
    ):
        if n_obs_steps < 1 or horizon < 1:
            raise ConfigError(f"n_obs_steps and horizon must be >= 1, got {n_obs_steps}, {horizon}")
        episode_ends = np.asarray(episode_ends, dtype=np.int64)
        starts = np.concatenate([[0], episode_ends[:-1]]).astype(np.int64)
        selected = np.arange(len(episode_ends)) if episodes is None else np.asarray(episodes)
        if selected.size and (selected.min() < 0 or selected.max() >= len(episode_ends)):
            raise IndexError(f"episodes {list(selected)} outside 0:{len(episode_ends)}")
        lengths = episode_ends[selected] - starts[selected]
        self.n_obs_steps = n_obs_steps
        self.horizon = horizon
        self.episodes = selected
        self._anchor = np.concatenate(
            [np.arange(starts[e], episode_ends[e]) for e in selected] or [np.empty(0, np.int64)]
        )
        self._episode = np.repeat(selected, lengths)
        self._start = np.repeat(starts[selected], lengths)
        self._last = np.repeat(episode_ends[selected] - 1, lengths)

    def __len__(self) -> int:
        return len(self._anchor)

    def frames(self, samples: np.ndarray | Sequence[int]) -> SampleFrames:
        """Frame indices for the given sample indices (shape (B,))."""
        samples = np.asarray(samples, dtype=np.int64)
        if samples.size and (samples.min() < -len(self) or samples.max() >= len(self)):
            raise IndexError(f"sample index outside 0:{len(self)}")
        anchor = self._anchor[samples]
        start = self._start[samples][:, None]
        last = self._last[samples][:, None]
        obs = anchor[:, None] + np.arange(1 - self.n_obs_steps, 1)
        action = anchor[:, None] + np.arange(self.horizon)
        return SampleFrames(
            anchor=anchor,
            episode=self._episode[samples],
            last=last[:, 0],
            obs=np.maximum(obs, start),
            obs_is_pad=obs < start,
            action=np.minimum(action, last),
            action_is_pad=action > last,
        )

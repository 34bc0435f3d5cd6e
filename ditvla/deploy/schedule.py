"""Action chunks placed on the controller's time axis, and the rules that merge them.

The axis is the controller's tick count, not a wall clock: a chunk computed from the
observation of tick ``k`` has its action ``i`` due at tick ``k + i``, so the two processes
never need synchronized clocks. Chunks overlap (a new one arrives before the old one is
used up); what executes at a tick is chosen by the merge rule:

- ``latest``: the chunk from the newest observation that covers the tick;
- ``ensemble``: temporal ensembling as in ACT — the average of every chunk covering the
  tick, weighted ``exp(-decay * i)`` with ``i = 0`` for the oldest;
- ``rtc``: real-time chunking. The server computes each chunk with the actions that will
  execute during its own inference delay frozen to the current plan, and the rest of the
  overlap pulled towards it with decaying weights (inpainting during denoising, with
  :func:`ditvla.real_time_chunking.rtc_weights`); the controller then switches to the
  newest chunk, as ``latest`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from ditvla.errors import ConfigError

MergeRule = Literal["latest", "ensemble", "rtc"]
MERGE_RULES = get_args(MergeRule)


@dataclass
class _Chunk:
    start_tick: int
    actions: np.ndarray  # (H, A)

    @property
    def end_tick(self) -> int:
        return self.start_tick + len(self.actions)


class ActionSchedule:
    def __init__(self, rule: str = "latest", ensemble_decay: float = 0.01, max_chunks: int = 16):
        if rule not in MERGE_RULES:
            raise ConfigError(
                f"unknown merge rule {rule!r}; choose one of {', '.join(MERGE_RULES)}"
            )
        self.rule = rule
        self.ensemble_decay = ensemble_decay
        self.max_chunks = max_chunks
        self._chunks: list[_Chunk] = []  # sorted by start tick

    def add(self, start_tick: int, actions: np.ndarray) -> None:
        """Place a chunk whose first action is due at ``start_tick``."""
        chunk = _Chunk(int(start_tick), np.asarray(actions, np.float32))
        self._chunks.append(chunk)
        self._chunks.sort(key=lambda c: c.start_tick)
        del self._chunks[: -self.max_chunks]

    def prune(self, tick: int) -> None:
        """Forget chunks that end before ``tick``."""
        self._chunks = [c for c in self._chunks if c.end_tick > tick]

    def clear(self) -> None:
        self._chunks.clear()

    def last_tick(self) -> int | None:
        """The last tick any chunk covers (None when empty)."""
        return max((c.end_tick - 1 for c in self._chunks), default=None)

    def newest_start(self, tick: int) -> int | None:
        """The start tick of the newest chunk covering ``tick`` (the one ``latest`` runs),
        or None: a change of it between two ticks is a switch to a new chunk."""
        covering = [c.start_tick for c in self._chunks if c.start_tick <= tick < c.end_tick]
        return covering[-1] if covering else None

    def action_at(self, tick: int) -> np.ndarray | None:
        """The action due at ``tick``, or None when no chunk covers it (the robot holds)."""
        covering = [c for c in self._chunks if c.start_tick <= tick < c.end_tick]
        if not covering:
            return None
        if self.rule != "ensemble":
            newest = covering[-1]
            return newest.actions[tick - newest.start_tick]
        weights = np.exp(-self.ensemble_decay * np.arange(len(covering)))
        actions = np.stack([c.actions[tick - c.start_tick] for c in covering])
        return (weights[:, None] * actions).sum(0) / weights.sum()

    def planned(self, start_tick: int, horizon: int) -> tuple[np.ndarray, np.ndarray] | None:
        """What is planned for ticks ``start_tick .. start_tick + horizon - 1``: actions
        (horizon, A), zeros where nothing is planned, and a mask of the planned ticks."""
        if not self._chunks:
            return None
        dim = self._chunks[-1].actions.shape[1]
        actions = np.zeros((horizon, dim), np.float32)
        planned = np.zeros(horizon, bool)
        for i in range(horizon):
            action = self.action_at(start_tick + i)
            if action is not None:
                actions[i], planned[i] = action, True
        return actions, planned


def safe_actions(
    actions: np.ndarray, low: float | None = None, high: float | None = None
) -> np.ndarray | None:
    """``actions`` clipped to [low, high] as float32, or None when any value is not finite
    (the caller then drops the chunk / holds the robot)."""
    if not np.all(np.isfinite(actions)):
        return None
    if low is not None or high is not None:
        actions = np.clip(actions, low, high)
    return np.asarray(actions, np.float32)

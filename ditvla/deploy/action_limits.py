"""The bounds a robot's actions are held to, set by one rule on both sides of the link.

The server tells the controller its limits in the ``spec`` (its ``--action-low/--action-
high`` if given, else the policy's training range widened by :data:`ACTION_LIMIT_MARGIN`
of its width on each side); the controller refuses chunks beyond its own limits (its
``--action-low/--action-high`` if given, else the server's). Both merge a default with
the options the same way, here: a bound given as an option replaces that side in every
dimension; a side nobody bounds is unbounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ACTION_LIMIT_MARGIN = 0.1  # of the training range's width, on each side
_MARGIN_FLOOR = 1e-3  # a dimension that never moved in training still gets some room


def widened_range(
    low: Sequence[float] | np.ndarray, high: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A training range (A,) widened by :data:`ACTION_LIMIT_MARGIN` of its width on each
    side: the limits a server offers when it is given none."""
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    margin = ACTION_LIMIT_MARGIN * (high - low) + _MARGIN_FLOOR
    return low - margin, high + margin


def merged_limits(
    action_dim: int,
    low: np.ndarray | None,
    high: np.ndarray | None,
    option_low: float | None,
    option_high: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 bounds (A,): ``low`` / ``high`` (None: unbounded), each side replaced in
    every dimension by its option when one is given."""
    if option_low is not None:
        low = np.full(action_dim, option_low)
    if option_high is not None:
        high = np.full(action_dim, option_high)
    return (
        np.full(action_dim, -np.inf, np.float32) if low is None else np.asarray(low, np.float32),
        np.full(action_dim, np.inf, np.float32) if high is None else np.asarray(high, np.float32),
    )

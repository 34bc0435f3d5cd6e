"""Real-time chunking's weights (Black et al., 2025): how strongly a new action chunk is
pulled towards what is already planned.

A policy that acts in chunks and replans before a chunk runs out draws each new chunk from
new noise, and nothing ties it to the last one: two chunks can aim at different grasps,
and the robot hesitates between them. Real-time chunking computes the new chunk with the
actions already planned for the same ticks inpainted into it during denoising (the
policy's ``act(..., inpaint=(actions, weights))``), with the weights below. The deploy
server uses them with its inference delay (``--merge rtc``); the rollout evaluator with
none (``ditvla eval --merge rtc``), where the simulator waits for the policy.
"""

from __future__ import annotations

import math

import numpy as np


def rtc_weights(horizon: int, delay: int, planned: np.ndarray) -> np.ndarray:
    """Real-time chunking's inpainting weights (Black et al., 2025) for a new chunk.

    1 for the first ``delay`` actions (they execute before the chunk arrives: frozen),
    then an exponential decay over the rest of the already-planned actions, 0 after them.
    """
    overlap = int(np.flatnonzero(planned).max()) + 1 if planned.any() else 0
    weights = np.zeros(horizon, np.float32)
    for i in range(min(overlap, horizon)):
        if i < delay:
            weights[i] = 1.0
        else:
            c = (overlap - i) / (overlap - delay + 1)
            weights[i] = c * (math.exp(c) - 1) / (math.e - 1)
    return weights * planned

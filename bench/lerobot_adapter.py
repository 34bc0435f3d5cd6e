"""A trained LeRobot policy behind ditvla's evaluator contract (``ChunkPolicy``).

The benches that compare success (ours against SmolVLA or DiffusionPolicy) run both
through our evaluator, on the same episodes and seeds; the adapter keeps LeRobot's own
pre/post processors (normalization, tokenization) and an observation history per
episode for policies that read several steps, so the peer acts as LeRobot runs it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from bench.lerobot_batches import lerobot_batch


class LeRobotAdapter:
    """A trained LeRobot policy behind ditvla's evaluator contract (``ChunkPolicy``)."""

    def __init__(self, policy, preprocessor, postprocessor, spec, *, reads_task: bool):
        self.policy = policy.eval()
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.spec = spec
        self.reads_task = reads_task
        self.n_obs_steps = getattr(policy.config, "n_obs_steps", 1)
        self._history: dict[tuple[str, int], deque] = {}

    def reset(self) -> None:
        self._history.clear()

    def predict_action_chunk(self, observation: dict, **_: Any) -> torch.Tensor:
        if self.n_obs_steps == 1:
            images, state = observation["images"], observation["state"]
        else:  # per episode (the evaluator names each row's task and seed)
            rows = []
            for i, key in enumerate(zip(observation["task"], observation["seed"], strict=True)):
                history = self._history.setdefault(key, deque(maxlen=self.n_obs_steps))
                history.append(
                    (
                        {c: v[i] for c, v in observation["images"].items()},
                        observation["state"][i],
                    )
                )
                while len(history) < self.n_obs_steps:  # the first step repeats, as LeRobot pads
                    history.appendleft(history[0])
                rows.append(history)
            images = {
                cam: np.stack([np.stack([h[0][cam] for h in rows_i]) for rows_i in rows])
                for cam in observation["images"]
            }
            state = np.stack([np.stack([h[1] for h in rows_i]) for rows_i in rows])
        tasks = observation["instruction"] if self.reads_task else None
        batch = self.preprocessor(lerobot_batch(images, state, tasks))
        self.policy.reset()  # empty queues: the chunk comes from this observation
        with torch.inference_mode():
            actions = self.policy.predict_action_chunk(batch)
        return self.postprocessor(actions)

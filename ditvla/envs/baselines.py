"""Baseline policies for the evaluator, and the loader of ``--policy`` arguments.

Both baselines speak :class:`~ditvla.contract.ChunkPolicy`, as a trained policy does: the
random floor any policy must clear, and the simulators' scripted experts (the ceiling
the demonstrations come from).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ditvla.contract import ChunkPolicy, HeadDType, PolicySpec, load_policy
from ditvla.errors import ConfigError


class RandomPolicy:
    """Uniform random actions in [-1, 1], one per call: the floor any policy must clear."""

    def __init__(self, action_dim: int, seed: int = 0):
        self.spec = PolicySpec(cameras=(), image_size=0, state_dim=0, action_dim=action_dim)
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def predict_action_chunk(self, observation: dict[str, Any], **_: Any) -> torch.Tensor:
        batch = len(observation["instruction"])
        actions = self.rng.uniform(-1, 1, (batch, 1, self.spec.action_dim)).astype(np.float32)
        return torch.from_numpy(actions)


class ExpertPolicy:
    """The simulators' scripted experts (Meta-World's own; ours for robosuite).

    Experts read privileged simulator state (object poses), so the evaluator's workers
    compute their actions next to the simulator and hand them over in each observation
    (``spec.reads_expert_action``); this policy passes them on.
    """

    def __init__(self, action_dim: int = 0):
        self.spec = PolicySpec(
            cameras=(), image_size=0, state_dim=0, action_dim=action_dim, reads_expert_action=True
        )

    def reset(self) -> None:
        pass

    def predict_action_chunk(self, observation: dict[str, Any], **_: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(observation["expert_action"], np.float32)[:, None])


BASELINES = ("random", "expert")  # the --policy names that are not a folder


def policy_from_argument(
    name: str, *, action_dim: int, device: str = "cpu", head_dtype: HeadDType = "float32"
) -> ChunkPolicy:
    """``random``, ``expert``, or a saved policy folder (``--policy`` of ``ditvla eval``)."""
    if name in BASELINES:
        if head_dtype != "float32":
            raise ConfigError(f"the {name} baseline has no action head to run in {head_dtype}")
        return RandomPolicy(action_dim) if name == "random" else ExpertPolicy(action_dim)
    return load_policy(name, device=device, head_dtype=head_dtype)

"""LeRobot's pre/post processors for a ditvla policy.

Rename (LeRobot's ``--rename_map``), add the batch dimension, move to the policy's
device; the actions back to the CPU. No normalization step: the policy normalizes inside
with the dataset's statistics (its buffers), so the same weights mean the same thing in
``ditvla eval`` and ``lerobot-eval``. ditvla writes these same descriptions into its own
folders (:mod:`ditvla.policies.lerobot_layout`).
"""

from __future__ import annotations

from typing import Any

import torch
from lerobot.processor import PolicyAction, PolicyProcessorPipeline
from lerobot.processor.factory import (
    make_default_policy_processor_steps,
    make_policy_processor_pipelines,
)

from lerobot_policy_ditvla.configuration_ditvla import DitvlaConfig


def make_ditvla_pre_post_processors(
    config: DitvlaConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """The processors of ``--policy.type=ditvla`` (``dataset_stats`` are unused here: the
    policy holds them)."""
    steps = make_default_policy_processor_steps(config, None)
    return make_policy_processor_pipelines(
        input_steps=[steps.rename_observations, steps.add_batch_dim, steps.to_device],
        output_steps=[steps.to_cpu],
    )

"""A ditvla policy folder is also a LeRobot pretrained-policy folder.

LeRobot (with the ``lerobot_policy_ditvla`` plugin installed) loads a folder from its
``config.json`` "type" tag and two processor descriptions. ditvla writes both, so that
``lerobot-eval --policy.path=runs/x/policy`` takes a ``ditvla train`` policy as it is;
the plugin's checkpoints carry ditvla's keys in turn, so ``ditvla eval`` takes them.

The processors do no normalization: the policy normalizes inside (its statistics are
buffers of its weights), so one set of weights means the same in both tools. This module
writes what the plugin's ``make_ditvla_pre_post_processors`` builds (a test compares the
two), without importing LeRobot.
"""

from __future__ import annotations

import json
from pathlib import Path

# LeRobot's config.json names its policy class by this tag (PreTrainedConfig.register_subclass).
LEROBOT_TYPE = "ditvla"
CONFIG_TAG = {"type": LEROBOT_TYPE}
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"


def _device_step(device: str) -> dict:
    return {"registry_name": "device_processor", "config": {"device": device, "float_dtype": None}}


def processor_descriptions(device: str = "cpu") -> dict[str, dict]:
    """LeRobot's processor files for a ditvla policy: rename (nothing by default), add the
    batch dimension, move to the policy's device; and the actions back to the CPU."""
    pre = {
        "name": "policy_preprocessor",
        "steps": [
            {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
            {"registry_name": "to_batch_processor", "config": {}},
            _device_step(device),
        ],
    }
    post = {"name": "policy_postprocessor", "steps": [_device_step("cpu")]}
    return {PREPROCESSOR_FILE: pre, POSTPROCESSOR_FILE: post}


def write_processor_files(folder: Path) -> None:
    """Write the two processor files into ``folder``, keeping any already there (LeRobot's
    checkpointing writes its own, which may rename cameras)."""
    for name, description in processor_descriptions().items():
        path = Path(folder) / name
        if not path.exists():
            path.write_text(json.dumps(description, indent=2) + "\n")

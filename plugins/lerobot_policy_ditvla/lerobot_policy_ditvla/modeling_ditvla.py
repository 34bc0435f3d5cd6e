"""``DitvlaPolicy``: ditvla's policy behind LeRobot's ``PreTrainedPolicy`` interface.

LeRobot's batches (``observation.images.*`` float (B, 3, H, W) in [0, 1],
``observation.state``, ``action`` (B, horizon, A) with ``action_is_pad``, the ``task``
strings) are mapped onto :class:`~ditvla.policies.policy.DiTVLAPolicy`, which does the
work: the loss, the encode/act split, the normalization (LeRobot's dataset statistics
become its buffers). Saving writes ditvla's own folder files, so a checkpoint of
``lerobot-train`` loads in ``ditvla eval`` / ``ditvla serve``, and a ``ditvla train``
folder loads here.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any

import draccus
import numpy as np
import torch
import torch.nn.functional as F
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION, OBS_STATE
from torch import Tensor

from ditvla.contract import STAT_NAMES, CheckpointError, PolicyInputError, Stats
from ditvla.policies.policy import DiTVLAPolicy
from ditvla.training.sharding import no_split_classes
from lerobot_policy_ditvla.configuration_ditvla import DitvlaConfig, camera_of, features_of

ACTION_IS_PAD = "action_is_pad"
TASK = "task"


def ditvla_stats(dataset_stats: dict[str, dict[str, Any]] | None) -> Stats | None:
    """LeRobot's dataset statistics -> ditvla's (``action`` and ``state``)."""
    if not dataset_stats:
        return None
    stats: Stats = {}
    for lerobot_key, key in ((ACTION, "action"), (OBS_STATE, "state")):
        if lerobot_key not in dataset_stats:
            continue
        entry = dataset_stats[lerobot_key]
        missing = [name for name in STAT_NAMES if name not in entry]
        if missing:
            raise ValueError(f"the dataset statistics of {lerobot_key} lack {', '.join(missing)}")
        stats[key] = {
            name: np.asarray(torch.as_tensor(entry[name]).cpu(), np.float64).reshape(-1).tolist()
            for name in STAT_NAMES
        }
    return stats


class DitvlaPolicy(PreTrainedPolicy):
    """A ditvla policy (VLM backbone + DiT action head) in LeRobot."""

    config_class = DitvlaConfig
    name = "ditvla"

    def __init__(
        self,
        config: DitvlaConfig,
        dataset_stats: dict[str, dict[str, Any]] | None = None,
        dataset_meta: Any = None,
        *,
        model: DiTVLAPolicy | None = None,
        **_: Any,
    ):
        super().__init__(config)
        if not isinstance(config, DitvlaConfig):
            raise CheckpointError(
                f"DitvlaPolicy needs a 'ditvla' configuration, got {type(config).__name__}"
            )
        if model is None:
            stats = ditvla_stats(dataset_stats)
            if stats is None:
                logging.warning(
                    "ditvla: a new policy without dataset statistics normalizes nothing"
                )
            action_range = (
                [stats["action"]["min"], stats["action"]["max"]]
                if stats and "action" in stats
                else None
            )
            model = DiTVLAPolicy(config.model_config(action_range), stats)
        self.model = model
        self._check_features(config, model)
        if dataset_meta is not None:
            self._check_dataset(dataset_meta)
        # ditvla's description of the model, saved in config.json for ditvla's loader
        config.policy = model.config.to_dict()
        self._camera_keys = {camera_of(key): key for key in config.image_features}
        self._queue: deque[Tensor] = deque()

    @staticmethod
    def _check_features(config: DitvlaConfig, model: DiTVLAPolicy) -> None:
        """The configured features (from the dataset or environment) against the model's:
        every mismatch named, before any step."""
        inputs, outputs = features_of(model.config)
        problems = []
        for key, feature in outputs.items():
            got = (config.output_features or {}).get(key)
            if got is None or tuple(got.shape) != tuple(feature.shape):
                problems.append(
                    f"{key}: the policy writes {feature.shape}, the data has "
                    f"{None if got is None else tuple(got.shape)}"
                )
        given = config.input_features or {}
        for key, feature in inputs.items():
            got = given.get(key)
            if got is None:
                problems.append(f"{key}: the policy reads it, the data has no such feature")
            elif key == OBS_STATE and tuple(got.shape) != tuple(feature.shape):
                problems.append(
                    f"{key}: the policy reads {feature.shape}, the data has {tuple(got.shape)}"
                )
            elif key == OBS_STATE and config.state_keys not in (None, model.config.state_keys):
                problems.append(
                    f"{key}: the policy reads {' + '.join(model.config.state_keys)}, the "
                    f"data's is {' + '.join(config.state_keys)}"
                )
        if problems:
            raise ValueError("ditvla policy and data do not match: " + "; ".join(problems))

    @staticmethod
    def _check_dataset(dataset_meta: Any) -> None:
        tasks = getattr(dataset_meta, "tasks", None)  # a DataFrame indexed by task string
        if tasks is None or not any(str(t).strip() for t in tasks.index):
            raise ValueError(
                "the dataset has no task strings: ditvla's VLM reads the instruction from "
                "each frame's 'task' (LeRobotDataset.add_frame(..., task=...))"
            )

    @property
    def _fsdp_wrap_modules(self) -> list[str]:
        """The classes FSDP wraps one by one: the VLM's transformer blocks, as ``ditvla
        train --sharding fsdp`` shards them."""
        return no_split_classes(self.model)

    @property
    def _no_split_modules(self) -> list[str]:
        """What accelerate's FSDP auto-wrap reads (LeRobot's sharded training:
        ``accelerate launch --use_fsdp ... lerobot-train``)."""
        return self._fsdp_wrap_modules

    # ------------------------------------------------------------------ batches
    def _pixels(self, batch: dict[str, Any]) -> Tensor:
        """The batch's cameras as (B, cameras, 3, S, S) float in [0, 1], resized to S."""
        size = self.model.config.image_size
        frames = []
        for camera in self.model.config.cameras:
            key = self._camera_keys.get(camera, camera)
            if key not in batch:
                raise PolicyInputError(f"the batch has no {key!r} (camera {camera!r})")
            x = torch.as_tensor(batch[key])
            if x.ndim == 5:  # (B, T, 3, H, W): the newest frame
                x = x[:, -1]
            if x.ndim != 4 or x.shape[1] != 3:
                raise PolicyInputError(f"{key} has shape {tuple(x.shape)}, expected (B, 3, H, W)")
            x = x.float()
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            frames.append(x.clamp(0, 1))
        return torch.stack(frames, dim=1)

    @staticmethod
    def _instructions(batch: dict[str, Any], n: int) -> list[str]:
        task = batch.get(TASK)
        if task is None:
            raise PolicyInputError(
                "the batch has no 'task' string: ditvla's VLM reads the instruction"
            )
        tasks = [task] * n if isinstance(task, str) else list(task)
        if len(tasks) != n:
            raise PolicyInputError(f"{len(tasks)} task strings for a batch of {n}")
        return tasks

    def _state(self, batch: dict[str, Any]) -> Tensor | None:
        if not self.model.config.state_dim:
            return None
        if OBS_STATE not in batch:
            raise PolicyInputError(
                f"the batch has no {OBS_STATE!r} ({self.model.config.state_dim} values)"
            )
        state = torch.as_tensor(batch[OBS_STATE])
        return state[:, -1] if state.ndim == 3 else state

    # ------------------------------------------------------------------ LeRobot's API
    def get_optim_params(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def reset(self) -> None:
        self._queue.clear()

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        pixels = self._pixels(batch)
        if ACTION not in batch:
            raise PolicyInputError(f"the batch has no {ACTION!r}")
        actions = batch[ACTION]
        pad = batch.get(ACTION_IS_PAD)
        if pad is None:
            pad = torch.zeros(actions.shape[:2], dtype=torch.bool, device=actions.device)
        return self.model.compute_loss(
            pixels, self._instructions(batch, len(pixels)), self._state(batch), actions, pad
        )

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any], **kwargs: Any) -> Tensor:
        """(B, horizon, A) actions in the robot's units (``noise`` and ``num_steps`` pass
        through to ditvla's ``act``)."""
        self.eval()
        pixels = self._pixels(batch)
        context = self.model.encode_pixels(pixels, self._instructions(batch, len(pixels)))
        options = {k: v for k, v in kwargs.items() if k in ("noise", "num_steps") and v is not None}
        return self.model.act(context, self._state(batch), **options)

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any], **kwargs: Any) -> Tensor:
        """The next action (B, A); a new chunk every n_action_steps."""
        if not self._queue:
            chunk = self.predict_action_chunk(batch, **kwargs)
            self._queue.extend(chunk[:, : self.model.config.n_action_steps].transpose(0, 1))
        return self._queue.popleft()

    # ------------------------------------------------------------------ folders
    def _save_pretrained(self, save_directory: Path, state_dict: dict[str, Tensor] | None = None):
        """ditvla's folder files plus this LeRobot configuration in one config.json."""
        if state_dict is not None:  # gathered from a sharded model: our keys start "model."
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.config.policy = self.model.config.to_dict()
        self.model.write_files(
            Path(save_directory),
            config_fields=draccus.encode(self.config, PreTrainedConfig),
            state=state_dict,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | Path,
        *,
        config: PreTrainedConfig | None = None,
        **kwargs: Any,
    ) -> DitvlaPolicy:
        """Load a ditvla policy folder (from ``ditvla train`` or ``lerobot-train``).
        Local folders only: ditvla fetches nothing from a hub."""
        folder = Path(pretrained_name_or_path)
        if not folder.is_dir():
            raise CheckpointError(
                f"{folder}: not a local folder (ditvla loads policies from local folders)"
            )
        if config is None:
            config = PreTrainedConfig.from_pretrained(
                folder, cli_overrides=kwargs.pop("cli_overrides", [])
            )
        if not isinstance(config, DitvlaConfig):
            raise CheckpointError(
                f"{folder}: a LeRobot {config.type!r} policy, not a ditvla policy"
            )
        model = DiTVLAPolicy.from_pretrained(folder, map_location=config.device or "cpu")
        if config.policy is None or not config.input_features:
            config.input_features, config.output_features = features_of(model.config)
        kwargs.pop("dataset_stats", None)  # the statistics are in the weights
        for key in ("pretrained_name_or_path", "revision", "strict", "local_files_only"):
            kwargs.pop(key, None)
        policy = cls(config, model=model, **kwargs)
        policy.to(config.device or "cpu")
        policy.eval()
        return policy

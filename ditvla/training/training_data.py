"""What a training run reads: the store as a torch dataset, the policy's configuration
sized to it, and the extra targets its heads learn from.

- The store's statistics (normalization) are computed once, by the main process, and
  cached in the store (a store by URL, read-only, in the run's ``<out>/cache/``); the
  other processes read them.
- The auxiliary head's targets are privileged arrays (e.g. the goal's position),
  standardized with the store's statistics; the policy never reads them.
- The motion-foresight head's optical-flow targets are computed once and cached like the
  statistics; the latent foresight head needs only the future frame of its camera.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ditvla.contract import DataSpec
from ditvla.datasets.errors import DatasetError
from ditvla.datasets.instruction_files import read_task_lines
from ditvla.datasets.motion_targets import MotionTargetSpec, load_or_compute_motion_targets
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.statistics import load_or_compute_stats
from ditvla.datasets.store_layout import valid_mask_key
from ditvla.datasets.torch_dataset import ImageAugmentation, ReplayBufferDataset
from ditvla.errors import ConfigError
from ditvla.policies.config import PolicyConfig
from ditvla.policies.normalizer import NARROW_STD, narrow_features
from ditvla.training.processes import Processes


def training_dataset(
    config: Any, processes: Processes
) -> tuple[PolicyConfig, DataSpec, ReplayBufferDataset]:
    """The policy's configuration (``config.preset`` with ``config.policy_overrides``,
    sized to the store), the store's description and the dataset of training samples
    with the heads' targets attached. ``config`` is a :class:`TrainConfig`."""
    state_keys = ReplayBuffer.open(config.dataset).resolve_state(config.state)
    cache_dir = Path(config.out) / "cache"  # what is derived from a store by URL
    data = processes.main_first(
        lambda: ReplayBufferDataset(
            config.dataset, cameras=config.cameras, state_keys=state_keys, cache_dir=cache_dir
        ).data_spec()
    )
    if config.image_size is not None and config.image_size != data.image_size:
        raise DatasetError(
            f"{config.dataset}: its cameras ({', '.join(data.cameras)}) hold "
            f"{data.image_size}x{data.image_size} frames, not {config.image_size}; collect at "
            f"that size (ditvla collect --image-size {config.image_size}) or leave "
            "--image-size out"
        )
    policy_config = PolicyConfig.for_data(data, config.preset, **config.policy_overrides)
    if processes.main and policy_config.state_dim and policy_config.state_norm == "mean_std":
        _warn_narrow_state(data.stats, policy_config.state_keys)
    dataset = ReplayBufferDataset(
        config.dataset,
        n_obs_steps=1,
        horizon=policy_config.horizon,
        cameras=policy_config.cameras,
        state_keys=policy_config.state_keys,
        augmentation=ImageAugmentation() if config.augment else None,
        camera_dropout=camera_dropout(config.camera_dropout, policy_config.cameras),
        cache_dir=cache_dir,
    )
    if config.auxiliary:
        _attach_auxiliary_targets(dataset, policy_config, config.auxiliary)
    if config.instruction_variants:
        dataset.instruction_variants = instruction_variants(config)
    dataset.instruction_noise = config.instruction_noise
    foresight = policy_config.foresight
    if foresight.kind == "motion":
        _attach_motion_targets(dataset, policy_config, processes)
    elif foresight.kind == "latent":  # its targets come from the frozen encoder, per batch
        dataset.future_frame = (foresight.camera, foresight.k)
    return policy_config, data, dataset


def instruction_variants(config) -> dict[str, list[str]]:
    """``--instruction-variants FILE`` (``TASK<TAB>VARIANT`` lines, tasks of the store) as
    {the task's instruction: its variants}."""
    tasks = ReplayBuffer.open(config.dataset).tasks
    names = [task.name for task in tasks]
    lines = read_task_lines(
        config.instruction_variants, names, text="VARIANT", tasks_are="in the store"
    )
    return {task.instruction: lines[task.name] for task in tasks if task.name in lines}


def camera_dropout(text: str, cameras: Sequence[str]) -> dict[str, float]:
    """``"corner3=0.3"`` -> {"corner3": 0.3}; ConfigError for a camera the policy does not
    read or a probability outside [0, 1)."""
    dropout: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        camera, _, value = item.partition("=")
        camera = camera.strip()
        if camera not in cameras:
            raise ConfigError(
                f"--camera-dropout {item!r}: the policy reads no camera {camera!r}; it reads "
                f"{', '.join(cameras) or 'none'}"
            )
        try:
            probability = float(value)
        except ValueError:
            probability = -1.0
        if not 0.0 <= probability < 1.0:
            raise ConfigError(
                f"--camera-dropout {item!r}: give CAMERA=P with P in [0, 1), e.g. {camera}=0.3"
            )
        dropout[camera] = probability
    return dropout


def auxiliary_scale(stats, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std an auxiliary target ``key`` is standardized with (the std floored,
    so that a constant column divides by something); its prediction times the std plus the
    mean is in the store's units."""
    mean = np.asarray(stats[key]["mean"], np.float32)
    return mean, np.maximum(np.asarray(stats[key]["std"], np.float32), 1e-6)


def _attach_auxiliary_targets(dataset, policy_config: PolicyConfig, selection: str) -> None:
    """The auxiliary head's targets: the named arrays, standardized with the store's
    statistics (a padded array's padding is 0, what the head learns to say there),
    attached to the dataset; their names and width recorded in the config."""
    buffer = ReplayBuffer.open(dataset.path)
    keys = buffer.resolve_auxiliary(selection)
    stats = load_or_compute_stats(buffer, dataset.cache_dir)
    parts = []
    for key in keys:
        values = buffer.read_all(key).astype(np.float32).reshape(buffer.n_frames, -1)
        mean, std = auxiliary_scale(stats, key)
        standardized = (values - mean) / std
        if valid_mask_key(key) in buffer.keys:
            standardized *= buffer.read_all(valid_mask_key(key)).reshape(standardized.shape)
        parts.append(standardized)
    dataset.frame_targets["auxiliary"] = np.concatenate(parts, axis=1)
    policy_config.auxiliary_keys = list(keys)
    policy_config.auxiliary_dim = int(dataset.frame_targets["auxiliary"].shape[1])


def _attach_motion_targets(dataset, policy_config: PolicyConfig, processes: Processes) -> None:
    """Optical-flow targets of the foresight head: computed once (and cached) by the main
    process, attached to the dataset, their scale recorded in the config."""
    foresight = policy_config.foresight
    spec = MotionTargetSpec(foresight.camera, foresight.k, foresight.method, foresight.size)
    targets, scale = processes.main_first(
        lambda: load_or_compute_motion_targets(
            dataset.path, spec, progress=processes.main, cache_dir=dataset.cache_dir
        )
    )
    dataset.frame_targets["motion"] = targets
    foresight.scale = scale


def _warn_narrow_state(stats, state_keys: list[str]) -> None:
    """Say which state dimensions mean_std will magnify (see :func:`narrow_features`)."""
    narrow = narrow_features(stats, "state")
    if narrow:
        warnings.warn(
            f"state ({' + '.join(state_keys)}) dimensions {narrow} vary with a std under "
            f"{NARROW_STD} in this store; mean_std normalization magnifies any move of theirs "
            "beyond that (0.1 off is more than 10 std), which a policy's own actions can "
            "cause; --policy.state-norm quantile clips inputs to the data's range",
            stacklevel=3,
        )

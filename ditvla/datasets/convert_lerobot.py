"""LeRobot datasets (v3, through lerobot's own ``LeRobotDataset`` API) to zarr and back.

Key mapping (lerobot -> zarr):

- ``observation.images.<cam>`` (image or video) -> camera ``<cam>``, uint8 (T, H, W, 3)
- ``observation.state`` -> ``state``; ``action`` -> ``action``
- any other numeric ``observation.<name>`` -> ``<name>`` (dots become underscores)
- the per-frame ``task`` string -> the episode's task and instruction

The other way, every array is written as ``observation.<name>`` (``action`` as itself), and
``observation.state`` is the state a policy reads: the arrays ``--state`` selects (by
default the store's ``state_keys``, e.g. Meta-World's ``proprio``), concatenated. Which
arrays those are is kept in the dataset, so that a policy trained on it knows what to ask
an environment for: ``observation.state``'s ``names`` in ``meta/info.json`` are
``<array>.<index>`` for each value (``proprio.0`` ... ``proprio.7``), LeRobot's
per-value names, which its tools carry along and its viewers print. The LeRobot plugin
(``lerobot_policy_ditvla``) reads its ``state_keys`` from them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ditvla.contract import STATE_PROPRIO, state_feature_names
from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer

# Columns every LeRobot dataset has, which the replay buffer keeps in its own way.
LEROBOT_INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
IMAGE_PREFIX = "observation.images."
# lerobot's default video codec (SVT-AV1) dies with SIGFPE on 16x16 frames; 32x32 works.
MIN_VIDEO_SIDE_PX = 32
OBS_STATE = "observation.state"


def _zarr_key(lerobot_key: str) -> str:
    if lerobot_key.startswith(IMAGE_PREFIX):
        return lerobot_key.removeprefix(IMAGE_PREFIX).replace(".", "_")
    if lerobot_key == OBS_STATE:
        return "state"
    return lerobot_key.removeprefix("observation.").replace(".", "_")


def _open_lerobot(root: Path, repo_id: str | None):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if not (root / "meta" / "info.json").exists():
        raise DatasetError(f"{root}: not a LeRobot dataset (no meta/info.json)")
    return LeRobotDataset(repo_id or f"local/{root.name}", root=root, return_uint8=True)


def lerobot_to_zarr(
    root: str | Path,
    out: str | Path,
    *,
    repo_id: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ReplayBuffer:
    """Convert the LeRobot dataset stored at ``root`` into a zarr replay buffer."""
    root = Path(root)
    dataset = _open_lerobot(root, repo_id)
    features = dataset.features
    mapping: dict[str, str] = {}
    cameras = []
    for key, feature in features.items():
        if key in LEROBOT_INDEX_COLUMNS or feature["dtype"] == "string":
            continue
        if feature["dtype"] in ("image", "video"):
            cameras.append(_zarr_key(key))
        elif not key.startswith("observation.") and key != "action":
            continue  # e.g. next.reward: not part of the replay buffer schema
        mapping[_zarr_key(key)] = key
    if "action" not in mapping:
        raise DatasetError(f"{root}: LeRobot dataset has no 'action' feature")
    buffer = ReplayBuffer.create(
        out,
        fps=float(dataset.fps),
        cameras=cameras,
        state_keys=["state"] if "state" in mapping else [],
        action_space=str(features["action"].get("names") or ""),
        source=f"lerobot: {dataset.repo_id} ({root})",
        overwrite=overwrite,
    )
    buffer.set_attrs(robot_type=dataset.meta.robot_type, lerobot_keys=mapping)
    with tqdm(
        total=dataset.num_frames, desc="lerobot -> zarr", unit="frame", disable=not progress
    ) as bar:
        for episode_index in range(dataset.num_episodes):
            info = dataset.meta.episodes[episode_index]
            start, stop = int(info["dataset_from_index"]), int(info["dataset_to_index"])
            columns: dict[str, list[np.ndarray]] = {k: [] for k in mapping}
            task = ""
            for i in range(start, stop):
                frame = dataset[i]
                task = frame["task"]
                for zarr_key, lerobot_key in mapping.items():
                    value = frame[lerobot_key].numpy()
                    if zarr_key in cameras:
                        value = _to_hwc_uint8(value, root, lerobot_key)
                    columns[zarr_key].append(value)
                bar.update()
            episode = {k: np.stack(v) for k, v in columns.items()}
            buffer.append_episode(episode, task=task, instruction=task)
    return buffer


def _to_hwc_uint8(value: np.ndarray, root: Path, key: str) -> np.ndarray:
    if value.ndim == 3 and value.shape[0] == 3:
        value = value.transpose(1, 2, 0)
    if value.dtype != np.uint8:
        value = np.clip(np.rint(value * 255.0), 0, 255).astype(np.uint8)
    if value.ndim != 3 or value.shape[-1] != 3:
        raise DatasetError(f"{root}: {key} frames have shape {value.shape}, expected (H, W, 3)")
    return value


def zarr_to_lerobot(
    store: str | Path,
    root: str | Path,
    *,
    repo_id: str | None = None,
    use_videos: bool = True,
    robot_type: str | None = None,
    state: str = STATE_PROPRIO,
    progress: bool = True,
):
    """Write the replay buffer at ``store`` as a LeRobot dataset in ``root``; returns it.

    ``state`` names the arrays concatenated into ``observation.state`` as ``ditvla train
    --state`` does (proprio, full, none or KEY[,KEY...]); every array is also written
    under its own name. ``observation.state``'s names say which arrays it is made of
    (see the module's docstring)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    buffer = _store_to_convert(store, root)
    features, columns = _lerobot_features(buffer, store, use_videos, state)
    dataset = LeRobotDataset.create(
        repo_id or f"local/{root.name}",
        fps=int(buffer.fps),
        features=features,
        root=root,
        robot_type=robot_type or buffer.attrs.get("robot_type"),
        use_videos=use_videos,
    )
    _write_episodes(buffer, dataset, columns, progress)
    dataset.finalize()
    return dataset


def _store_to_convert(store: str | Path, root: Path) -> ReplayBuffer:
    """The replay buffer at ``store``, checked for what a new LeRobot dataset needs."""
    buffer = ReplayBuffer.open(store)
    if root.exists():
        raise DatasetError(f"{root}: already exists; LeRobot writes a new dataset folder")
    if buffer.fps != round(buffer.fps):
        raise DatasetError(f"{store}: LeRobot needs an integer fps, the store has {buffer.fps}")
    if "action" not in buffer.keys:
        raise DatasetError(f"{store}: missing array data/action")
    return buffer


def _lerobot_features(
    buffer: ReplayBuffer, store: str | Path, use_videos: bool, state: str
) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """LeRobot's feature descriptions, and the arrays each feature is made of: one per
    array, plus ``observation.state`` composed of the arrays ``state`` selects."""
    features: dict[str, dict] = {}
    columns: dict[str, list[str]] = {}
    for key in buffer.keys:
        if key in buffer.cameras:
            lerobot_key = IMAGE_PREFIX + key
            features[lerobot_key] = _camera_feature(buffer, key, store, use_videos)
        else:
            lerobot_key = "action" if key == "action" else f"observation.{key}"
            shape = buffer.shape(key) or (1,)
            features[lerobot_key] = {"dtype": "float32", "shape": shape, "names": None}
        columns[lerobot_key] = [key]
    split = buffer.state_is_split or state != STATE_PROPRIO
    state_keys = buffer.resolve_state(state) if split else []
    if state_keys and state_keys != ["state"]:
        dim = sum(_width(buffer, k) for k in state_keys)
        features[OBS_STATE] = {"dtype": "float32", "shape": (dim,), "names": None}
        columns[OBS_STATE] = state_keys
    if OBS_STATE in features:
        features[OBS_STATE]["names"] = state_feature_names(
            {k: _width(buffer, k) for k in columns[OBS_STATE]}
        )
    return features, columns


def _width(buffer: ReplayBuffer, key: str) -> int:
    """How many values a frame of array ``key`` holds."""
    return int(np.prod(buffer.shape(key) or (1,)))


def _camera_feature(buffer: ReplayBuffer, key: str, store: str | Path, use_videos: bool) -> dict:
    shape = buffer.shape(key)
    if use_videos and min(shape[:2]) < MIN_VIDEO_SIDE_PX:
        raise DatasetError(
            f"{store}: data/{key} frames are {shape[0]}x{shape[1]}, too small for "
            f"lerobot's AV1 video encoder (at least {MIN_VIDEO_SIDE_PX} px a side); "
            "store them as images instead (--storage image)"
        )
    return {
        "dtype": "video" if use_videos else "image",
        "shape": shape,
        "names": ["height", "width", "channels"],
    }


def _write_episodes(
    buffer: ReplayBuffer, dataset, columns: dict[str, list[str]], progress: bool
) -> None:
    """Every episode of ``buffer`` into ``dataset``, frame by frame."""
    with tqdm(
        total=buffer.n_frames, desc="zarr -> lerobot", unit="frame", disable=not progress
    ) as bar:
        for episode_index in range(buffer.n_episodes):
            episode = buffer.get_episode(episode_index)
            task = buffer.episode_task(episode_index)
            text = task.instruction or task.name or "unspecified task"
            for t in range(len(episode["action"])):
                frame: dict = {"task": text}
                for lerobot_key, keys in columns.items():
                    if keys[0] in buffer.cameras:
                        frame[lerobot_key] = episode[keys[0]][t]
                    else:
                        frame[lerobot_key] = np.concatenate(
                            [np.atleast_1d(episode[k][t]).astype(np.float32) for k in keys]
                        )
                dataset.add_frame(frame)
                bar.update()
            # One camera after the other: a process pool forked from this process (which
            # runs zarr's I/O threads) is asking for deadlocks, and conversion is a one-off.
            dataset.save_episode(parallel_encoding=False)

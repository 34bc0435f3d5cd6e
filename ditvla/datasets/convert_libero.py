"""LIBERO HDF5 demonstrations (the official layout) to a zarr replay buffer.

One LIBERO file holds the demonstrations of one task::

    data/                      attrs: problem_info (JSON with "language_instruction")
      demo_0/actions           float (T, 7)
      demo_0/obs/agentview_rgb uint8 (T, H, W, 3), rendered upside down
      demo_0/obs/eye_in_hand_rgb
      demo_0/obs/{ee_pos (T,3), ee_ori (T,3), gripper_states (T,2), joint_states (T,7)}

The store gets cameras ``agentview`` and ``eye_in_hand`` (turned upright by default, as
the LIBERO evaluation environments and openpi's conversion present them), the four
low-dimensional arrays under their own names, ``state_keys`` = ee_pos + ee_ori +
gripper_states (the 8-D state openpi and OpenVLA-OFT use), and ``action``. The task name
is the file name without ``_demo``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer

LIBERO_CAMERAS = {"agentview_rgb": "agentview", "eye_in_hand_rgb": "eye_in_hand"}
LIBERO_LOW_DIM = ("ee_pos", "ee_ori", "gripper_states", "joint_states")
LIBERO_STATE_KEYS = ("ee_pos", "ee_ori", "gripper_states")
LIBERO_FPS = 20.0
LIBERO_ACTION_SPACE = (
    "ee_delta_pose: dx dy dz droll dpitch dyaw gripper (OSC_POSE, -1 open +1 close)"
)


def libero_files(inputs: Iterable[str | Path]) -> list[Path]:
    """HDF5 files named by ``inputs`` (files, or folders searched for ``*.hdf5``), sorted."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(item.glob("*.hdf5"))
            if not found:
                raise DatasetError(f"{item}: folder holds no *.hdf5 files")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise DatasetError(f"{item}: no such file or directory")
    return files


def _demo_names(path: Path, data: h5py.Group) -> list[str]:
    names = [n for n in data if re.fullmatch(r"demo_\d+", n)]
    if not names:
        raise DatasetError(f"{path}: data/ holds no demo_N groups")
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def _instruction(path: Path, data: h5py.Group) -> str:
    raw = data.attrs.get("problem_info")
    if raw is None:
        raise DatasetError(f"{path}: data/ has no problem_info attribute (the task instruction)")
    try:
        info = json.loads(raw if isinstance(raw, str) else bytes(raw).decode())
        instruction = info["language_instruction"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{path}: data.attrs['problem_info'] must be JSON with 'language_instruction' ({exc})"
        ) from None
    if isinstance(instruction, list):
        instruction = " ".join(instruction)
    return str(instruction).strip()


def _check_demo(path: Path, demo: h5py.Group) -> None:
    """Check a demo's structure from the HDF5 headers alone (no pixel data is read)."""
    where = f"{path}: {demo.name.lstrip('/')}"
    if "actions" not in demo or "obs" not in demo:
        raise DatasetError(f"{where} needs 'actions' and 'obs'")
    obs = demo["obs"]
    lengths = {"actions": demo["actions"].shape[0] if demo["actions"].ndim else 0}
    if demo["actions"].ndim != 2:
        raise DatasetError(f"{where}/actions must be (T, A), found {demo['actions'].shape}")
    for source in LIBERO_CAMERAS:
        if source not in obs:
            raise DatasetError(f"{where}/obs/{source} is missing (expected uint8 (T, H, W, 3))")
        frames = obs[source]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise DatasetError(
                f"{where}/obs/{source} must be uint8 (T, H, W, 3), found {frames.dtype} "
                f"{frames.shape}"
            )
        lengths[source] = frames.shape[0]
    for key in LIBERO_LOW_DIM:
        if key not in obs:
            raise DatasetError(f"{where}/obs/{key} is missing")
        if not np.issubdtype(obs[key].dtype, np.number):
            raise DatasetError(f"{where}/obs/{key} must be numeric, found {obs[key].dtype}")
        lengths[key] = obs[key].shape[0]
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise DatasetError(f"{where}: arrays must share one non-zero length, found {lengths}")


def _read_demo(demo: h5py.Group, flip_images: bool) -> dict[str, np.ndarray]:
    obs = demo["obs"]
    episode: dict[str, np.ndarray] = {"action": np.asarray(demo["actions"], dtype=np.float32)}
    for source, camera in LIBERO_CAMERAS.items():
        frames = np.asarray(obs[source])
        episode[camera] = np.ascontiguousarray(frames[:, ::-1, ::-1]) if flip_images else frames
    for key in LIBERO_LOW_DIM:
        values = np.asarray(obs[key], dtype=np.float32)
        episode[key] = values.reshape(len(values), -1)
    return episode


def convert_libero_hdf5(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    flip_images: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> ReplayBuffer:
    """Convert LIBERO HDF5 files (or folders of them) into one zarr replay buffer."""
    files = libero_files(inputs)
    plan = []
    for path in files:  # check every file's structure before writing anything
        try:
            with h5py.File(path, "r") as f:
                if "data" not in f:
                    raise DatasetError(f"{path}: no data/ group (not a LIBERO demonstration file)")
                demos = _demo_names(path, f["data"])
                for name in demos:
                    _check_demo(path, f["data"][name])
                plan.append((path, _instruction(path, f["data"]), demos))
        except OSError as exc:
            raise DatasetError(f"{path}: not a readable HDF5 file ({exc})") from None
    buffer = ReplayBuffer.create(
        out,
        fps=LIBERO_FPS,
        cameras=list(LIBERO_CAMERAS.values()),
        state_keys=LIBERO_STATE_KEYS,
        action_space=LIBERO_ACTION_SPACE,
        source="libero_hdf5: " + ", ".join(p.name for p in files),
        overwrite=overwrite,
    )
    total = sum(len(demos) for _, _, demos in plan)
    with tqdm(total=total, desc="libero -> zarr", unit="demo", disable=not progress) as bar:
        for path, instruction, demos in plan:
            task = path.stem.removesuffix("_demo")
            with h5py.File(path, "r") as f:
                for name in demos:
                    episode = _read_demo(f["data"][name], flip_images)
                    buffer.append_episode(episode, task=task, instruction=instruction)
                    bar.update()
    return buffer

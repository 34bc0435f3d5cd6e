"""LIBERO HDF5 demonstrations (the official layout) to a zarr replay buffer, and back.

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

:func:`zarr_to_libero_hdf5` writes a store holding those arrays (``ditvla collect --env
libero:...`` writes them) in the same layout, one file per task, as LIBERO's
``scripts/create_dataset.py`` does: images upside down again, ``ee_states`` (ee_pos +
ee_ori), ``rewards`` and ``dones`` (1 on the last frame), the instruction in
``problem_info``, ``num_samples`` per demo and ``num_demos`` / ``total``. What the store
does not hold is not written: the MuJoCo ``states`` and ``model_file`` that LIBERO's
files carry for replaying a demonstration in the simulator.
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


def zarr_to_libero_hdf5(
    store: str | Path,
    out: str | Path,
    *,
    flip_images: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write the episodes of ``store`` as LIBERO HDF5 files in the folder ``out``, one per
    task (``<task>_demo.hdf5``, a ``/`` in the name as ``_``); returns the files."""
    buffer = ReplayBuffer.open(store)
    needed = [*LIBERO_CAMERAS.values(), *LIBERO_LOW_DIM, "action"]
    missing = [key for key in needed if key not in buffer.keys]
    if missing:
        raise DatasetError(
            f"{store}: LIBERO's layout needs arrays {', '.join(missing)}, which the store "
            f"lacks (it has {', '.join(buffer.keys)})"
        )
    by_task: dict[str, list[int]] = {}
    for episode in range(buffer.n_episodes):
        by_task.setdefault(buffer.episode_task(episode).name, []).append(episode)
    out = Path(out)
    files = {task: out / f"{task.replace('/', '_')}_demo.hdf5" for task in by_task}
    existing = [str(f) for f in files.values() if f.exists()]
    if existing and not overwrite:
        raise DatasetError(f"{', '.join(existing)}: already exist(s) (pass overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=buffer.n_episodes, desc="zarr -> libero", unit="demo", disable=not progress
    ) as bar:
        for task, episodes in by_task.items():
            partial = files[task].with_suffix(".partial")
            with h5py.File(partial, "w") as f:
                data = f.create_group("data")
                instruction = buffer.episode_task(episodes[0]).instruction
                data.attrs["problem_info"] = json.dumps(
                    {"problem_name": task, "language_instruction": instruction}
                )
                data.attrs["macros_image_convention"] = "opengl"  # upside down, as LIBERO's
                total = 0
                for i, episode in enumerate(episodes):
                    arrays = buffer.get_episode(episode)
                    length = len(arrays["action"])
                    demo = data.create_group(f"demo_{i}")
                    demo.attrs["num_samples"] = length
                    demo.create_dataset("actions", data=arrays["action"].astype(np.float64))
                    obs = demo.create_group("obs")
                    for source, camera in LIBERO_CAMERAS.items():
                        frames = arrays[camera]
                        obs.create_dataset(
                            source, data=frames[:, ::-1, ::-1] if flip_images else frames
                        )
                    for key in LIBERO_LOW_DIM:
                        obs.create_dataset(key, data=arrays[key].astype(np.float64))
                    ee_states = np.hstack([arrays["ee_pos"], arrays["ee_ori"]])
                    obs.create_dataset("ee_states", data=ee_states.astype(np.float64))
                    last = np.zeros(length, np.uint8)
                    last[-1] = 1
                    demo.create_dataset("rewards", data=last)
                    demo.create_dataset("dones", data=last)
                    total += length
                    bar.update()
                data.attrs["num_demos"] = len(episodes)
                data.attrs["total"] = total
            partial.replace(files[task])
    return list(files.values())

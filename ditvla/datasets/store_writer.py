"""Writing to a store so that a crash never leaves half of a write visible.

Appending an episode first records ``pending_append = {"episode": E, "frame": T}`` in
the root attributes (zarr's LocalStore replaces files atomically), then writes the data
arrays, then ``meta/*``, and clears the marker last. A store opened with the marker set
is read as it was before the append (:mod:`~ditvla.datasets.store_index`), and the next
append overwrites the leftover rows. ``add_arrays`` works the same way with
``pending_arrays``. The named :func:`~ditvla.crash_points.crash_point` calls let tests
crash a process at each step and check what the store shows afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from ditvla.crash_points import crash_point
from ditvla.datasets.errors import DatasetError
from ditvla.datasets.store_index import StoreIndex
from ditvla.datasets.store_layout import (
    LOW_DIM_CHUNK_ROWS,
    PENDING_APPEND,
    PENDING_ARRAYS,
    Task,
    blosc_zstd,
    is_image_array,
)


class StoreWriter:
    """Writes episodes, arrays and attributes into the store ``root`` and keeps its
    ``index`` (shared with the reader) up to date as each write commits."""

    def __init__(self, root: zarr.Group, index: StoreIndex):
        self._root = root
        self._index = index

    def append_episode(
        self, episode: Mapping[str, np.ndarray], task: str, instruction: str, seed: int | None
    ) -> int:
        """Append one episode atomically and return its index."""
        arrays = checked_episode(self._index, episode)
        length = next(iter(arrays.values())).shape[0]
        n_episodes = len(self._index.episode_ends)
        # Every chunk goes to disk, even one of zeros, so that a missing file means damage.
        with zarr.config.set({"array.write_empty_chunks": True}):
            self._write_episode(arrays, length, task, instruction, seed)
        return n_episodes

    def _write_episode(
        self,
        arrays: dict[str, np.ndarray],
        length: int,
        task: str,
        instruction: str,
        seed: int | None,
    ) -> None:
        index = self._index
        n_frames, n_episodes = index.n_frames, len(index.episode_ends)
        root, meta = self._root, self._root["meta"]
        root.attrs[PENDING_APPEND] = {"episode": n_episodes, "frame": n_frames}
        if n_frames == 0:  # arrays left by an interrupted first append: start afresh
            for key in list(root["data"].array_keys()):
                del root["data"][key]
            index.arrays.clear()
        task_index = self._task_index(task, instruction)
        for key, value in arrays.items():
            array = self._ensure_array(key, value)
            array.resize((n_frames + length, *value.shape[1:]))
            array[n_frames:] = value
            crash_point("replay_buffer.append.array_written")
        seed_value = -1 if seed is None else int(seed)
        for name, value in (
            ("episode_ends", n_frames + length),
            ("episode_task_index", task_index),
            ("episode_seed", seed_value),
        ):
            meta[name].resize((n_episodes + 1,))
            meta[name][n_episodes] = value
        crash_point("replay_buffer.append.meta_written")
        attrs = dict(root.attrs)
        attrs.pop(PENDING_APPEND)
        attrs.pop("stats", None)  # stale once the frames change
        root.attrs.put(attrs)

        index.attrs = attrs
        index.episode_ends = np.append(index.episode_ends, n_frames + length)
        index.episode_task_index = np.append(index.episode_task_index, task_index)
        index.episode_seed = np.append(index.episode_seed, seed_value)
        index.n_frames = n_frames + length
        index.interrupted_append = False

    def _task_index(self, task: str, instruction: str) -> int:
        """The row of (task, instruction) in the task table, added if new."""
        tasks = self._index.tasks
        for i, t in enumerate(tasks):
            if t.name == task and t.instruction == instruction:
                return i
        tasks.append(Task(task, instruction))
        self._root["meta"].attrs["tasks"] = [t.__dict__ for t in tasks]
        return len(tasks) - 1

    def _ensure_array(self, key: str, value: np.ndarray) -> zarr.Array:
        """``data/<key>``, made empty (0, ...) with frames shaped like ``value``'s if new."""
        arrays = self._index.arrays
        if key in arrays:
            return arrays[key]
        frame_shape = value.shape[1:]
        rows = 1 if key in self._index.cameras else LOW_DIM_CHUNK_ROWS
        array = self._root["data"].create_array(
            key,
            shape=(0, *frame_shape),
            dtype=value.dtype,
            chunks=(rows, *frame_shape),
            compressors=blosc_zstd(),
        )
        arrays[key] = array
        return array

    def add_arrays(self, arrays: Mapping[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Add whole arrays (T, ...) beside the existing ones, then set ``attrs``; an
        interrupted call leaves the store as it was and can simply be run again."""
        index, root = self._index, self._root
        for key, value in arrays.items():
            if len(value) != index.n_frames:
                raise DatasetError(
                    f"{index.path}: array {key!r} has {len(value)} rows, the store {index.n_frames}"
                )
            if key in index.arrays:
                raise DatasetError(f"{index.path}: data/{key} exists already")
        root.attrs[PENDING_ARRAYS] = list(arrays)
        with zarr.config.set({"array.write_empty_chunks": True}):
            for key, value in arrays.items():
                if key in root["data"]:  # left by an interrupted call
                    del root["data"][key]
                array = root["data"].create_array(
                    key,
                    shape=value.shape,
                    dtype=value.dtype,
                    chunks=(LOW_DIM_CHUNK_ROWS, *value.shape[1:]),
                    compressors=blosc_zstd(),
                )
                array[:] = value
                index.arrays[key] = array
        current = dict(root.attrs)
        current.pop(PENDING_ARRAYS)
        current.pop("stats", None)  # computed again with the new arrays
        current.update(attrs)
        root.attrs.put(current)
        index.attrs = current

    def set_attrs(self, values: dict[str, Any]) -> None:
        """Update dataset attributes (JSON-serialisable values)."""
        json.dumps(values)
        self._root.attrs.update(values)
        self._index.attrs.update(values)


def checked_episode(index: StoreIndex, episode: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``episode``'s arrays as they will be stored (floats as float32), after checking that
    they share one length and match the store's keys, cameras, frame shapes and dtypes."""
    path = index.path
    if not episode:
        raise DatasetError(f"{path}: an episode needs at least one array")
    arrays = {k: np.asarray(v) for k, v in episode.items()}
    lengths = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    length = next(iter(lengths.values()))
    if length == 0 or any(n != length for n in lengths.values()):
        raise DatasetError(f"{path}: episode arrays must share one non-zero length, got {lengths}")
    if index.n_frames and set(arrays) != set(index.arrays):
        missing = sorted(set(index.arrays) - set(arrays))
        extra = sorted(set(arrays) - set(index.arrays))
        raise DatasetError(
            f"{path}: episode keys differ from the store's: missing {missing}, extra {extra}"
        )
    for cam in index.cameras:
        if cam not in arrays:
            raise DatasetError(f"{path}: episode lacks camera {cam!r}")
    for key, value in arrays.items():
        arrays[key] = _checked_episode_array(index, key, value)
    return arrays


def _checked_episode_array(index: StoreIndex, key: str, value: np.ndarray) -> np.ndarray:
    """One array of an episode as it will be stored, checked against the store's."""
    path = index.path
    if key in index.cameras:
        if not is_image_array(value.shape, value.dtype):
            raise DatasetError(
                f"{path}: camera {key!r} must be uint8 (T, H, W, 3), got {value.dtype} "
                f"{value.shape}"
            )
    elif np.issubdtype(value.dtype, np.floating):
        if not np.all(np.isfinite(value)):
            raise DatasetError(f"{path}: episode array {key!r} holds NaN or infinite values")
        value = value.astype(np.float32, copy=False)
    elif not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
        raise DatasetError(f"{path}: episode array {key!r} has unsupported dtype {value.dtype}")
    if index.n_frames:
        existing = index.arrays[key]
        if tuple(existing.shape[1:]) != tuple(value.shape[1:]):
            raise DatasetError(
                f"{path}: episode array {key!r} has frames of shape {value.shape[1:]}, the "
                f"store holds {tuple(existing.shape[1:])}"
            )
        if np.dtype(existing.dtype) != value.dtype:
            raise DatasetError(
                f"{path}: episode array {key!r} has dtype {value.dtype}, the store holds "
                f"{existing.dtype}"
            )
    return value

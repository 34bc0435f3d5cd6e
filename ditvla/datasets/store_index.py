"""Opening a store: checking it is a replay buffer and indexing what it holds.

A store is checked once, when it is opened, and everything later reads trust rests on
is kept in a :class:`StoreIndex`: the committed episodes and frames, the arrays holding
them, the cameras, the attributes and the per-episode metadata. What an interrupted
write left behind (rows past the last committed episode under the pending-append
marker, arrays named by the pending-arrays marker) is left out of the index, so a
reader sees the store as it was before that write. Like LeRobot's dataset metadata, the
index is apart from reading frames; :class:`~ditvla.datasets.store_writer.StoreWriter`
keeps it up to date as it commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ditvla.datasets.checked_reads import read_rows
from ditvla.datasets.errors import DatasetError
from ditvla.datasets.store_layout import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PENDING_APPEND,
    PENDING_ARRAYS,
    Task,
    is_image_array,
)
from ditvla.datasets.url_stores import access_error, is_url, open_url_store
from ditvla.errors import ConfigError


@dataclass
class StoreIndex:
    """What the store at ``path`` holds, as far as committed writes go.

    ``episode_ends``, ``episode_task_index`` and ``episode_seed`` are int64 (E,);
    ``arrays`` are the committed ``data/`` arrays by key; ``interrupted_append``: the store
    carries the marker of an append that did not finish."""

    path: Path
    episode_ends: np.ndarray
    n_frames: int
    interrupted_append: bool
    arrays: dict[str, zarr.Array]
    cameras: list[str]
    attrs: dict[str, Any]
    tasks: list[Task]
    episode_task_index: np.ndarray
    episode_seed: np.ndarray


def open_store_group(location: Path | str, mode: str, kept: Path | None = None) -> zarr.Group:
    """The root group of the store at ``location`` (a folder, or a URL read through
    fsspec): ``mode="r"`` to read, ``"a"`` to append (folders only). A store by URL opened
    with ``kept`` (a local folder) keeps each object it reads there and reads it from there
    after."""
    if mode not in ("r", "a"):
        raise ConfigError(f"mode must be 'r' or 'a', got {mode!r}")
    if is_url(location):
        if mode != "r":
            raise DatasetError(
                f"{location}: a store by URL opens read-only; write into a local folder "
                "and upload it"
            )
        target = open_url_store(str(location), kept)
    elif not Path(location).exists():
        raise DatasetError(f"{location}: no such file or directory")
    else:
        target = str(location)
    try:
        root = zarr.open_group(target, mode="r" if mode == "r" else "r+")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise access_error(location, exc) or DatasetError(
            f"{location}: not a zarr replay buffer (expected a zarr group with data/ and "
            f"meta/episode_ends): {exc}"
        ) from None
    if mode == "a" and root.metadata.zarr_format != 3:
        raise DatasetError(
            f"{location}: zarr v{root.metadata.zarr_format} stores open read-only; to append "
            "episodes, write them into a new store (ReplayBuffer.create)"
        )
    return root


def read_store_index(root: zarr.Group, path: Path | str) -> StoreIndex:
    """Check the store's layout and metadata and index what it holds; a
    :class:`DatasetError` names the first thing found wrong."""
    attrs = dict(root.attrs)
    _check_layout(root, path, attrs)
    pending = attrs.get(PENDING_APPEND)
    ends = _committed_episode_ends(root["meta"], path, pending)
    n_frames = int(ends[-1]) if len(ends) else 0
    if pending is not None and int(pending["frame"]) != n_frames:
        raise DatasetError(
            f"{path}: interrupted append marker says {pending['frame']} frames but "
            f"meta/episode_ends ends at {n_frames}"
        )
    arrays = _committed_arrays(root["data"], path, attrs, n_frames, pending is not None)
    if len(ends) and not arrays:
        raise DatasetError(f"{path}: data/ holds no arrays but meta/episode_ends lists episodes")
    cameras = _checked_cameras(path, attrs, arrays)
    tasks = [Task(**t) for t in root["meta"].attrs.get("tasks", [])]
    task_index = _optional_meta(root["meta"], path, "episode_task_index", len(ends), -1)
    seed = _optional_meta(root["meta"], path, "episode_seed", len(ends), -1)
    bad = (task_index >= len(tasks)) | ((task_index < 0) & (len(tasks) > 0))
    if np.any(bad):
        raise DatasetError(
            f"{path}: meta/episode_task_index points outside the task table ({len(tasks)} tasks)"
        )
    return StoreIndex(
        path=path,
        episode_ends=ends,
        n_frames=n_frames,
        interrupted_append=pending is not None,
        arrays=arrays,
        cameras=cameras,
        attrs=attrs,
        tasks=tasks,
        episode_task_index=task_index,
        episode_seed=seed,
    )


def _check_layout(root: zarr.Group, path: Path, attrs: dict[str, Any]) -> None:
    """The groups and the array every replay buffer has, written by a ditvla this one
    can read."""
    if "data" not in root or not isinstance(root["data"], zarr.Group):
        raise DatasetError(f"{path}: not a replay buffer: missing group data/")
    if "meta" not in root or "episode_ends" not in root["meta"]:
        raise DatasetError(f"{path}: not a replay buffer: missing array meta/episode_ends")
    if attrs.get("format") == FORMAT_NAME and attrs.get("format_version", 0) > FORMAT_VERSION:
        raise DatasetError(
            f"{path}: written by a newer ditvla (format_version {attrs['format_version']}, "
            f"this version reads up to {FORMAT_VERSION}); upgrade ditvla"
        )


def _committed_episode_ends(meta: zarr.Group, path: Path, pending: dict | None) -> np.ndarray:
    """``meta/episode_ends`` up to the last committed episode, int64 (E,)."""
    array = meta["episode_ends"]
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(
            f"{path}: meta/episode_ends must be a 1-D integer array, found shape "
            f"{array.shape} dtype {array.dtype}"
        )
    n_episodes = array.shape[0] if pending is None else int(pending["episode"])
    ends = read_rows(path, array, "meta/episode_ends", 0, n_episodes).astype(np.int64)
    if n_episodes and (ends[0] <= 0 or np.any(np.diff(ends) <= 0)):
        raise DatasetError(f"{path}: meta/episode_ends must be positive and strictly increasing")
    return ends


def _committed_arrays(
    data: zarr.Group, path: Path, attrs: dict[str, Any], n_frames: int, interrupted: bool
) -> dict[str, zarr.Array]:
    """The ``data/`` arrays by key, each holding at least the committed frames (exactly
    those unless an append was interrupted); arrays an interrupted ``add_arrays`` left
    are not among them, nor are those of an interrupted first append (the store had none)."""
    if interrupted and n_frames == 0:
        return {}
    unfinished = set(attrs.get(PENDING_ARRAYS, ()))
    arrays = {}
    for key, array in sorted(data.arrays()):
        if key in unfinished:
            continue
        rows = array.shape[0] if array.ndim else 0
        if rows < n_frames or (not interrupted and rows != n_frames):
            raise DatasetError(
                f"{path}: data/{key} has {rows} rows but meta/episode_ends ends at {n_frames}"
            )
        arrays[key] = array
    return arrays


def _checked_cameras(path: Path, attrs: dict[str, Any], arrays: dict[str, zarr.Array]) -> list[str]:
    """The camera arrays, as the attributes name them (a foreign store's are inferred from
    the arrays), each uint8 (T, H, W, 3); every other array numeric or boolean."""
    cameras = attrs.get("cameras")
    if cameras is None:  # a foreign store: infer cameras from the arrays
        cameras = [k for k, a in arrays.items() if is_image_array(a.shape, a.dtype)]
    for cam in cameras:
        if arrays and cam not in arrays:
            raise DatasetError(
                f"{path}: camera {cam!r} is in the attributes but data/{cam} is missing"
            )
        if cam in arrays and not is_image_array(arrays[cam].shape, arrays[cam].dtype):
            raise DatasetError(
                f"{path}: data/{cam} must be uint8 (T, H, W, 3) camera frames, found shape "
                f"{arrays[cam].shape} dtype {arrays[cam].dtype}"
            )
    for key, a in arrays.items():
        if key not in cameras and not (
            np.issubdtype(a.dtype, np.floating)
            or np.issubdtype(a.dtype, np.integer)
            or a.dtype == np.bool_
        ):
            raise DatasetError(f"{path}: data/{key} has unsupported dtype {a.dtype}")
    return list(cameras)


def _optional_meta(
    meta: zarr.Group, path: Path, name: str, n_episodes: int, fill: int
) -> np.ndarray:
    """``meta/<name>`` for the committed episodes as int64 (E,); ``fill`` where the store
    has no such array (a foreign store)."""
    if name not in meta:
        return np.full(n_episodes, fill, dtype=np.int64)
    array = meta[name]
    if array.shape[0] < n_episodes:
        raise DatasetError(
            f"{path}: meta/{name} has {array.shape[0]} rows but meta/episode_ends lists "
            f"{n_episodes} episodes"
        )
    return read_rows(path, array, f"meta/{name}", 0, n_episodes).astype(np.int64)

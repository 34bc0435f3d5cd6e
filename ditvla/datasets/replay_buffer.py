"""The LIBERO-style zarr replay buffer (the diffusion-policy layout) on zarr v3.

Layout of a store::

    <store>.zarr/
      data/<key>                 time-major arrays, episodes concatenated: (T, ...)
      meta/episode_ends          int64 (E,), cumulative frame count at the end of each episode
      meta/episode_task_index    int32 (E,), row of the task table (meta attrs "tasks")
      meta/episode_seed          int64 (E,), simulator seed of the episode, -1 when unknown
      zarr.json attributes       fps, cameras, state_keys, action_space, source, stats

Cameras are ``uint8`` arrays of shape (T, H, W, 3) named by the camera. Low-dimensional
arrays (``action``, ``state`` or its parts) are ``float32`` (T, D).

Appending an episode is atomic. Before any array is touched, the root attributes record
``pending_append = {"episode": E, "frame": T}`` (zarr's LocalStore replaces files
atomically); the marker is removed only after every array holds the new episode. A reader
that finds the marker sees the store as it was before the append, so a process killed
mid-append (SIGKILL) leaves a store that opens with every complete episode and nothing of
the partial one; the next append overwrites the leftover rows.

Stores written by diffusion-policy or LIBERO conversions (zarr v2, ``data/*`` +
``meta/episode_ends`` and nothing else) open read-only as they are: their ``uint8`` arrays
of shape (T, H, W, 3) are taken as cameras.

:class:`ReplayBuffer` is the one face callers use; behind it, each job has its room:
:mod:`~ditvla.datasets.store_layout` (format names, markers, chunking, an empty store),
:mod:`~ditvla.datasets.store_index` (opening and checking a store, the index of what it
holds), :mod:`~ditvla.datasets.checked_reads` (reads that report damaged chunks),
:mod:`~ditvla.datasets.store_writer` (atomic appends behind the pending marker) and
:mod:`~ditvla.datasets.state_selection` (which arrays ``--state`` names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ditvla.datasets.checked_reads import damage_report, read_frame_rows, read_rows
from ditvla.datasets.chunk_files import FrameReader
from ditvla.datasets.errors import DatasetError
from ditvla.datasets.state_selection import (
    privileged_keys,
    resolve_auxiliary,
    resolve_state,
    state_is_split,
    state_keys,
)
from ditvla.datasets.store_index import StoreIndex, open_store_group, read_store_index
from ditvla.datasets.store_layout import Task, create_store_group, is_image_array
from ditvla.datasets.store_writer import StoreWriter
from ditvla.datasets.url_stores import is_url, objects_folder

__all__ = ["DatasetError", "ReplayBuffer", "Task", "is_image_array"]


class ReplayBuffer:
    """A zarr replay buffer on disk: episodes of time-major arrays plus per-episode metadata.

    Open one with :meth:`open` (validates the store) or make one with :meth:`create`.
    Every read goes through :meth:`read`, which turns a truncated or corrupt chunk into a
    :class:`DatasetError` that names the store, the array and the rows.
    """

    def __init__(
        self, root: zarr.Group, path: Path | str, *, writable: bool, kept: Path | None = None
    ):
        self._root = root
        self.path = path
        self.writable = writable
        self._kept = kept  # where a store by URL's objects are kept as they are read
        self._index: StoreIndex = read_store_index(root, path)
        self._writer = StoreWriter(root, self._index) if writable else None
        self._frame_readers: dict[str, FrameReader] = {}

    # ------------------------------------------------------------------ open/create
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        fps: float,
        cameras: Sequence[str] = (),
        state_keys: Sequence[str] = ("state",),
        privileged_keys: Sequence[str] = (),
        action_space: str = "",
        source: str = "",
        overwrite: bool = False,
    ) -> ReplayBuffer:
        """Make an empty store at ``path`` (zarr v3). Arrays appear with the first episode.

        ``state_keys``: the arrays that make up the state a real robot has (proprioception),
        in order; ``privileged_keys``: state only a simulator knows (object poses, goals),
        recorded apart so that a policy reads it only when asked (``--state full``)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise DatasetError(f"{path}: already exists (pass overwrite=True to replace it)")
        if fps <= 0:
            raise DatasetError(f"{path}: fps must be positive, got {fps}")
        root = create_store_group(
            path,
            fps=fps,
            cameras=cameras,
            state_keys=state_keys,
            privileged_keys=privileged_keys,
            action_space=action_space,
            source=source,
        )
        return cls(root, path, writable=True)

    @classmethod
    def open(
        cls, path: str | Path, mode: str = "r", cache_dir: str | Path | None = None
    ) -> ReplayBuffer:
        """Open and validate an existing store: a folder, or a URL (``s3://bucket/x.zarr``,
        read-only, through fsspec); ``mode="a"`` to append episodes. ``cache_dir`` (a
        training run's ``<out>/cache``): a store by URL keeps the objects it reads there
        and reads each from the server once."""
        location = path if is_url(path) else Path(path)
        kept = objects_folder(str(location), cache_dir) if is_url(location) and cache_dir else None
        root = open_store_group(location, mode, kept)
        return cls(root, location, writable=mode == "a", kept=kept)

    # ------------------------------------------------------------------ the index
    @property
    def episode_ends(self) -> np.ndarray:
        """Cumulative frame count at the end of each committed episode, int64 (E,)."""
        return self._index.episode_ends

    @property
    def episode_task_index(self) -> np.ndarray:
        """Row of the task table of each episode (-1: none), int64 (E,)."""
        return self._index.episode_task_index

    @property
    def episode_seed(self) -> np.ndarray:
        """Simulator seed of each episode (-1: unknown), int64 (E,)."""
        return self._index.episode_seed

    @property
    def n_frames(self) -> int:
        return self._index.n_frames

    @property
    def interrupted_append(self) -> bool:
        """Whether the store carries the marker of an append that did not finish."""
        return self._index.interrupted_append

    @property
    def cameras(self) -> list[str]:
        return self._index.cameras

    @property
    def attrs(self) -> dict[str, Any]:
        return self._index.attrs

    @property
    def tasks(self) -> list[Task]:
        return self._index.tasks

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def fps(self) -> float:
        return float(self.attrs.get("fps", 0.0))

    @property
    def keys(self) -> list[str]:
        return list(self._index.arrays)

    @property
    def zarr_format(self) -> int:
        return self._root.metadata.zarr_format

    # ------------------------------------------------------------------ state arrays
    @property
    def state_keys(self) -> list[str]:
        """The arrays that make up the default state, in order."""
        return state_keys(self._index)

    @property
    def privileged_keys(self) -> list[str]:
        """State arrays only a simulator knows (object poses, goals), recorded apart."""
        return privileged_keys(self._index)

    @property
    def state_is_split(self) -> bool:
        """Whether proprioception and privileged state are told apart in this store.
        Meta-World stores written before they were hold one 39-D ``state`` of both."""
        return state_is_split(self.attrs)

    def resolve_auxiliary(self, selection: str) -> list[str]:
        """The privileged arrays ``--auxiliary`` names (see :mod:`state_selection`)."""
        return resolve_auxiliary(self._index, selection)

    def resolve_state(self, selection: str) -> list[str]:
        """The state arrays ``selection`` names: ``proprio`` (what a real robot has, the
        store's ``state_keys``), ``full`` (with the privileged arrays), ``none`` (no state:
        the cameras and the instruction alone) or ``KEY[,KEY...]``."""
        return resolve_state(self._index, selection)

    # ------------------------------------------------------------------ reading
    def shape(self, key: str) -> tuple[int, ...]:
        """Per-frame shape of ``data/<key>`` (without the time axis)."""
        return tuple(self.array(key).shape[1:])

    def dtype(self, key: str) -> np.dtype:
        return self.array(key).dtype

    def array(self, key: str) -> zarr.Array:
        arrays = self._index.arrays
        if key not in arrays:
            present = ", ".join(arrays) or "none"
            raise DatasetError(f"{self.path}: missing array data/{key} (arrays: {present})")
        return arrays[key]

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``data/<key>``, bounded by the committed frames."""
        if not 0 <= start <= stop <= self.n_frames:
            raise IndexError(f"{self.path}: rows {start}:{stop} outside 0:{self.n_frames}")
        return read_rows(self.path, self.array(key), f"data/{key}", start, stop)

    def read_frames(self, key: str, frames: np.ndarray) -> np.ndarray:
        """Rows at arbitrary committed frame indices of ``data/<key>``, (len(frames), ...)."""
        frames = np.asarray(frames, dtype=np.int64)
        if frames.size and (frames.min() < 0 or frames.max() >= self.n_frames):
            raise IndexError(f"{self.path}: frame index outside 0:{self.n_frames}")
        array = self.array(key)
        reader = self._frame_readers.get(key)
        if reader is None or reader.array is not array:  # new, or made again by a first append
            reader = self._frame_readers[key] = FrameReader(array, self._kept)
        return read_frame_rows(self.path, key, reader, frames)

    def read_all(self, key: str) -> np.ndarray:
        return self.read(key, 0, self.n_frames)

    def episode_bounds(self, episode: int) -> tuple[int, int]:
        if not 0 <= episode < self.n_episodes:
            raise IndexError(f"{self.path}: episode {episode} outside 0:{self.n_episodes}")
        start = int(self.episode_ends[episode - 1]) if episode else 0
        return start, int(self.episode_ends[episode])

    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    def get_episode(self, episode: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        start, stop = self.episode_bounds(episode)
        return {k: self.read(k, start, stop) for k in (keys or self.keys)}

    def episode_task(self, episode: int) -> Task:
        index = int(self.episode_task_index[episode])
        return self.tasks[index] if index >= 0 else Task(name="", instruction="")

    # ------------------------------------------------------------------ writing
    def _writer_to(self, what: str) -> StoreWriter:
        if self._writer is None:
            raise DatasetError(f"{self.path}: opened read-only; open with mode='a' to {what}")
        return self._writer

    def append_episode(
        self,
        episode: Mapping[str, np.ndarray],
        *,
        task: str = "",
        instruction: str = "",
        seed: int | None = None,
    ) -> int:
        """Append one episode atomically and return its index.

        ``episode`` maps data keys to arrays sharing their first (time) dimension. The
        first episode fixes the keys, per-frame shapes and dtypes of the store.
        """
        return self._writer_to("append").append_episode(episode, task, instruction, seed)

    def add_arrays(self, arrays: Mapping[str, np.ndarray], **attrs: Any) -> None:
        """Add whole arrays (T, ...) beside the existing ones, then set ``attrs``.

        Atomic like an append: the names are marked pending in the root attributes before
        any is written and the mark is cleared (with ``attrs`` set) after the last, so an
        interrupted call leaves the store as it was and can simply be run again."""
        self._writer_to("add arrays").add_arrays(arrays, attrs)

    def set_attrs(self, **values: Any) -> None:
        """Update dataset attributes (JSON-serialisable values)."""
        self._writer_to("change attributes").set_attrs(values)

    # ------------------------------------------------------------------ checking
    def check(self) -> list[str]:
        """Read every chunk of every array; return one line per problem found."""
        return damage_report(self.path, self._index.arrays, self.n_frames)

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer({str(self.path)!r}, episodes={self.n_episodes}, "
            f"frames={self.n_frames}, keys={self.keys})"
        )

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
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ditvla.datasets.chunk_files import ChunkReadError, FrameReader, chunk_file_problems
from ditvla.datasets.errors import DatasetError

FORMAT_NAME = "ditvla.replay_buffer"
FORMAT_VERSION = 1
PENDING_APPEND = "pending_append"
PENDING_ARRAYS = "pending_arrays"

# Images: one frame per chunk, the layout FrameReader reads fastest (sharded frames read
# 1.6x slower through zarr and cannot take the direct path). Low-dimensional arrays are
# read whole into memory by the sampler, so they get large chunks.
LOW_DIM_CHUNK_ROWS = 4096
META_CHUNK_ROWS = 4096


def _blosc_zstd() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def is_image_array(shape: Sequence[int], dtype: np.dtype) -> bool:
    """Whether an array of this per-store shape (T, ...) holds camera frames (T, H, W, 3)."""
    return np.dtype(dtype) == np.uint8 and len(shape) == 4 and shape[-1] == 3


@dataclass(frozen=True)
class Task:
    """One row of the task table: a short name and the language instruction given."""

    name: str
    instruction: str


class ReplayBuffer:
    """A zarr replay buffer on disk: episodes of time-major arrays plus per-episode metadata.

    Open one with :meth:`open` (validates the store) or make one with :meth:`create`.
    Every read goes through :meth:`read`, which turns a truncated or corrupt chunk into a
    :class:`DatasetError` that names the store, the array and the rows.
    """

    def __init__(self, root: zarr.Group, path: Path, *, writable: bool):
        self._root = root
        self.path = path
        self.writable = writable
        self._validate_and_index()

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
        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        root.attrs.update(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "fps": float(fps),
                "cameras": list(cameras),
                "state_keys": list(state_keys),
                "privileged_keys": list(privileged_keys),
                "action_space": action_space,
                "source": source,
            }
        )
        root.create_group("data")
        meta = root.create_group("meta")
        meta.attrs["tasks"] = []
        for name, dtype in (
            ("episode_ends", np.int64),
            ("episode_task_index", np.int32),
            ("episode_seed", np.int64),
        ):
            meta.create_array(name, shape=(0,), chunks=(META_CHUNK_ROWS,), dtype=dtype)
        return cls(root, path, writable=True)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> ReplayBuffer:
        """Open and validate an existing store; ``mode="a"`` to append episodes."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"{path}: no such file or directory")
        try:
            root = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        except Exception as exc:  # zarr raises several types for "not a group"
            raise DatasetError(
                f"{path}: not a zarr replay buffer (expected a zarr group with data/ and "
                f"meta/episode_ends): {exc}"
            ) from None
        if mode == "a" and root.metadata.zarr_format != 3:
            raise DatasetError(
                f"{path}: zarr v{root.metadata.zarr_format} stores open read-only; to append "
                "episodes, write them into a new store (ReplayBuffer.create)"
            )
        return cls(root, path, writable=mode == "a")

    # ------------------------------------------------------------------ validation
    def _fail(self, message: str) -> DatasetError:
        return DatasetError(f"{self.path}: {message}")

    def _validate_and_index(self) -> None:
        root = self._root
        if "data" not in root or not isinstance(root["data"], zarr.Group):
            raise self._fail("not a replay buffer: missing group data/")
        if "meta" not in root or "episode_ends" not in root["meta"]:
            raise self._fail("not a replay buffer: missing array meta/episode_ends")
        attrs = dict(root.attrs)
        if attrs.get("format") == FORMAT_NAME and attrs.get("format_version", 0) > FORMAT_VERSION:
            raise self._fail(
                f"written by a newer ditvla (format_version {attrs['format_version']}, this "
                f"version reads up to {FORMAT_VERSION}); upgrade ditvla"
            )
        meta = root["meta"]
        ends_array = meta["episode_ends"]
        if ends_array.ndim != 1 or not np.issubdtype(ends_array.dtype, np.integer):
            raise self._fail(
                f"meta/episode_ends must be a 1-D integer array, found shape "
                f"{ends_array.shape} dtype {ends_array.dtype}"
            )
        pending = attrs.get(PENDING_APPEND)
        n_episodes = ends_array.shape[0] if pending is None else int(pending["episode"])
        ends = self._read_array(ends_array, "meta/episode_ends", 0, n_episodes).astype(np.int64)
        if n_episodes and (ends[0] <= 0 or np.any(np.diff(ends) <= 0)):
            raise self._fail("meta/episode_ends must be positive and strictly increasing")
        n_frames = int(ends[-1]) if n_episodes else 0
        if pending is not None and int(pending["frame"]) != n_frames:
            raise self._fail(
                f"interrupted append marker says {pending['frame']} frames but "
                f"meta/episode_ends ends at {n_frames}"
            )
        self.episode_ends = ends
        self.n_frames = n_frames
        self.interrupted_append = pending is not None

        data = root["data"]
        self._arrays: dict[str, zarr.Array] = {}
        self._frame_readers: dict[str, FrameReader] = {}
        unfinished = set(attrs.get(PENDING_ARRAYS, ()))  # an interrupted add_arrays
        for key, array in sorted(data.arrays()):
            if key in unfinished:
                continue
            rows = array.shape[0] if array.ndim else 0
            if rows < n_frames or (pending is None and rows != n_frames):
                raise self._fail(
                    f"data/{key} has {rows} rows but meta/episode_ends ends at {n_frames}"
                )
            self._arrays[key] = array
        if n_episodes and not self._arrays:
            raise self._fail("data/ holds no arrays but meta/episode_ends lists episodes")

        cameras = attrs.get("cameras")
        if cameras is None:  # a foreign store: infer cameras from the arrays
            cameras = [k for k, a in self._arrays.items() if is_image_array(a.shape, a.dtype)]
        for cam in cameras:
            if self._arrays and cam not in self._arrays:
                raise self._fail(f"camera {cam!r} is in the attributes but data/{cam} is missing")
            if cam in self._arrays:
                a = self._arrays[cam]
                if not is_image_array(a.shape, a.dtype):
                    raise self._fail(
                        f"data/{cam} must be uint8 (T, H, W, 3) camera frames, found shape "
                        f"{a.shape} dtype {a.dtype}"
                    )
        for key, a in self._arrays.items():
            if key not in cameras and not (
                np.issubdtype(a.dtype, np.floating)
                or np.issubdtype(a.dtype, np.integer)
                or a.dtype == np.bool_
            ):
                raise self._fail(f"data/{key} has unsupported dtype {a.dtype}")
        self.cameras: list[str] = list(cameras)
        self.attrs: dict[str, Any] = attrs

        self.tasks = [Task(**t) for t in meta.attrs.get("tasks", [])]
        self.episode_task_index = self._optional_meta("episode_task_index", n_episodes, -1)
        self.episode_seed = self._optional_meta("episode_seed", n_episodes, -1)
        bad = (self.episode_task_index >= len(self.tasks)) | (
            (self.episode_task_index < 0) & (len(self.tasks) > 0)
        )
        if np.any(bad):
            raise self._fail(
                f"meta/episode_task_index points outside the task table ({len(self.tasks)} tasks)"
            )

    def _optional_meta(self, name: str, n_episodes: int, fill: int) -> np.ndarray:
        meta = self._root["meta"]
        if name not in meta:
            return np.full(n_episodes, fill, dtype=np.int64)
        array = meta[name]
        if array.shape[0] < n_episodes:
            raise self._fail(
                f"meta/{name} has {array.shape[0]} rows but meta/episode_ends lists "
                f"{n_episodes} episodes"
            )
        return self._read_array(array, f"meta/{name}", 0, n_episodes).astype(np.int64)

    def _read_array(self, array: zarr.Array, name: str, start: int, stop: int) -> np.ndarray:
        problems = chunk_file_problems(array, start, stop)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise self._fail(
                f"{name} rows {start}:{stop}: {problems[0]}{more}; the store is damaged"
            )
        try:
            return np.asarray(array[start:stop])
        except Exception as exc:
            raise self._fail(
                f"{name} rows {start}:{stop} could not be read; a chunk is truncated or corrupt "
                f"({type(exc).__name__}: {exc})"
            ) from None

    # ------------------------------------------------------------------ reading
    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def fps(self) -> float:
        return float(self.attrs.get("fps", 0.0))

    @property
    def keys(self) -> list[str]:
        return list(self._arrays)

    @property
    def zarr_format(self) -> int:
        return self._root.metadata.zarr_format

    @property
    def state_keys(self) -> list[str]:
        """The arrays that make up the default state, in order."""
        keys = self.attrs.get("state_keys")
        if keys is None:
            keys = ["state"] if "state" in self._arrays else []
        return [k for k in keys if k in self._arrays] if self._arrays else list(keys)

    @property
    def privileged_keys(self) -> list[str]:
        """State arrays only a simulator knows (object poses, goals), recorded apart."""
        keys = self.attrs.get("privileged_keys", [])
        return [k for k in keys if k in self._arrays] if self._arrays else list(keys)

    @property
    def state_is_split(self) -> bool:
        """Whether proprioception and privileged state are told apart in this store.
        Meta-World stores written before they were hold one 39-D ``state`` of both."""
        source = str(self.attrs.get("source", ""))
        return bool(self.attrs.get("privileged_keys")) or not source.startswith("metaworld")

    def resolve_state(self, selection: str) -> list[str]:
        """The state arrays ``selection`` names: ``proprio`` (what a real robot has, the
        store's ``state_keys``), ``full`` (with the privileged arrays), ``none`` (no state:
        the cameras and the instruction alone) or ``KEY[,KEY...]``."""
        if selection == "none":
            return []
        if selection == "full":
            return [*self.state_keys, *self.privileged_keys]
        if selection == "proprio":
            if not self.state_is_split:
                raise self._fail(
                    "its state mixes proprioception and privileged simulator state (written "
                    "before they were recorded apart); split it with `ditvla dataset "
                    "split-state`, or train on it as it is with --state full"
                )
            return self.state_keys
        keys = [key.strip() for key in selection.split(",") if key.strip()]
        named = [*self.state_keys, *self.privileged_keys]
        others = [k for k in self._arrays if k not in (*named, *self.cameras, "action")]
        state_arrays = [*named, *others]
        missing = [key for key in keys if key not in self._arrays or key in self.cameras]
        if missing or not keys:
            raise self._fail(
                f"--state {selection!r}: no state array {', '.join(missing) or '(none given)'}; "
                f"the store has {', '.join(state_arrays) or 'none'} (proprio = "
                f"{' + '.join(self.state_keys) or 'none'}, full adds "
                f"{' + '.join(self.privileged_keys) or 'nothing'})"
            )
        return keys

    def shape(self, key: str) -> tuple[int, ...]:
        """Per-frame shape of ``data/<key>`` (without the time axis)."""
        return tuple(self.array(key).shape[1:])

    def dtype(self, key: str) -> np.dtype:
        return self.array(key).dtype

    def array(self, key: str) -> zarr.Array:
        if key not in self._arrays:
            present = ", ".join(self._arrays) or "none"
            raise self._fail(f"missing array data/{key} (arrays: {present})")
        return self._arrays[key]

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``data/<key>``, bounded by the committed frames."""
        if not 0 <= start <= stop <= self.n_frames:
            raise IndexError(f"{self.path}: rows {start}:{stop} outside 0:{self.n_frames}")
        return self._read_array(self.array(key), f"data/{key}", start, stop)

    def read_frames(self, key: str, frames: np.ndarray) -> np.ndarray:
        """Rows at arbitrary committed frame indices of ``data/<key>``, (len(frames), ...)."""
        frames = np.asarray(frames, dtype=np.int64)
        if frames.size and (frames.min() < 0 or frames.max() >= self.n_frames):
            raise IndexError(f"{self.path}: frame index outside 0:{self.n_frames}")
        reader = self._frame_readers.get(key)
        if reader is None:
            reader = self._frame_readers[key] = FrameReader(self.array(key))
        try:
            return reader.read(frames)
        except ChunkReadError as exc:
            raise self._fail(f"data/{key}: {exc}; the store is damaged") from None
        except Exception as exc:
            raise self._fail(
                f"data/{key} frames could not be read; a chunk is truncated or corrupt "
                f"({type(exc).__name__}: {exc})"
            ) from None

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
    def _task_index(self, task: str, instruction: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == task and t.instruction == instruction:
                return i
        self.tasks.append(Task(task, instruction))
        self._root["meta"].attrs["tasks"] = [t.__dict__ for t in self.tasks]
        return len(self.tasks) - 1

    def _check_episode(self, episode: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not episode:
            raise self._fail("an episode needs at least one array")
        arrays = {k: np.asarray(v) for k, v in episode.items()}
        lengths = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
        length = next(iter(lengths.values()))
        if length == 0 or any(n != length for n in lengths.values()):
            raise self._fail(f"episode arrays must share one non-zero length, got {lengths}")
        if self.n_frames and set(arrays) != set(self._arrays):
            missing = sorted(set(self._arrays) - set(arrays))
            extra = sorted(set(arrays) - set(self._arrays))
            raise self._fail(
                f"episode keys differ from the store's: missing {missing}, extra {extra}"
            )
        for cam in self.cameras:
            if cam not in arrays:
                raise self._fail(f"episode lacks camera {cam!r}")
        for key, value in arrays.items():
            if key in self.cameras:
                if not is_image_array(value.shape, value.dtype):
                    raise self._fail(
                        f"camera {key!r} must be uint8 (T, H, W, 3), got {value.dtype} "
                        f"{value.shape}"
                    )
            elif np.issubdtype(value.dtype, np.floating):
                if not np.all(np.isfinite(value)):
                    raise self._fail(f"episode array {key!r} holds NaN or infinite values")
                arrays[key] = value.astype(np.float32, copy=False)
            elif not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
                raise self._fail(f"episode array {key!r} has unsupported dtype {value.dtype}")
            if self.n_frames:
                existing = self._arrays[key]
                if tuple(existing.shape[1:]) != tuple(value.shape[1:]):
                    raise self._fail(
                        f"episode array {key!r} has frames of shape {value.shape[1:]}, the "
                        f"store holds {tuple(existing.shape[1:])}"
                    )
                if np.dtype(existing.dtype) != arrays[key].dtype:
                    raise self._fail(
                        f"episode array {key!r} has dtype {arrays[key].dtype}, the store holds "
                        f"{existing.dtype}"
                    )
        return arrays

    def _ensure_array(self, key: str, value: np.ndarray) -> zarr.Array:
        if key in self._arrays:
            return self._arrays[key]
        frame_shape = value.shape[1:]
        rows = 1 if key in self.cameras else LOW_DIM_CHUNK_ROWS
        array = self._root["data"].create_array(
            key,
            shape=(0, *frame_shape),
            dtype=value.dtype,
            chunks=(rows, *frame_shape),
            compressors=_blosc_zstd(),
        )
        self._arrays[key] = array
        return array

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
        if not self.writable:
            raise self._fail("opened read-only; open with mode='a' to append")
        arrays = self._check_episode(episode)
        length = next(iter(arrays.values())).shape[0]
        n_episodes = self.n_episodes
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
        n_frames, n_episodes = self.n_frames, self.n_episodes
        root, meta = self._root, self._root["meta"]
        root.attrs[PENDING_APPEND] = {"episode": n_episodes, "frame": n_frames}
        if n_frames == 0:  # arrays left by an interrupted first append: start afresh
            for key in list(root["data"].array_keys()):
                del root["data"][key]
            self._arrays.clear()
            self._frame_readers.clear()
        task_index = self._task_index(task, instruction)
        for key, value in arrays.items():
            array = self._ensure_array(key, value)
            array.resize((n_frames + length, *value.shape[1:]))
            array[n_frames:] = value
        for name, value in (
            ("episode_ends", n_frames + length),
            ("episode_task_index", task_index),
            ("episode_seed", -1 if seed is None else int(seed)),
        ):
            meta[name].resize((n_episodes + 1,))
            meta[name][n_episodes] = value
        attrs = dict(root.attrs)
        attrs.pop(PENDING_APPEND)
        attrs.pop("stats", None)  # stale once the frames change
        root.attrs.put(attrs)

        self.attrs = attrs
        self.episode_ends = np.append(self.episode_ends, n_frames + length)
        self.episode_task_index = np.append(self.episode_task_index, task_index)
        self.episode_seed = np.append(self.episode_seed, -1 if seed is None else int(seed))
        self.n_frames = n_frames + length
        self.interrupted_append = False

    def add_arrays(self, arrays: Mapping[str, np.ndarray], **attrs: Any) -> None:
        """Add whole arrays (T, ...) beside the existing ones, then set ``attrs``.

        Atomic like an append: the names are marked pending in the root attributes before
        any is written and the mark is cleared (with ``attrs`` set) after the last, so an
        interrupted call leaves the store as it was and can simply be run again."""
        if not self.writable:
            raise self._fail("opened read-only; open with mode='a' to add arrays")
        for key, value in arrays.items():
            if len(value) != self.n_frames:
                raise self._fail(f"array {key!r} has {len(value)} rows, the store {self.n_frames}")
            if key in self._arrays:
                raise self._fail(f"data/{key} exists already")
        root = self._root
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
                    compressors=_blosc_zstd(),
                )
                array[:] = value
                self._arrays[key] = array
        current = dict(root.attrs)
        current.pop(PENDING_ARRAYS)
        current.pop("stats", None)  # computed again with the new arrays
        current.update(attrs)
        root.attrs.put(current)
        self.attrs = current

    def set_attrs(self, **values: Any) -> None:
        """Update dataset attributes (JSON-serialisable values)."""
        if not self.writable:
            raise self._fail("opened read-only; open with mode='a' to change attributes")
        json.dumps(values)
        self._root.attrs.update(values)
        self.attrs.update(values)

    # ------------------------------------------------------------------ checking
    def check(self) -> list[str]:
        """Read every chunk of every array; return one line per problem found."""
        problems = []
        for key, array in self._arrays.items():
            step = max(array.chunks[0], 256)
            for start in range(0, self.n_frames, step):
                try:
                    self.read(key, start, min(start + step, self.n_frames))
                except DatasetError as exc:
                    problems.append(str(exc))
        return problems

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer({str(self.path)!r}, episodes={self.n_episodes}, "
            f"frames={self.n_frames}, keys={self.keys})"
        )

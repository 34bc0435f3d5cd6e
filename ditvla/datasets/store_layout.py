"""What a replay buffer store holds on disk: format names, markers, chunking, an empty store.

The layout itself is drawn in :mod:`ditvla.datasets.replay_buffer`. This module holds the
names and numbers that reading (:mod:`~ditvla.datasets.store_index`) and writing
(:mod:`~ditvla.datasets.store_writer`) must agree on, so that each is written once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

FORMAT_NAME = "ditvla.replay_buffer"
FORMAT_VERSION = 1
# Root attributes that mark a write under way; a reader sees the store as it was before.
PENDING_APPEND = "pending_append"  # {"episode": E, "frame": T} of an append_episode
PENDING_ARRAYS = "pending_arrays"  # the names of an add_arrays

# Images: one frame per chunk, the layout FrameReader reads fastest (sharded frames read
# 1.6x slower through zarr and cannot take the direct path). Low-dimensional arrays are
# read whole into memory by the sampler, so they get large chunks.
LOW_DIM_CHUNK_ROWS = 4096
# A copy for object storage (ditvla dataset pack): this many frames of a camera per object
# (a zarr shard of one-frame chunks), one request where the folder's layout makes as many.
FRAMES_PER_OBJECT = 256
META_CHUNK_ROWS = 4096


# A privileged array whose width differs between the tasks of a store (robosuite's object
# observations: 10 numbers for Lift, 14 for PickPlaceCan) is stored zero-padded to the
# widest task's, beside a boolean array of the same shape that marks the real columns of
# each frame: data/objects (T, 14) with data/objects_valid (T, 14).
VALID_SUFFIX = "_valid"


def valid_mask_key(key: str) -> str:
    """The array marking which columns of the padded privileged array ``key`` are real."""
    return key + VALID_SUFFIX


def padded_to_widths(
    episode: Mapping[str, np.ndarray], widths: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """``episode`` with each array named in ``widths`` zero-padded (T, w) -> (T, widths[key])
    and its ``valid_mask_key`` array beside it (True on the w real columns)."""
    arrays = dict(episode)
    for key, width in widths.items():
        values = np.asarray(arrays[key])
        length, real = values.shape[0], values.shape[1]
        if real > width:
            raise ValueError(f"array {key!r} has {real} columns, more than the {width} stored")
        padded = np.zeros((length, width), values.dtype)
        padded[:, :real] = values
        valid = np.zeros((length, width), np.bool_)
        valid[:, :real] = True
        arrays[key], arrays[valid_mask_key(key)] = padded, valid
    return arrays


def blosc_zstd() -> BloscCodec:
    """The compressor of every data array."""
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def is_image_array(shape: Sequence[int], dtype: np.dtype) -> bool:
    """Whether an array of this per-store shape (T, ...) holds camera frames (T, H, W, 3)."""
    return np.dtype(dtype) == np.uint8 and len(shape) == 4 and shape[-1] == 3


@dataclass(frozen=True)
class Task:
    """One row of the task table: a short name and the language instruction given."""

    name: str
    instruction: str


def create_store_group(
    path: Path,
    *,
    fps: float,
    cameras: Sequence[str],
    state_keys: Sequence[str],
    privileged_keys: Sequence[str],
    action_space: str,
    source: str,
) -> zarr.Group:
    """Write an empty store (zarr v3) at ``path``: the root attributes, an empty ``data/``
    and empty per-episode ``meta/`` arrays. Data arrays appear with the first episode."""
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
    return root

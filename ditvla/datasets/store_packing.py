"""A copy of a store laid out for object storage: many frames per object (zarr sharding).

A store as ``ditvla collect`` writes it holds one frame per chunk file, the layout a local
disk reads fastest (:mod:`~ditvla.datasets.chunk_files`). On an object store each of those
files is one object: uploading a store of 35,000 frames is 70,000 requests for two cameras,
and a training run's first epoch fetches every frame with a request of its own.
:func:`pack_store` writes a copy whose camera arrays hold :data:`FRAMES_PER_OBJECT` frames
per object (a zarr shard of one-frame chunks: zarr still reads one frame by a byte range,
and a run keeps each shard whole, :class:`~ditvla.datasets.url_stores.KeptObjects`); the
other arrays are copied as they are. The copy reads as its source does, in every array,
attribute and task.

The copy is written under ``<out>.partial`` and moved to ``out`` when it is complete, so an
interrupted pack never leaves a store that looks whole; running it again starts over. A
store it replaces (``overwrite``) is moved aside first and deleted only once the copy is
in place. The copy is always a ditvla store (zarr v3), also from a diffusion-policy zarr v2
source: the other arrays are rechunked to the usual rows and compressed as ``collect``
compresses them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zarr
from tqdm.auto import tqdm

from ditvla.datasets.errors import DatasetError
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.store_layout import (
    FRAMES_PER_OBJECT,
    LOW_DIM_CHUNK_ROWS,
    PENDING_APPEND,
    PENDING_ARRAYS,
    blosc_zstd,
    create_store_group,
)
from ditvla.datasets.url_stores import is_url


def pack_store(
    source: str | Path,
    out: str | Path,
    *,
    frames_per_object: int = FRAMES_PER_OBJECT,
    overwrite: bool = False,
    progress: bool = True,
) -> ReplayBuffer:
    """Copy the store at ``source`` (a folder or a URL) to the folder ``out`` with
    ``frames_per_object`` frames of each camera per object; the copy, opened."""
    if frames_per_object < 1:
        raise DatasetError(f"frames_per_object must be at least 1, got {frames_per_object}")
    out = Path(out).absolute()
    if not is_url(source):
        here = Path(source).absolute()
        if out == here or out.is_relative_to(here) or here.is_relative_to(out):
            raise DatasetError(
                f"{out}: is, holds or lies inside the store being packed ({here}); write "
                "the copy elsewhere"
            )
    if out.exists() and not overwrite:
        raise DatasetError(f"{out}: already exists (pass --overwrite to replace it)")
    buffer = ReplayBuffer.open(source)
    partial, replaced = (out.with_name(out.name + suffix) for suffix in (".partial", ".replaced"))
    shutil.rmtree(partial, ignore_errors=True)
    # every chunk written, zeros too: a chunk file missing is damage to this store's readers
    with zarr.config.set({"array.write_empty_chunks": True}):
        root = _empty_copy(buffer, partial)
        _copy_arrays(buffer, root, frames_per_object, progress)
    if out.exists():  # moved aside, not deleted, until the copy is in place
        shutil.rmtree(replaced, ignore_errors=True)
        out.rename(replaced)
    partial.rename(out)
    shutil.rmtree(replaced, ignore_errors=True)
    return ReplayBuffer.open(out)


def _copy_arrays(
    buffer: ReplayBuffer, root: zarr.Group, frames_per_object: int, progress: bool
) -> None:
    """``buffer``'s committed frames into ``root``: cameras ``frames_per_object`` frames per
    shard of one-frame chunks, the other arrays in chunks of the store's usual rows."""
    frames = buffer.n_frames
    with tqdm(
        total=frames * len(buffer.keys), desc="pack", unit="frame", disable=not progress
    ) as bar:
        for key in buffer.keys:
            shape = (frames, *buffer.shape(key))
            camera = key in buffer.cameras
            rows = frames_per_object if camera else LOW_DIM_CHUNK_ROWS
            array = root["data"].create_array(
                key,
                shape=shape,
                dtype=buffer.dtype(key),
                chunks=(1 if camera else rows, *shape[1:]),
                shards=(rows, *shape[1:]) if camera else None,
                compressors=blosc_zstd(),
            )
            for start in range(0, frames, rows):
                stop = min(start + rows, frames)
                array[start:stop] = buffer.read(key, start, stop)
                bar.update(stop - start)


def _empty_copy(buffer: ReplayBuffer, path: Path) -> zarr.Group:
    """A store at ``path`` with ``buffer``'s attributes, tasks and episodes, no data yet."""
    attrs = buffer.attrs
    root = create_store_group(
        path,
        fps=buffer.fps,
        cameras=buffer.cameras,
        state_keys=buffer.state_keys,
        privileged_keys=buffer.privileged_keys,
        action_space=attrs.get("action_space", ""),
        source=attrs.get("source", ""),
    )
    kept = {k: v for k, v in attrs.items() if k not in (PENDING_APPEND, PENDING_ARRAYS)}
    root.attrs.put({**root.attrs, **kept})
    meta = root["meta"]
    meta.attrs["tasks"] = [task.__dict__ for task in buffer.tasks]
    for name in meta.array_keys():  # the per-episode arrays create_store_group made
        values = getattr(buffer, name)
        meta[name].resize(values.shape)
        meta[name][:] = values
    return root

"""Chunk files of a zarr array on a local disk: checked, and read directly for speed.

Two things zarr does not do for us live here. First, zarr reads a missing chunk file as
the fill value and Blosc-decodes a truncated one into garbage without complaint, so
:func:`chunk_file_problems` checks the files behind a range of rows before they are
trusted. Second, random access to single frames:

zarr-python 3 routes every read through its asyncio event loop and a thread pool, which
costs an order of magnitude more per chunk than reading the chunk file and Blosc-decoding
it directly (measured in docs/benchmarks.md). The
sampler reads a few frames per sample, so for the layout :class:`ReplayBuffer` writes
(one frame per chunk, no sharding, Blosc or no compressor, on a local directory, zarr v2
or v3) :class:`FrameReader` reads chunk files itself. Any other layout goes through zarr.

The fast path is stricter than zarr: a missing chunk file is an error here, where zarr
would silently return the fill value.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.metadata import ArrayV2Metadata, ArrayV3Metadata
from zarr.storage import LocalStore

EMPTY_CHUNK = 2**64 - 1  # a shard index's offset and size of a chunk never written


class ChunkReadError(OSError):
    """A chunk file that is missing, truncated or does not decode to one frame."""


def _codec_of(codecs: tuple) -> str | None:
    """'blosc' or 'raw' for zarr v3 codecs a chunk decodes through without zarr, else None."""
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    if len(codecs) == 1:
        return "raw"
    if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
        return "blosc"
    return None


def _direct_codec(array: zarr.Array) -> str | None:
    """'blosc' or 'raw' when chunks can be decoded without zarr, else None: chunk files,
    or the chunks inside shard files whose index (at the end, little-endian, CRC32C-checked:
    zarr's default) this module reads itself."""
    metadata = array.metadata
    if isinstance(metadata, ArrayV3Metadata):
        codecs = metadata.codecs
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            index = codecs[0].index_codecs
            plain_index = (
                str(getattr(codecs[0].index_location, "value", codecs[0].index_location)) == "end"
                and len(index) == 2
                and isinstance(index[0], BytesCodec)
                and isinstance(index[1], Crc32cCodec)
            )
            return _codec_of(codecs[0].codecs) if plain_index else None
        return _codec_of(codecs)
    if isinstance(metadata, ArrayV2Metadata):
        if metadata.filters or metadata.order != "C":
            return None
        if metadata.compressor is None:
            return "raw"
        return "blosc" if metadata.compressor.codec_id == "blosc" else None
    return None


def _blosc_size_problem(header: bytes, size: int) -> str | None:
    """Why a Blosc buffer of ``size`` bytes starting with ``header`` is incomplete, or None.

    Blosc does not notice truncation itself: its 16-byte header holds the compressed size
    (bytes 12:16, little-endian uint32).
    """
    if size < 16:
        return f"{size} bytes is shorter than a Blosc header"
    (compressed_bytes,) = struct.unpack_from("<I", header, 12)
    if compressed_bytes != size:
        return f"{size} bytes on disk, its Blosc header says {compressed_bytes}"
    return None


def chunk_file_problems(array: zarr.Array, start: int, stop: int) -> list[str]:
    """Missing or truncated chunk files behind rows ``start:stop`` of a local array.

    Only the Blosc header of each file is read (a shard's file, which is not one Blosc
    buffer, is only checked to be there). Arrays of other stores pass unchecked.
    """
    store = array.store_path.store
    if not isinstance(store, LocalStore) or stop <= start or array.ndim == 0:
        return []
    folder = Path(store.root) / array.store_path.path
    blosc_coded = _direct_codec(array) == "blosc" and array.shards is None
    rows = (array.shards or array.chunks)[0]  # the rows of one file: a shard's, or a chunk's
    zeros = (0,) * (array.ndim - 1)
    problems = []
    for i in range(start // rows, (stop - 1) // rows + 1):
        path = folder / array.metadata.encode_chunk_key((i, *zeros))
        try:
            with path.open("rb") as f:
                header = f.read(16)
                size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"chunk file {path} is missing")
            continue
        problem = _blosc_size_problem(header, size) if blosc_coded else None
        if problem:
            problems.append(f"chunk file {path} is truncated ({problem})")
    return problems


class FrameReader:
    """Reads frames ``array[i]`` for arbitrary frame indices ``i`` of one (T, ...) array.

    ``kept``: for an array of a store by URL, the local folder where the objects read from
    it are kept (:func:`~ditvla.datasets.url_stores.objects_folder`, the same keys): frames
    whose chunk or shard file is there are read from it directly, the others through zarr
    (which fetches and keeps them). A shard file's frame is found by the shard's index."""

    def __init__(self, array: zarr.Array, kept: Path | None = None):
        self.array = array
        self.frame_shape = tuple(array.shape[1:])
        self.frame_bytes = int(np.prod(self.frame_shape)) * array.dtype.itemsize
        store = array.store_path.store
        codec = _direct_codec(array)
        whole_frames = tuple(array.chunks) == (1, *self.frame_shape)
        # a shard of whole frames: (rows, *frame), read by its index
        self._shard_rows = array.shards[0] if array.shards else 0
        whole_shards = not array.shards or tuple(array.shards[1:]) == self.frame_shape
        readable = codec is not None and whole_frames and whole_shards and array.dtype.itemsize == 1
        # per shard file: (its size and mtime, its (rows, 2) offsets and sizes)
        self._shard_indexes: dict[Path, tuple[tuple[int, int], np.ndarray]] = {}
        self._direct = readable and isinstance(store, LocalStore)
        self._kept = readable and not self._direct and kept is not None
        self._codec = codec
        self._zeros = (0,) * len(self.frame_shape)
        if self._direct:
            self._folder = Path(store.root) / array.store_path.path
        elif self._kept:
            self._folder = Path(kept) / array.store_path.path

    @property
    def direct(self) -> bool:
        """Whether frames are read from chunk files without going through zarr."""
        return self._direct

    def _chunk_path(self, frame: int) -> Path:
        """The file holding ``frame``: its chunk's, or its shard's."""
        key = frame // self._shard_rows if self._shard_rows else frame
        return self._folder / self.array.metadata.encode_chunk_key((key, *self._zeros))

    def read_frame(self, frame: int) -> np.ndarray:
        try:
            return self._frame_from_file(frame)
        except FileNotFoundError:
            raise ChunkReadError(f"chunk file {self._chunk_path(frame)} is missing") from None

    def _frame_from_file(self, frame: int) -> np.ndarray:
        """``frame`` from its chunk or shard file; FileNotFoundError if there is none."""
        path = self._chunk_path(frame)
        if self._shard_rows:
            return self._frame_in_shard(path, frame % self._shard_rows)
        return self._decoded(path, path.read_bytes())

    def _frame_in_shard(self, path: Path, row: int) -> np.ndarray:
        """Frame ``row`` of the shard file ``path``: its bytes found by the shard's index
        (read once per version of the file: an append to the store rewrites its last
        shard), then decoded."""
        with path.open("rb") as f:
            stat = os.fstat(f.fileno())
            version = (stat.st_size, stat.st_mtime_ns)
            known = self._shard_indexes.get(path)
            if known is None or known[0] != version:
                known = self._shard_indexes[path] = (version, self._shard_index(f, stat.st_size))
            index = known[1]
            offset, size = (int(v) for v in index[row])
            if offset == EMPTY_CHUNK:  # never written: zarr reads the fill value
                return np.full(self.frame_shape, self.array.fill_value, self.array.dtype)
            f.seek(offset)
            raw = f.read(size)
        if len(raw) != size:
            raise ChunkReadError(f"shard file {path} is truncated (frame {row} cut short)")
        return self._decoded(path, raw)

    def _shard_index(self, f, size: int) -> np.ndarray:
        """The (rows, 2) offsets and sizes at the end of the open shard file ``f``."""
        length = self._shard_rows * 16 + 4
        if size < length:
            raise ChunkReadError(f"shard file {f.name} is truncated ({size} bytes, no index)")
        f.seek(size - length)
        raw = f.read(length)
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ChunkReadError(f"shard file {f.name} is damaged (its index fails its CRC32C)")
        return np.frombuffer(raw[:-4], dtype="<u8").reshape(self._shard_rows, 2)

    def _decoded(self, path: Path, raw: bytes) -> np.ndarray:
        """The frame in chunk file ``path``, whose bytes are ``raw``."""
        try:
            if self._codec == "blosc":
                problem = _blosc_size_problem(raw[:16], len(raw))
                if problem:
                    raise ValueError(problem)
                decoded = blosc.decompress(raw)
            else:
                decoded = raw
        except Exception as exc:
            raise ChunkReadError(f"chunk file {path} does not decode: {exc}") from None
        if len(decoded) != self.frame_bytes:
            raise ChunkReadError(
                f"chunk file {path} decodes to {len(decoded)} bytes, expected {self.frame_bytes}"
            )
        return np.frombuffer(decoded, dtype=self.array.dtype).reshape(self.frame_shape)

    def read(self, frames: np.ndarray) -> np.ndarray:
        """Frames at the given indices, shape (len(frames), *frame_shape)."""
        frames = np.asarray(frames, dtype=np.int64)
        if self._kept:
            return self._read_kept(frames)
        if not self._direct:
            return self._read_through_zarr(frames)
        out = np.empty((len(frames), *self.frame_shape), dtype=self.array.dtype)
        for i, frame in enumerate(frames):
            out[i] = self.read_frame(int(frame))
        return out

    def _read_through_zarr(self, frames: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(frames, return_inverse=True)
        return np.asarray(self.array.oindex[unique])[inverse]

    def _read_kept(self, frames: np.ndarray) -> np.ndarray:
        # a kept file is whole (zarr's local store writes by rename) and never removed
        out = np.empty((len(frames), *self.frame_shape), dtype=self.array.dtype)
        fetch = np.zeros(len(frames), dtype=bool)
        for i, frame in enumerate(frames):
            try:
                out[i] = self._frame_from_file(int(frame))
            except FileNotFoundError:  # not kept yet
                fetch[i] = True
        if fetch.any():
            out[fetch] = self._read_through_zarr(frames[fetch])
        return out

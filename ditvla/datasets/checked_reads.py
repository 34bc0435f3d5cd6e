"""Reads from a store that report damage instead of returning it as data.

zarr reads a missing chunk file as zeros and Blosc-decodes a truncated one into
garbage. Every read of a replay buffer goes through here: the chunk files behind the
rows are checked first (:func:`~ditvla.datasets.chunk_files.chunk_file_problems`), and
whatever still fails to decode becomes a :class:`DatasetError` that names the store, the
array and the rows, so damage is never mistaken for demonstrations. A store by URL whose
server cannot be reached or refuses access says that instead
(:func:`~ditvla.datasets.url_stores.access_error`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr

from ditvla.datasets.chunk_files import ChunkReadError, FrameReader, chunk_file_problems
from ditvla.datasets.errors import DatasetError
from ditvla.datasets.url_stores import access_error


def read_rows(path: Path, array: zarr.Array, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``array`` (called ``name`` in the store at ``path``)."""
    problems = chunk_file_problems(array, start, stop)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DatasetError(
            f"{path}: {name} rows {start}:{stop}: {problems[0]}{more}; the store is damaged"
        )
    try:
        return np.asarray(array[start:stop])
    except Exception as exc:
        raise access_error(path, exc) or DatasetError(
            f"{path}: {name} rows {start}:{stop} could not be read; a chunk is truncated or "
            f"corrupt ({type(exc).__name__}: {exc})"
        ) from None


def read_frame_rows(path: Path, key: str, reader: FrameReader, frames: np.ndarray) -> np.ndarray:
    """Rows at ``frames`` of ``data/<key>`` through its :class:`FrameReader`."""
    try:
        return reader.read(frames)
    except ChunkReadError as exc:
        raise DatasetError(f"{path}: data/{key}: {exc}; the store is damaged") from None
    except Exception as exc:
        raise access_error(path, exc) or DatasetError(
            f"{path}: data/{key} frames could not be read; a chunk is truncated or corrupt "
            f"({type(exc).__name__}: {exc})"
        ) from None


def damage_report(path: Path, arrays: Mapping[str, zarr.Array], n_frames: int) -> list[str]:
    """Read every chunk of the first ``n_frames`` rows of every array; one line per
    problem found."""
    problems = []
    for key, array in arrays.items():
        step = max(array.chunks[0], 256)
        for start in range(0, n_frames, step):
            try:
                read_rows(path, array, f"data/{key}", start, min(start + step, n_frames))
            except DatasetError as exc:
                problems.append(str(exc))
    return problems

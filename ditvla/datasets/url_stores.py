"""Stores by URL (``s3://``, ``gs://``, ``file://``...): opened read-only through zarr's
fsspec store, their access failures named, and the folder their derived data is kept in.

Options and credentials come from fsspec's own configuration, which every process that
opens the store (DataLoader workers, torchrun ranks) reads alike: environment variables
``FSSPEC_<SCHEME>_<OPTION>`` (``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3_KEY``,
``FSSPEC_S3_SECRET``) or ``FSSPEC_<SCHEME>`` holding a JSON object, JSON files in
``~/.config/fsspec/`` (``$FSSPEC_CONFIG_DIR``), or ``fsspec.config.conf`` in Python; for
``s3://`` also botocore's own (``AWS_ACCESS_KEY_ID``, ``~/.aws/credentials``...).

A store by URL is never written to. What ditvla derives from one (normalization
statistics, optical-flow targets) is kept in a folder of its own per URL: a training run's
``<out>/cache/`` (:func:`cache_folder` with the run's ``cache_dir``), else this machine's
``$DITVLA_CACHE`` (default ``~/.cache/ditvla``).

A training run also keeps each object it reads from the store (a frame's chunk, a shard
of many frames, metadata) in that folder, whole (:class:`KeptObjects`): an object crosses
the network once per run, and every later read of it (a training run reads each frame tens
of times) is a local file. Objects are written there atomically (zarr's local store), so
loader processes share the folder safely and an interrupted run leaves no torn copy.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.storage import WrapperStore

from ditvla.datasets.errors import DatasetError

# Exception classes (by name, any module: botocore, aiohttp, the builtins) that say the
# store's server was not reached, or that it refused the credentials.
_UNREACHABLE = {"ConnectionError", "TimeoutError", "ClientConnectionError", "HTTPClientError"}
_REFUSED = {"PermissionError", "NoCredentialsError", "PartialCredentialsError"}


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names a store by URL (``s3://``, ``gs://``, ``file://``...)."""
    return isinstance(location, str) and "://" in location


def open_url_store(url: str, kept: Path | None = None) -> Any:
    """A read-only zarr store at ``url`` through fsspec, configured by fsspec's config,
    connected (:func:`_connect`): an unreachable server or refused credentials raise here.
    With ``kept`` (a local folder: :func:`objects_folder`), each object is read from the
    server once and from that folder after."""
    from zarr.storage import FsspecStore, LocalStore

    try:
        store = FsspecStore.from_url(url, read_only=True)
    except (ImportError, ValueError) as exc:  # no filesystem for the scheme
        raise DatasetError(
            f"{url}: cannot open ({exc}); a store by URL needs fsspec's filesystem for its "
            "scheme (s3://: pip install s3fs; gs://: gcsfs)"
        ) from None
    try:
        _connect(store)
    except Exception as exc:
        raise access_error(url, exc) or DatasetError(
            f"{url}: cannot open ({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from None
    if kept is None:
        return store
    return KeptObjects(store, LocalStore(kept))


# The filesystems this process has connected, by id (fsspec keeps one per set of options
# and process: a store opened again finds its filesystem here).
_CONNECTED: dict[int, Any] = {}


def _connect(store: Any) -> None:
    """Make a filesystem's first request alone, and close its session when the process
    exits. s3fs (2026.2) takes a client that has not connected yet for a closed one and
    makes a new one for each request that starts before the first has connected; zarr's
    first reads are concurrent, so all clients but one would be dropped unclosed, and zarr
    closes none at exit: "Unclosed client session" on stderr (s3fs issue 1025, zarr-python
    issue 2901)."""
    fs = store.fs
    if not hasattr(fs, "set_session") or id(fs) in _CONNECTED:
        return
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    sync(store.get("zarr.json", default_buffer_prototype()))
    _CONNECTED[id(fs)] = fs
    atexit.register(_close_session, fs, os.getpid())


def _close_session(fs: Any, pid: int) -> None:
    if os.getpid() != pid:  # a forked process inherits the parent's exit handlers
        return
    from zarr.core.sync import sync

    with contextlib.suppress(Exception):
        sync(sync(fs.set_session()).close())


def _options(url: str, *names: str) -> str:
    """Where the options ``names`` of ``url``'s filesystem are set, in words."""
    scheme = url.split("://", 1)[0]
    variables = " and ".join(f"FSSPEC_{scheme.upper()}_{name.upper()}" for name in names)
    entries = ", ".join(f'"{name}": ...' for name in names)
    return f'{variables}, or {{"{scheme}": {{{entries}}}}} in ~/.config/fsspec/conf.json'


def access_error(location: Path | str, exc: BaseException) -> DatasetError | None:
    """A one-line error naming what went wrong when ``exc`` says the object store behind
    ``location`` could not be reached or refused access (and what would work); None for
    anything else (a folder or ``file://``, a missing or damaged store)."""
    if not is_url(location) or str(location).startswith("file://"):
        return None
    names = {cls.__name__ for cls in type(exc).__mro__}
    detail = " ".join(str(exc).split()) or type(exc).__name__
    s3 = str(location).startswith("s3://")
    if names & _REFUSED:
        aws = " (botocore's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY work too)" if s3 else ""
        return DatasetError(
            f"{location}: the object store refused access ({detail}); give credentials that "
            f"may read it: {_options(str(location), 'key', 'secret')}{aws}"
        )
    if names & _UNREACHABLE:
        return DatasetError(
            f"{location}: cannot reach the object store ({detail}); check that it is up and "
            f"set its address: {_options(str(location), 'endpoint_url')}"
        )
    return None


def cache_folder(url: str, cache_dir: str | Path | None = None) -> Path:
    """The folder holding what is derived from the store at ``url``, one per URL: under
    ``cache_dir`` (a training run's ``<out>/cache``), else under ``$DITVLA_CACHE``
    (default ``~/.cache/ditvla``)."""
    if cache_dir is None:
        cache_dir = os.environ.get("DITVLA_CACHE", Path.home() / ".cache" / "ditvla")
    return Path(cache_dir) / "stores" / hashlib.sha256(url.encode()).hexdigest()[:24]


def objects_folder(url: str, cache_dir: str | Path) -> Path:
    """Where a run keeping its derived data under ``cache_dir`` keeps the objects it read
    from the store at ``url``."""
    return cache_folder(url, cache_dir) / "objects"


class KeptObjects(WrapperStore):
    """A zarr store (``store``: the server's) read through the local zarr store ``kept``:
    each object is fetched whole the first time any part of it is read, written to
    ``kept``, and every read of it after (whole or a byte range) is served from there.

    zarr's own cache store keeps only what was asked for, and a sharded array is read by
    byte ranges of its shard (the index, then one frame): it would fetch a shard's frames
    one request each and keep the ranges in memory only, so every loader process and
    every epoch would fetch them again. Fetched whole, a shard of 256 frames is one
    request (per loader process that reads it before another has kept it). Listing and
    ``exists`` still ask the server."""

    def __init__(self, store: Store, kept: Store):
        super().__init__(store)
        self._kept = kept
        # the fetch in flight per object, of this process (a forked loader has its own loop)
        self._fetching: dict[str, asyncio.Future] = {}
        self._pid = os.getpid()

    def _with_store(self, store: Store) -> KeptObjects:
        return type(self)(store, self._kept)

    @property
    def _supports_sync_io(self) -> bool:
        return False  # zarr's synchronous reads would go around the kept folder

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        value = await self._kept.get(key, prototype, byte_range)
        if value is not None:
            return value
        if await self._fetched(key, prototype) is None:
            return None
        return await self._kept.get(key, prototype, byte_range)

    async def _fetched(self, key: str, prototype: Any) -> Any:
        """The whole object ``key``, fetched once however many reads wait for it."""
        if os.getpid() != self._pid:  # futures of the parent's loop never resolve here
            self._fetching, self._pid = {}, os.getpid()
        pending = self._fetching.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(key, prototype))
            self._fetching[key] = pending
            pending.add_done_callback(lambda _: self._fetching.pop(key, None))
        return await asyncio.shield(pending)

    async def _fetch(self, key: str, prototype: Any) -> Any:
        value = await self._store.get(key, prototype)
        if value is not None:
            await self._kept.set(key, value)
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list:
        reads = [self.get(key, prototype, byte_range) for key, byte_range in key_ranges]
        return list(await asyncio.gather(*reads))

    async def getsize(self, key: str) -> int:
        if await self._kept.exists(key):
            return await self._kept.getsize(key)
        return await self._store.getsize(key)

    # zarr's own readers of many keys or ranges, over get above (the wrapped store's would
    # read around the kept folder)
    _get_many = Store._get_many
    if hasattr(Store, "get_ranges"):  # zarr 3.4 (sharded reads of a whole shard's ranges)
        get_ranges = Store.get_ranges

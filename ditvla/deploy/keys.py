"""Shared key files for ``ditvla serve`` / ``ditvla robot`` (``ditvla keygen``)."""

from __future__ import annotations

import os
from pathlib import Path

from ditvla.deploy.errors import TransportError

MIN_KEY_BYTES = 16


def read_key(path: str | Path | None) -> bytes | None:
    """The shared key in ``path`` (at least 16 bytes; whitespace around it ignored)."""
    if path is None:
        return None
    key = Path(path).read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise TransportError(f"key file {path} holds {len(key)} bytes; use >= {MIN_KEY_BYTES}")
    return key


def new_key_file(path: str | Path) -> Path:
    """Write a fresh random key (hex) readable only by its owner."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex())
    return path

"""CURVE key pairs for ``ditvla serve`` / ``ditvla robot`` (``ditvla keygen``).

A key folder holds ``NAME.key`` (the public key) and ``NAME.key_secret`` (the key pair)
in ZeroMQ's certificate format. The server reads ``server.key_secret`` and admits the
clients whose public keys lie in the folder; a robot reads its own ``robot.key_secret``
and ``server.key``. Secret files are written 0600, never through a symbolic link and
never over an existing file unless asked; a secret file that others can read is refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ditvla.deploy.errors import TransportError


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    allowed: Path  # a folder of clients' public keys (*.key)


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes


def _write_new(path: Path, text: str, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    if force and (path.exists() or path.is_symlink()):
        path.unlink()  # a link is removed, never followed
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise TransportError(f"{path} exists; pass --force to replace it") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # whatever the umask


def generate_keypair(folder: str | Path, name: str, *, force: bool = False) -> Path:
    """Write ``folder/name.key`` and ``folder/name.key_secret`` (0600); returns the latter."""
    import zmq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    header = "#   ZeroMQ CURVE certificate written by ditvla keygen\n"
    pub = f'{header}metadata\ncurve\n    public-key = "{public.decode()}"\n'
    sec = pub + f'    secret-key = "{secret.decode()}"\n'
    _write_new(folder / f"{name}.key", pub, 0o644, force)
    _write_new(folder / f"{name}.key_secret", sec, 0o600, force)
    return folder / f"{name}.key_secret"


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        info = path.lstat()
    except FileNotFoundError:
        raise TransportError(f"{path}: no such key file (make one with `ditvla keygen`)") from None
    if not stat.S_ISREG(info.st_mode):
        raise TransportError(f"{path}: not a regular file (a link or a folder)")
    if secret and info.st_mode & 0o077:
        raise TransportError(
            f"{path}: readable by others (mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it"
        )
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise TransportError(f"{path}: not a CURVE certificate ({exc})") from None
    if secret and secret_key is None:
        raise TransportError(f"{path}: holds no secret key")
    return public, secret_key


def server_keys(folder: str | Path) -> ServerKeys:
    folder = Path(folder)
    public, secret = _load(folder / "server.key_secret", secret=True)
    return ServerKeys(public, secret, folder)


def client_keys(folder: str | Path, name: str = "robot") -> ClientKeys:
    folder = Path(folder)
    public, secret = _load(folder / f"{name}.key_secret", secret=True)
    server_public, _ = _load(folder / "server.key", secret=False)
    return ClientKeys(public, secret, server_public)

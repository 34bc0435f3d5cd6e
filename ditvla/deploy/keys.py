"""CURVE key pairs for ``ditvla serve`` / ``ditvla robot`` (``ditvla keygen``).

A key folder holds ``NAME.key`` (the public key) and ``NAME.key_secret`` (the key pair)
in ZeroMQ's certificate format. The server reads ``server.key_secret`` and admits the
clients whose public keys lie in the folder; a robot reads its own ``robot.key_secret``
and ``server.key``. A pair is written whole or not at all: secret files 0600, never
through a symbolic link and never over an existing file unless asked. A secret file that
others can read is refused, and so is an allow-list that others could add a key to (a
public key or the folder writable by others, or a key file that is not a regular file).
"""

from __future__ import annotations

import os
import secrets
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


def _write_temporary(folder: Path, text: str, mode: int) -> Path:
    """``text`` in a new file of ``folder`` (``mode``, whatever the umask), not yet named."""
    path = folder / f".keygen-{secrets.token_hex(8)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def generate_keypair(folder: str | Path, name: str, *, force: bool = False) -> Path:
    """Write ``folder/name.key`` and ``folder/name.key_secret`` (0600), both or neither;
    returns the latter."""
    import zmq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = [folder / f"{name}.key_secret", folder / f"{name}.key"]
    existing = [path for path in targets if path.exists() or path.is_symlink()]
    if existing and not force:
        found = ", ".join(str(path) for path in existing)
        raise TransportError(f"{found} exists; pass --force to replace the pair")
    public, secret = zmq.curve_keypair()
    header = "#   ZeroMQ CURVE certificate written by ditvla keygen\n"
    pub = f'{header}metadata\ncurve\n    public-key = "{public.decode()}"\n'
    sec = pub + f'    secret-key = "{secret.decode()}"\n'
    written = [_write_temporary(folder, sec, 0o600), _write_temporary(folder, pub, 0o644)]
    named: list[Path] = []
    try:
        for source, target in zip(written, targets, strict=True):
            if force:
                os.replace(source, target)  # a link at the target is replaced, not followed
            else:
                os.link(source, target)  # never over a file that appeared meanwhile
            named.append(target)
    except FileExistsError:
        for target in named:  # the pair stays whole: the half already named goes
            target.unlink()
        raise TransportError(f"{target} appeared meanwhile; nothing was written") from None
    finally:
        for source in written:
            source.unlink(missing_ok=True)
    return targets[0]


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


def _check_allow_list(folder: Path) -> None:
    """TransportError unless only its owner can add a key to ``folder``'s allow-list."""
    if folder.stat().st_mode & 0o002:
        raise TransportError(f"{folder}: anyone can add a key to this folder; chmod o-w it")
    for path in sorted(folder.glob("*.key")):
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise TransportError(f"{path}: an allowed key that is not a regular file (a link?)")
        if info.st_mode & 0o022:
            raise TransportError(
                f"{path}: writable by others (mode {stat.S_IMODE(info.st_mode):o}), so "
                "anyone could put their key in the allow-list; chmod 644 it"
            )


def server_keys(folder: str | Path) -> ServerKeys:
    folder = Path(folder)
    public, secret = _load(folder / "server.key_secret", secret=True)
    _check_allow_list(folder)
    return ServerKeys(public, secret, folder)


def client_keys(folder: str | Path, name: str = "robot") -> ClientKeys:
    folder = Path(folder)
    public, secret = _load(folder / f"{name}.key_secret", secret=True)
    server_public, _ = _load(folder / "server.key", secret=False)
    return ClientKeys(public, secret, server_public)

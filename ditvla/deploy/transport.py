"""ZeroMQ channel between the policy server and the robot controller.

One DEALER socket on each side (the server binds, the controller connects): either side
sends whenever it has something, nothing waits for a reply, and ZeroMQ reconnects by
itself when the other process restarts. Sends never block the caller: when the peer is
gone or its queue is full the message is dropped (a real-time loop must not stall on a
socket) and counted.

Loopback by default. Binding to any other address requires a shared key, and then every
message is authenticated (HMAC-SHA256, see :mod:`ditvla.deploy.messages`).
"""

from __future__ import annotations

import ipaddress
import time
from urllib.parse import urlsplit

import zmq

from ditvla.deploy.errors import TransportError
from ditvla.deploy.messages import MAX_MESSAGE_BYTES, Codec, Message, MessageError

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// addresses on 127.0.0.0/8, ::1 or localhost."""
    parts = urlsplit(address)
    if parts.scheme in ("ipc", "inproc"):
        return True
    if parts.scheme != "tcp":
        raise TransportError(f"unsupported address {address!r}; use tcp://HOST:PORT or ipc://PATH")
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or "*": not provably local


class Channel:
    """Typed, optionally authenticated messages over one ZeroMQ DEALER socket."""

    def __init__(self, address: str, *, bind: bool, key: bytes | None = None):
        if bind and not is_loopback(address) and not key:
            raise TransportError(
                f"binding to {address} (not loopback) requires a shared key: pass --key-file "
                "(make one with `ditvla keygen`), and give the robot the same key"
            )
        self.address = address
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 64)
        self._socket.setsockopt(zmq.RCVHWM, 256)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._send_codec = Codec(key)
        self._recv_codec = Codec(key)
        self.dropped_sends = 0
        self.rejected = 0
        self.last_error: str | None = None
        if bind:
            try:
                self._socket.bind(address)
            except zmq.ZMQError as exc:
                self._socket.close()
                raise TransportError(f"cannot bind {address}: {exc}") from None
        else:
            self._socket.connect(address)

    def send(self, message: Message) -> bool:
        """Queue ``message``; False (and counted) when it had to be dropped."""
        frames = self._send_codec.encode(message)
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.dropped_sends += 1
            return False

    def receive(self, timeout_ms: float = 0) -> Message | None:
        """The next valid message, waiting up to ``timeout_ms``; None when none came.

        Malformed or unauthenticated messages are dropped, counted in ``rejected`` and
        described in ``last_error``; receiving goes on with the next one until the
        deadline, so bad messages neither end the wait early nor extend it.
        """
        deadline = time.monotonic() + max(0.0, timeout_ms) / 1000
        while self._socket.poll(max(0, round((deadline - time.monotonic()) * 1000))):
            frames = self._socket.recv_multipart(copy=False)
            try:
                return self._recv_codec.decode([f.buffer for f in frames])
            except MessageError as exc:
                self.rejected += 1
                self.last_error = str(exc)
        return None

    def receive_all(self) -> list[Message]:
        """Every valid message already waiting, without blocking."""
        messages = []
        while (message := self.receive(0)) is not None:
            messages.append(message)
        return messages

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

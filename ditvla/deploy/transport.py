"""ZeroMQ channels between the policy server, its System 2 process and the robot controllers.

The server binds a ROUTER socket and talks to the robots whose ``hello`` opened a session,
each in a session of its own (its own session id and sequence numbers): ZeroMQ names each
connection, and a chunk goes to its robot's connection and nowhere else. A server has
``max_sessions`` of them (one by default; a fleet has more). A session is its robot's
until the robot goes silent (:class:`SessionGate`): another peer's ``hello`` never takes
a live one, and is refused while every session is live; so are a replayed ``hello`` (its
nonce seen before) and a peer's hellos beyond :data:`HELLO_BURST` at :data:`HELLOS_PER_S`.
A controller or System 2 connects a DEALER socket. Either side sends
whenever it has something, nothing waits for a reply, and ZeroMQ reconnects by itself.
Sends never block: when the peer is gone or its queue is full the message is dropped
(a real-time loop must not stall on a socket) and counted.

Security is ZeroMQ's own (CURVE): with keys, the server has a key pair and admits only
clients whose public key is in its allow-list (a folder of public keys, checked by
ZeroMQ's ZAP handler before any message of theirs is read); traffic is encrypted and
each connection has its own session keys. Loopback without keys is the default for a
laptop; binding beyond loopback requires keys.

Every frame that arrives ends as a delivered message or a counted rejection named by
its reason (:attr:`rejected`); refused handshakes are counted too. A receive call looks
at a bounded number of messages, so a flood cannot hold its caller.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

import zmq

from ditvla.deploy.errors import TransportError
from ditvla.deploy.keys import ClientKeys, ServerKeys
from ditvla.deploy.messages import MAX_MESSAGE_BYTES, Codec, Message, MessageError

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
MAX_MESSAGES_PER_RECEIVE = 64
# a session whose robot has sent nothing for this long may be opened by another's hello
# (a controller observes every tick, and says hello again after 2 s without news)
SESSION_SILENCE_S = 2.0
# a session just opened is its robot's this long, or until the robot first speaks: it may
# be building the robot and waiting for its first camera frames (silent meanwhile)
SESSION_SETUP_S = 10.0
# a peer's hellos: a burst of this many, then this many per second (a handshake says
# hello every 0.5 s; a busy server may read a few of them at once)
HELLO_BURST, HELLOS_PER_S = 4, 2.0
_REMEMBERED = 4096  # nonces and peers the gate remembers, the oldest forgotten first
_REFUSED_HANDSHAKES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


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


def _socket(kind: int, max_frame_bytes: int = MAX_MESSAGE_BYTES) -> zmq.Socket:
    socket = zmq.Context.instance().socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 64)
    socket.setsockopt(zmq.RCVHWM, 256)
    # per frame (a message is one frame); a peer that sends a larger one is disconnected
    socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    return socket


class _Channel:
    """What both ends share: the codec, the counters, the bounded receive loop."""

    def __init__(self, socket: zmq.Socket, codec: Codec, address: str):
        self._socket, self.codec, self.address = socket, codec, address
        self.rejected: Counter[str] = Counter()
        self.dropped_sends = 0
        self.last_error: str | None = None
        self._monitor: zmq.Socket | None = None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        self.last_error = detail

    def _count_refused_handshakes(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] & _REFUSED_HANDSHAKES:
                self._reject("handshake refused", "a peer failed the CURVE handshake")

    def _frames(self, timeout_ms: float):
        """Raw messages for at most ``timeout_ms`` and :data:`MAX_MESSAGES_PER_RECEIVE`."""
        self._count_refused_handshakes()
        deadline = time.monotonic() + max(0.0, timeout_ms) / 1000
        for _ in range(MAX_MESSAGES_PER_RECEIVE):
            wait = max(0, round((deadline - time.monotonic()) * 1000))
            if not self._socket.poll(wait):
                break
            yield self._socket.recv_multipart(copy=False)

    def _decode(self, frame, codec: Codec | None = None) -> Message | None:
        """``frame`` decoded by ``codec`` (the channel's own by default), or None, counted."""
        try:
            return (codec or self.codec).decode(frame.buffer)
        except MessageError as exc:
            text = str(exc)
            reason = "session" if "session" in text or "replayed" in text else "malformed"
            self._reject(reason, text)
            return None

    def close(self) -> None:
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SessionGate:
    """Which hellos a server hears, and whose sessions it holds.

    A hello whose nonce was seen before is a replay; a peer's hellos beyond a burst of
    ``hello_burst``, refilled at ``hellos_per_s``, are a flood (a token bucket per peer);
    a hello from a peer without a session is refused while all ``max_sessions`` sessions
    are live. A session is live for ``setup_s`` after it opens (its robot is being set
    up: built, its first camera frames rendered) or until its robot first speaks, then
    while its robot was heard within ``silence_s`` (``setup_s`` after its ``reset``: an
    episode's robot reset is silent too); a silent robot's slot is the next hello's. A
    robot's hello renews its own session. ``clock``: seconds, monotonic."""

    def __init__(
        self,
        silence_s: float = SESSION_SILENCE_S,
        hello_burst: int = HELLO_BURST,
        hellos_per_s: float = HELLOS_PER_S,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = 1,
        setup_s: float = SESSION_SETUP_S,
    ):
        if max_sessions < 1:
            raise TransportError(f"a server holds at least one session, not {max_sessions}")
        self.silence_s, self.setup_s, self.clock = silence_s, setup_s, clock
        self.hello_burst, self.hellos_per_s = hello_burst, hellos_per_s
        self.max_sessions = max_sessions
        self.live_until: dict[bytes, float] = {}  # the peers holding sessions
        self._nonces: dict[str, None] = {}
        self._buckets: dict[bytes, tuple[float, float]] = {}  # peer: (tokens, at)

    def heard(self, peer: bytes, setting_up: bool = False) -> None:
        """A session's robot spoke; ``setting_up``: it is about to be silent for a while
        (an episode begins: the robot resets and waits for its first frames), so its
        session is its own for ``setup_s`` from now, as a new one's is."""
        if peer in self.live_until:
            grace = max(self.silence_s, self.setup_s) if setting_up else self.silence_s
            self.live_until[peer] = self.clock() + grace

    def open(self, peer: bytes) -> bytes | None:
        """``peer`` holds a session from now; returns the peer whose session ended to make
        room for it (the one silent longest), if any."""
        ended = None
        if peer not in self.live_until and len(self.live_until) >= self.max_sessions:
            ended = min(self.live_until, key=self.live_until.__getitem__)
            del self.live_until[ended]
        self.live_until[peer] = self.clock() + max(self.silence_s, self.setup_s)
        return ended

    def refusal(self, peer: bytes, hello: Message) -> str | None:
        now = self.clock()
        nonce = hello.meta["nonce"]
        if nonce in self._nonces:
            return "replayed hello"
        _remember(self._nonces, nonce, None)
        tokens, at = self._buckets.get(peer, (self.hello_burst, now))
        tokens = min(self.hello_burst, tokens + (now - at) * self.hellos_per_s)
        _remember(self._buckets, peer, (max(0.0, tokens - 1), now))
        if tokens < 1:
            return "hellos too fast"
        if peer in self.live_until or len(self.live_until) < self.max_sessions:
            return None
        if min(self.live_until.values()) <= now:
            return None  # a silent robot's slot
        return "session held by another robot"


def _remember(memory: dict, key, value) -> None:
    """``memory[key] = value`` as its newest entry, the oldest forgotten past the bound."""
    memory.pop(key, None)
    memory[key] = value
    if len(memory) > _REMEMBERED:
        del memory[next(iter(memory))]


class ServerChannel(_Channel):
    """The server's end: a bound ROUTER that talks to the peers holding sessions, each
    with a codec of its own (its session id, its sequence numbers both ways).

    ``receive`` returns ``(peer, message)``: a ``hello`` the :class:`SessionGate` lets
    through (the server decides whether to :meth:`accept` it), anything else only from a
    peer holding a session. ``gate``: whose hellos are heard and how many sessions there
    are (one by default). ``max_frame_bytes``: ZeroMQ disconnects a peer whose frame is
    larger (the server passes what its policy's largest observation needs). ZeroMQ
    buffers a message of many frames whole before it is read and caps only each frame,
    so the tighter that cap, the less such a message can take."""

    def __init__(
        self,
        address: str,
        *,
        keys: ServerKeys | None = None,
        accepts_from: tuple[str, ...] = ("controller",),
        gate: SessionGate | None = None,
        max_frame_bytes: int = MAX_MESSAGE_BYTES,
    ):
        if keys is None and not is_loopback(address):
            raise TransportError(
                f"binding to {address} (not loopback) requires keys: make them with "
                "`ditvla keygen KEYS --name server` and `--name robot`, then pass --keys KEYS "
                "to serve and robot"
            )
        socket = _socket(zmq.ROUTER, max_frame_bytes)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer fails at once
        super().__init__(socket, Codec(accepts_from), address)
        self.sessions: dict[bytes, Codec] = {}  # peer: its session's codec
        self.gate = gate or SessionGate()
        self._auth = None
        if keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(zmq.Context.instance())
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(keys.allowed))
            socket.curve_secretkey, socket.curve_publickey = keys.secret, keys.public
            socket.curve_server = True
            self._monitor = socket.get_monitor_socket(_REFUSED_HANDSHAKES)
        try:
            socket.bind(address)
        except zmq.ZMQError as exc:
            self.close()
            raise TransportError(f"cannot bind {address}: {exc}") from None
        self.address = socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def accept(self, peer: bytes, session: str) -> bytes | None:
        """Give ``peer`` a new session (its own, or the slot of the robot silent longest
        when all are taken); returns the peer whose session ended for it, if any."""
        ended = self.gate.open(peer)
        self.sessions.pop(ended, None)
        codec = Codec(self.codec.accepts_from)
        codec.start_session(session)
        self.sessions[peer] = codec
        return ended

    def send(self, message: Message, *, to: bytes) -> bool:
        """Send to ``to``, a peer holding a session, in its session; False (and counted)
        when it had to be dropped."""
        codec = self.sessions.get(to)
        if codec is None:
            self.dropped_sends += 1
            return False
        try:
            self._socket.send_multipart([to, codec.encode(message)], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError:  # its queue is full, or it is gone (ROUTER_MANDATORY)
            self.dropped_sends += 1
            return False

    def receive(self, timeout_ms: float = 0) -> tuple[bytes, Message] | None:
        for frames in self._frames(timeout_ms):
            peer = frames[0].bytes
            if len(frames) != 2:
                self._reject("malformed", f"a message of {len(frames) - 1} frames, expected 1")
                continue
            # a peer without a session gets a codec of no session: only its hello passes
            codec = self.sessions.get(peer) or Codec(self.codec.accepts_from)
            message = self._decode(frames[1], codec)
            if message is None:
                continue
            if message.type == "hello":
                refusal = self.gate.refusal(peer, message)
                if refusal is not None:
                    self._reject(refusal, f"a hello refused: {refusal}")
                    continue
                return peer, message  # a hello is no sign of a session's robot at work
            if peer not in self.sessions:
                self._reject("not the session's peer", f"a {message.type} from another peer")
                continue
            self.gate.heard(peer, setting_up=message.type == "reset")
            return peer, message
        return None

    def close(self) -> None:
        super().close()
        if self._auth is not None:
            self._auth.stop()


class ClientChannel(_Channel):
    """A controller's (or System 2's) end: a DEALER connected to the server."""

    def __init__(
        self,
        address: str,
        *,
        keys: ClientKeys | None = None,
        accepts_from: tuple[str, ...] = ("server",),
    ):
        socket = _socket(zmq.DEALER)
        super().__init__(socket, Codec(accepts_from), address)
        if keys is not None:
            socket.curve_secretkey, socket.curve_publickey = keys.secret, keys.public
            socket.curve_serverkey = keys.server_public
        socket.connect(address)

    def send(self, message: Message) -> bool:
        """Queue ``message``; False (and counted) when it had to be dropped."""
        frame = self.codec.encode(message)
        try:
            self._socket.send(frame, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.dropped_sends += 1
            return False

    def receive(self, timeout_ms: float = 0) -> Message | None:
        """The next valid message within ``timeout_ms``, looking at a bounded number of
        messages; bad ones are counted and skipped (they neither end the wait nor extend
        it)."""
        for frames in self._frames(timeout_ms):
            if len(frames) != 1:
                self._reject("malformed", f"a message of {len(frames)} frames, expected 1")
                continue
            message = self._decode(frames[0])
            if message is not None:
                return message
        return None

    def receive_all(self) -> list[Message]:
        """The valid messages already waiting (a bounded number of them)."""
        messages = []
        for frames in self._frames(0):
            message = self._decode(frames[0]) if len(frames) == 1 else None
            if len(frames) != 1:
                self._reject("malformed", f"a message of {len(frames)} frames, expected 1")
            if message is not None:
                messages.append(message)
        return messages


class PairChannel(ClientChannel):
    """Two processes of one server (the server and its System 2): a PAIR socket, one peer,
    bound by one side and connected by the other (an ipc path in a private folder)."""

    def __init__(self, address: str, *, bind: bool, accepts_from: tuple[str, ...]):
        if not is_loopback(address):
            raise TransportError(f"{address}: a pair channel stays on this machine")
        socket = _socket(zmq.PAIR)
        _Channel.__init__(self, socket, Codec(accepts_from), address)
        if bind:
            socket.bind(address)
        else:
            socket.connect(address)

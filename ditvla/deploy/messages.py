"""The runtime's wire format: a small JSON header and raw array buffers — never pickle.

A message is one ZeroMQ frame::

    [4-byte little-endian header length][header][buffer_0]...[buffer_n-1]

``header`` is UTF-8 JSON: ``{"v": 2, "type": ..., "session": ..., "seq": ..., "meta":
{...}, "arrays": [{"name", "dtype", "shape"}, ...]}``; each buffer holds one C-contiguous
array's bytes, in order. One frame, so that the socket's size cap (ZeroMQ's
``MAXMSGSIZE``, which is per frame) bounds the whole message; a message of several frames
is refused.

Decoding is total: any input — random bytes, truncations, deep JSON nesting, integers
beyond any range, lists where strings belong, shapes of 65 dimensions or of a product
beyond the cap — ends as a :class:`MessageError` naming what was wrong, never another
exception. Every decoded message is then checked against its type's schema
(:data:`SCHEMAS`): known type, required and allowed meta fields with their types and
ranges, array names, dtypes, ranks, buffer length against shape, finite values.

Sessions and order (:class:`Codec`): the controller's ``hello`` carries a fresh random
``nonce``; the server answers ``spec`` with a ``session`` id of its own drawing; every
later message of either side carries that session and a sequence number that grows per
sender. A receiver refuses other sessions and non-growing numbers, so traffic of an
earlier session (before either side restarted) and replays are refused, and a restart
on either side starts a new session.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WIRE_VERSION = 2
MAX_HEADER_BYTES = 16 * 1024
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_ARRAYS = 16
MAX_DIMS = 4
MAX_JSON_DEPTH = 4
MAX_INT = 2**53  # integers a float64 holds exactly; larger ones are refused
ALLOWED_DTYPES = frozenset({"uint8", "float32", "float64", "int64"})
HEADER_LENGTH = struct.Struct("<I")  # the prefix: the header's length in bytes


class MessageError(ValueError):
    """A message that does not decode or does not match its schema."""


# ---------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Field:
    """A meta field: its type and, for numbers, a closed range; for lists, the items'."""

    kind: type | tuple[type, ...]
    low: float = -MAX_INT
    high: float = MAX_INT
    max_items: int = 0  # lists: at most this many strings

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            raise MessageError(f"meta {name!r} has type {type(value).__name__}")
        if isinstance(value, int | float):
            if not (math.isfinite(value) and self.low <= value <= self.high):
                raise MessageError(f"meta {name!r} = {value!r} outside [{self.low}, {self.high}]")
        elif isinstance(value, str) and (len(value) > 1024 or not _is_text(value)):
            raise MessageError(
                f"meta {name!r} must be text of at most 1024 characters (no lone surrogates)"
            )
        elif isinstance(value, list) and not (
            len(value) <= self.max_items
            and all(isinstance(item, str) and 0 < len(item) <= 64 for item in value)
            and all(_is_text(item) for item in value)
        ):
            raise MessageError(
                f"meta {name!r} must be a list of at most {self.max_items} short strings"
            )


def _is_text(value: str) -> bool:
    """Whether ``value`` is text every reader takes: a string holding a lone UTF-16
    surrogate (which JSON's ``\\ud800`` escape can make) is not, and a tokenizer raises
    on it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class ArraySpec:
    dtypes: tuple[str, ...]
    ndim: int


@dataclass(frozen=True)
class MessageSchema:
    sender: str  # "controller", "server" or "system2": who may send it
    meta: dict[str, Field]  # required meta fields
    optional_meta: dict[str, Field] = field(default_factory=dict)
    arrays: dict[str, ArraySpec] = field(default_factory=dict)  # required arrays
    array_prefixes: dict[str, ArraySpec] = field(default_factory=dict)  # e.g. "image."


_TICK = Field(int, low=-1)
_EPISODE = Field(int, low=-1)
_TIME = Field((int, float), low=0.0, high=1e12)
_RATE = Field((int, float), low=0.0, high=10_000.0)
_ROBOT_ID = Field(int, low=0)
SCHEMAS: dict[str, MessageSchema] = {
    # controller -> server: what the robot has (answered with "spec"); opens a session
    "hello": MessageSchema(
        "controller",
        meta={
            "robot": Field(str),
            "control_hz": Field((int, float), low=0.1, high=10_000.0),
            "nonce": Field(str),  # fresh per hello: a replayed hello is refused
        },
    ),
    # server -> controller: what the policy needs
    "spec": MessageSchema(
        "server",
        meta={
            "cameras": Field(list, max_items=16),
            "image_size": Field(int, low=1, high=4096),
            "state_dim": Field(int, low=0, high=4096),
            "action_dim": Field(int, low=1, high=256),
        },
        optional_meta={
            "policy": Field(str),
            "state_keys": Field(list, max_items=32),
            "nonce": Field(str),
        },
        arrays={},
        array_prefixes={"action_": ArraySpec(("float32",), 1)},  # action_low / action_high
    ),
    # controller -> server: one control tick's observation; images only when new frames
    "observation": MessageSchema(
        "controller",
        meta={"tick": _TICK, "time": _TIME, "episode": _EPISODE},
        optional_meta={"instruction": Field(str)},
        arrays={"state": ArraySpec(("float32",), 1)},
        array_prefixes={"image.": ArraySpec(("uint8",), 3)},
    ),
    # server -> controller: an action chunk whose action i is due at tick start_tick + i
    "actions": MessageSchema(
        "server",
        meta={
            "start_tick": _TICK,
            "obs_time": _TIME,
            "context_tick": _TICK,
            "episode": _EPISODE,
        },
        optional_meta={"system1_hz": _RATE, "system2_hz": _RATE, "chunk": Field(int, low=0)},
        arrays={"actions": ArraySpec(("float32",), 2)},
    ),
    # controller -> server: an episode ended (drop contexts and chunks of the old one)
    "reset": MessageSchema("controller", meta={"episode": _EPISODE}),
    # server -> its System 2 process: one robot's newest camera frames to encode, tagged
    # with the server's number for that robot's session
    "frames": MessageSchema(
        "server",
        meta={"tick": _TICK, "episode": _EPISODE, "robot_id": _ROBOT_ID},
        optional_meta={"instruction": Field(str)},
        array_prefixes={"image.": ArraySpec(("uint8",), 3)},
    ),
    # System 2 process -> System 1: one robot's frames it could not encode (dropped)
    "unencodable": MessageSchema(
        "system2", meta={"tick": _TICK, "episode": _EPISODE, "robot_id": _ROBOT_ID}
    ),
    # System 2 process -> System 1: warmed up, ready for frames
    "ready": MessageSchema("system2", meta={}),
    # System 2 process -> System 1: the VLM context of one robot's frames
    "context": MessageSchema(
        "system2",
        meta={"tick": _TICK, "episode": _EPISODE, "robot_id": _ROBOT_ID},
        arrays={"tokens": ArraySpec(("float32",), 3), "mask": ArraySpec(("uint8",), 2)},
    ),
}


@dataclass
class Message:
    type: str
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    seq: int = 0
    session: str = ""


# ---------------------------------------------------------------------- encoding
def observation_bytes(cameras: int, image_size: int, state_dim: int) -> int:
    """The largest frame an ``observation`` can fill for a policy: the length prefix, a
    header at its limit, a float32 state and ``cameras`` uint8 (S, S, 3) frames."""
    return HEADER_LENGTH.size + MAX_HEADER_BYTES + 4 * state_dim + cameras * image_size**2 * 3


def encode(message: Message) -> bytes:
    """One frame: length-prefixed JSON header, then the arrays' raw bytes."""
    check_message(message)
    specs, buffers = [], []
    for name, value in message.arrays.items():
        array = np.ascontiguousarray(value)
        specs.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape)})
        buffers.append(memoryview(array).cast("B"))
    header = json.dumps(
        {
            "v": WIRE_VERSION,
            "type": message.type,
            "session": message.session,
            "seq": message.seq,
            "meta": message.meta,
            "arrays": specs,
        },
        allow_nan=False,
    ).encode()
    return b"".join([HEADER_LENGTH.pack(len(header)), header, *buffers])


def _refuse_constant(name: str) -> None:
    raise MessageError(f"header holds {name}")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 16:
        raise MessageError(f"header holds an integer of {len(text)} digits")
    return int(text)


def _depth(value: Any, limit: int) -> int:
    if limit < 0:
        raise MessageError(f"header nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, dict):
        return 1 + max((_depth(v, limit - 1) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v, limit - 1) for v in value), default=0)
    return 0


def _parse_header(view: memoryview) -> dict:
    raw = bytes(view)
    if raw.count(b"[") + raw.count(b"{") > 4 * MAX_ARRAYS + 16:  # before the parser recurses
        raise MessageError("header has too many lists or objects")
    try:
        header = json.loads(
            raw.decode("utf-8"),
            parse_int=_bounded_int,
            parse_constant=_refuse_constant,
        )
    except MessageError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"header is not JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise MessageError("header is not a JSON object")
    _depth(header, MAX_JSON_DEPTH)
    return header


def _array_from(spec: Any, buffer: memoryview) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
        raise MessageError("array description needs exactly name, dtype and shape")
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise MessageError("array name must be a short string")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise MessageError(f"array {name!r}: dtype not one of {sorted(ALLOWED_DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(s) is int and 0 <= s <= MAX_MESSAGE_BYTES for s in shape)
    ):
        raise MessageError(f"array {name!r}: shape must be at most {MAX_DIMS} sizes")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(buffer) != expected:
        raise MessageError(
            f"array {name!r}: {len(buffer)} bytes for shape {shape} {dtype} ({expected} expected)"
        )
    return name, np.frombuffer(buffer, dtype=dtype).reshape(shape)


def decode(frame: bytes | memoryview) -> Message:
    """A message from one frame, or :class:`MessageError`; nothing else escapes."""
    try:
        return _decode(memoryview(frame).cast("B"))
    except MessageError:
        raise
    except Exception as exc:  # a fault of ours must not become a crash of the caller
        raise MessageError(f"undecodable message ({type(exc).__name__})") from None


def _decode(frame: memoryview) -> Message:
    if len(frame) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(frame)} bytes exceeds the {MAX_MESSAGE_BYTES} limit")
    if len(frame) < HEADER_LENGTH.size:
        raise MessageError("message is shorter than its length prefix")
    (length,) = HEADER_LENGTH.unpack_from(frame)
    if length > MAX_HEADER_BYTES or length > len(frame) - HEADER_LENGTH.size:
        raise MessageError(f"header length {length} exceeds the message or {MAX_HEADER_BYTES}")
    header = _parse_header(frame[HEADER_LENGTH.size : HEADER_LENGTH.size + length])
    expected = {"v", "type", "session", "seq", "meta", "arrays"}
    if set(header) != expected:
        raise MessageError(f"header fields must be {sorted(expected)}")
    if header["v"] != WIRE_VERSION:
        raise MessageError(f"wire version {header['v']!r}, expected {WIRE_VERSION}")
    kind, session, seq = header["type"], header["session"], header["seq"]
    meta, specs = header["meta"], header["arrays"]
    if not isinstance(kind, str) or not isinstance(session, str) or len(session) > 64:
        raise MessageError("header type and session must be strings")
    if type(seq) is not int or not 0 <= seq <= MAX_INT:
        raise MessageError("header seq must be a non-negative integer")
    if not isinstance(meta, dict) or not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise MessageError(f"header needs a meta object and at most {MAX_ARRAYS} arrays")
    arrays, offset = {}, HEADER_LENGTH.size + length
    for spec in specs:
        size = _declared_bytes(spec)
        name, array = _array_from(spec, frame[offset : offset + size])
        if name in arrays:
            raise MessageError(f"array {name!r} appears twice")
        arrays[name] = array
        offset += size
    if offset != len(frame):
        raise MessageError(f"{len(frame) - offset} bytes after the last array")
    message = Message(kind, meta, arrays, seq, session)
    check_message(message)
    return message


def _declared_bytes(spec: Any) -> int:
    """The byte size an array description declares (checked in full by _array_from)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
        return 0
    dtype, shape = spec.get("dtype"), spec["shape"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES or len(shape) > MAX_DIMS:
        return 0
    if not all(type(s) is int and 0 <= s <= MAX_MESSAGE_BYTES for s in shape):
        return 0
    return math.prod(shape) * np.dtype(dtype).itemsize


def check_message(message: Message) -> None:
    """Raise :class:`MessageError` unless ``message`` matches its type's schema."""
    schema = SCHEMAS.get(message.type)
    if schema is None:
        raise MessageError(f"unknown message type {str(message.type)[:32]!r}")
    what = f"{message.type} message"
    for key in schema.meta:
        if key not in message.meta:
            raise MessageError(f"{what} is missing meta field {key!r}")
    for key, value in message.meta.items():
        spec = schema.meta.get(key) or schema.optional_meta.get(key)
        if spec is None:
            raise MessageError(f"{what} has unexpected meta field {str(key)[:32]!r}")
        try:
            spec.check(key, value)
        except MessageError as exc:
            raise MessageError(f"{what}: {exc}") from None
    for key in schema.arrays:
        if key not in message.arrays:
            raise MessageError(f"{what} is missing array {key!r}")
    for key, array in message.arrays.items():
        spec = schema.arrays.get(key) or next(
            (s for p, s in schema.array_prefixes.items() if key.startswith(p)), None
        )
        if spec is None:
            raise MessageError(f"{what} has unexpected array {str(key)[:32]!r}")
        array = np.asarray(array)
        if array.dtype.name not in spec.dtypes or array.ndim != spec.ndim:
            raise MessageError(
                f"{what}: array {key!r} is {array.dtype.name} with {array.ndim} dims, "
                f"expected {'/'.join(spec.dtypes)} with {spec.ndim}"
            )
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise MessageError(f"{what}: array {key!r} holds NaN or infinite values")


# ---------------------------------------------------------------------- sessions
class Codec:
    """Encodes one side's messages of one session and checks the other side's.

    ``accepts_from``: the senders (:attr:`MessageSchema.sender`) whose messages this side
    takes; any other (a chunk sent back to the server that sent it) is refused.
    ``session``: the current session id (set by the handshake); decoded messages of other
    sessions, and those whose ``seq`` does not grow, are refused. ``hello`` (which opens a
    session) and ``spec`` (which names it) are exempt from the session check.
    """

    def __init__(self, accepts_from: tuple[str, ...]):
        self.accepts_from = accepts_from
        self.session = ""
        self._next_seq = 0
        self._last_seen_seq = -1

    def start_session(self, session: str) -> None:
        """A new session: both sequence counters start again."""
        self.session, self._next_seq, self._last_seen_seq = session, 0, -1

    def encode(self, message: Message) -> bytes:
        message.session, message.seq = self.session, self._next_seq
        self._next_seq += 1
        return encode(message)

    def decode(self, frame: bytes | memoryview) -> Message:
        message = decode(frame)
        if SCHEMAS[message.type].sender not in self.accepts_from:
            raise MessageError(f"{message.type} messages do not come from this side")
        if message.type in ("hello", "spec"):
            return message
        if message.session != self.session:
            raise MessageError("message of another session (a restart, or a replay)")
        if message.seq <= self._last_seen_seq:
            raise MessageError(f"replayed or reordered message (seq {message.seq})")
        self._last_seen_seq = message.seq
        return message

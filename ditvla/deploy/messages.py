"""The runtime's wire format: a small JSON header and raw array buffers — never pickle.

A message is a list of ZeroMQ frames::

    [header, buffer_0, ..., buffer_n-1, (mac)]

``header`` is UTF-8 JSON: ``{"v": 1, "type": ..., "seq": ..., "meta": {...}, "arrays":
[{"name", "dtype", "shape"}, ...]}``; each buffer holds one C-contiguous array's bytes.
When a key is shared, the last frame is an HMAC-SHA256 of every other frame, and ``seq``
must grow from message to message (a replayed message is refused).

Every decoded message is checked against its type's schema (:data:`SCHEMAS`): known
type, required and allowed meta fields with their Python types, array names, dtypes,
rank, buffer length against shape, size limits, and finite values in float arrays.
Anything else raises :class:`MessageError`, which names what was wrong; the receiver
drops the message and carries on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WIRE_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_ARRAYS = 16
MAC_BYTES = 32
ALLOWED_DTYPES = frozenset({"uint8", "float32", "float64", "int64"})


class MessageError(ValueError):
    """A message that does not decode, authenticate or match its schema."""


@dataclass(frozen=True)
class ArraySpec:
    dtypes: tuple[str, ...]
    ndim: int


@dataclass(frozen=True)
class MessageSchema:
    meta: dict[str, type | tuple[type, ...]]  # required meta fields
    optional_meta: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    arrays: dict[str, ArraySpec] = field(default_factory=dict)  # required arrays
    array_prefixes: dict[str, ArraySpec] = field(default_factory=dict)  # e.g. "image."


_NUMBER = (int, float)
SCHEMAS: dict[str, MessageSchema] = {
    # controller -> server: what the robot has (answered with "spec")
    "hello": MessageSchema(meta={"robot": str, "control_hz": _NUMBER}),
    # server -> controller: what the policy needs, or why it refuses the robot
    "spec": MessageSchema(
        meta={"cameras": list, "image_size": int, "state_dim": int, "action_dim": int},
        optional_meta={"refused": str, "policy": str, "state_keys": list},
    ),
    # controller -> server: one control tick's observation; images only when new frames
    "observation": MessageSchema(
        meta={"tick": int, "time": _NUMBER, "episode": int},
        optional_meta={"instruction": str},
        arrays={"state": ArraySpec(("float32",), 1)},
        array_prefixes={"image.": ArraySpec(("uint8",), 3)},
    ),
    # server -> controller: an action chunk whose action i is due at tick start_tick + i
    "actions": MessageSchema(
        meta={"start_tick": int, "obs_time": _NUMBER, "context_tick": int, "episode": int},
        optional_meta={"system1_hz": _NUMBER, "system2_hz": _NUMBER, "chunk": int},
        arrays={"actions": ArraySpec(("float32",), 2)},
    ),
    # controller -> server: an episode ended (drop contexts and chunks of the old one)
    "reset": MessageSchema(meta={"episode": int}),
    # System 2 process -> System 1: the VLM context of one observation
    "context": MessageSchema(
        meta={"tick": int, "episode": int},
        arrays={"tokens": ArraySpec(("float32",), 3), "mask": ArraySpec(("uint8",), 2)},
    ),
}


@dataclass
class Message:
    type: str
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    seq: int = 0


class Codec:
    """Encodes and decodes :class:`Message` frames, signing them when given a key.

    One codec per direction of one connection: ``seq`` counts the messages it encoded, and
    with a key, decoding refuses a ``seq`` that does not grow (replay).
    """

    def __init__(self, key: bytes | None = None):
        self.key = key or None
        self._next_seq = 0
        self._last_seen_seq = -1

    def encode(self, message: Message) -> list[bytes | memoryview]:
        check_message(message)
        arrays = []
        buffers: list[bytes | memoryview] = []
        for name, value in message.arrays.items():
            array = np.ascontiguousarray(value)
            arrays.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape)})
            buffers.append(memoryview(array).cast("B"))
        header = {
            "v": WIRE_VERSION,
            "type": message.type,
            "seq": self._next_seq,
            "meta": message.meta,
            "arrays": arrays,
        }
        self._next_seq += 1
        frames: list[bytes | memoryview] = [json.dumps(header).encode(), *buffers]
        if self.key:
            frames.append(_mac(self.key, frames))
        return frames

    def decode(self, frames: list[bytes | memoryview]) -> Message:
        if not frames:
            raise MessageError("empty message")
        total = sum(len(f) for f in frames)
        if total > MAX_MESSAGE_BYTES:
            raise MessageError(f"message of {total} bytes exceeds the {MAX_MESSAGE_BYTES} limit")
        if self.key:
            if len(frames) < 2:
                raise MessageError("message carries no authentication code")
            *frames, mac = frames
            if not hmac.compare_digest(bytes(mac), _mac(self.key, frames)):
                raise MessageError("authentication failed (wrong key or altered message)")
        if len(frames[0]) > MAX_HEADER_BYTES:
            raise MessageError(f"header exceeds {MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(bytes(frames[0]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MessageError(f"header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise MessageError("header is not a JSON object")
        if header.get("v") != WIRE_VERSION:
            raise MessageError(f"wire version {header.get('v')!r}, expected {WIRE_VERSION}")
        seq, meta, specs = header.get("seq"), header.get("meta"), header.get("arrays")
        if not isinstance(seq, int) or not isinstance(meta, dict) or not isinstance(specs, list):
            raise MessageError("header needs an integer seq, a meta object and an arrays list")
        if len(specs) > MAX_ARRAYS or len(specs) != len(frames) - 1:
            raise MessageError(f"header lists {len(specs)} arrays, message has {len(frames) - 1}")
        if self.key:
            if seq <= self._last_seen_seq:
                raise MessageError(f"replayed or reordered message (seq {seq})")
            self._last_seen_seq = seq
        arrays = {}
        for spec, buffer in zip(specs, frames[1:], strict=True):
            name, array = _array_from(spec, buffer)
            arrays[name] = array
        message = Message(str(header.get("type")), meta, arrays, seq)
        check_message(message)
        return message


def _mac(key: bytes, frames: list[bytes | memoryview]) -> bytes:
    digest = hmac.new(key, digestmod=hashlib.sha256)
    for frame in frames:
        digest.update(len(frame).to_bytes(8, "little"))
        digest.update(frame)
    return digest.digest()


def _array_from(spec: Any, buffer: bytes | memoryview) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict):
        raise MessageError("array description is not an object")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or dtype not in ALLOWED_DTYPES:
        raise MessageError(f"array {name!r}: dtype {dtype!r} not one of {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise MessageError(f"array {name!r}: shape {shape!r} is not a list of sizes")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(buffer) != expected:
        raise MessageError(
            f"array {name!r}: {len(buffer)} bytes for shape {shape} {dtype} ({expected} expected)"
        )
    return name, np.frombuffer(buffer, dtype=dtype).reshape(shape)


def check_message(message: Message) -> None:
    """Raise :class:`MessageError` unless ``message`` matches its type's schema."""
    schema = SCHEMAS.get(message.type)
    if schema is None:
        raise MessageError(f"unknown message type {message.type!r}; known: {sorted(SCHEMAS)}")
    what = f"{message.type} message"
    for key in schema.meta:
        if key not in message.meta:
            raise MessageError(f"{what} is missing meta field {key!r}")
    for key, value in message.meta.items():
        kind = schema.meta.get(key) or schema.optional_meta.get(key)
        if kind is None:
            raise MessageError(f"{what} has unexpected meta field {key!r}")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MessageError(f"{what}: meta {key!r} has type {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise MessageError(f"{what}: meta {key!r} is not finite")
    for key in schema.arrays:
        if key not in message.arrays:
            raise MessageError(f"{what} is missing array {key!r}")
    for key, array in message.arrays.items():
        spec = schema.arrays.get(key) or next(
            (s for p, s in schema.array_prefixes.items() if key.startswith(p)), None
        )
        if spec is None:
            raise MessageError(f"{what} has unexpected array {key!r}")
        array = np.asarray(array)
        if array.dtype.name not in spec.dtypes or array.ndim != spec.ndim:
            raise MessageError(
                f"{what}: array {key!r} is {array.dtype.name} with {array.ndim} dims, "
                f"expected {'/'.join(spec.dtypes)} with {spec.ndim}"
            )
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise MessageError(f"{what}: array {key!r} holds NaN or infinite values")

"""Property test of the wire format and a real socket: whatever arrives — random bytes,
truncations, bit flips, crafted headers, many frames, replays — ends as a delivered
message or a counted rejection, never as another exception. Seeded and bounded."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import zmq

from ditvla.deploy.messages import Codec, Message, MessageError, check_message, decode, encode
from ditvla.deploy.transport import ServerChannel, SessionGate

INPUTS = 20_000
SOCKET_INPUTS = 2_000


def valid_messages() -> list[Message]:
    rng = np.random.default_rng(0)
    return [
        Message("hello", {"robot": "sim", "control_hz": 50.0, "nonce": "abc"}),
        Message(
            "observation",
            {"tick": 5, "time": 1.0, "episode": 0, "instruction": "open the door"},
            {
                "state": rng.normal(size=8).astype(np.float32),
                "image.corner": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            },
        ),
        Message("reset", {"episode": 3}),
        Message(
            "actions",
            {"start_tick": 4, "obs_time": 0.5, "context_tick": 4, "episode": 0},
            {"actions": rng.normal(size=(16, 4)).astype(np.float32)},
        ),
    ]


def framed(header: object, body: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(4, "little") + raw + body


def crafted(rng: random.Random) -> bytes:
    """A header that is JSON but hostile in one way."""
    base = {"v": 2, "type": "observation", "session": "", "seq": 0}
    base["meta"] = {"tick": 1, "time": 0.0, "episode": 0}
    base["arrays"] = [{"name": "state", "dtype": "float32", "shape": [8]}]
    weird = rng.choice(
        [
            [1, 2],
            {"a": 1},
            None,
            True,
            "float32",
            -1,
            10**30,
            1e308,
            "x" * 2000,
            [[[[[[]]]]]],
            [True, False],
            [0] * 70,
            [2**40, 2**40],
        ]
    )
    target = rng.choice(["type", "session", "seq", "meta", "arrays", "v", "array", "field"])
    if target == "array":
        base["arrays"][0][rng.choice(["name", "dtype", "shape"])] = weird
    elif target == "field":
        base["meta"][rng.choice(["tick", "time", "episode", "instruction"])] = weird
    else:
        base[target] = weird
    kind = rng.randrange(5)
    if kind == 0:  # deep nesting, beyond the parser's recursion limit
        return framed(b"[" * 100_000 + b"]" * 100_000)
    if kind == 1:  # an integer of thousands of digits
        return framed(b'{"v": 2, "seq": ' + b"9" * 5000 + b"}")
    return framed(base, b"\x00" * 32)


def hostile_inputs(count: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    valid = [encode(m) for m in valid_messages()]
    out = []
    for _ in range(count):
        kind = rng.randrange(5)
        frame = rng.choice(valid)
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(0, 200)))
        elif kind == 1:
            out.append(frame[: rng.randrange(len(frame))])
        elif kind == 2:
            flipped = bytearray(frame)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            out.append(bytes(flipped))
        elif kind == 3:
            out.append(crafted(rng))
        else:
            out.append(frame)  # valid (some will be replays at a session-keeping receiver)
    return out


def test_decoding_anything_ends_as_a_message_or_a_named_rejection():
    delivered = rejected = 0
    for frame in hostile_inputs(INPUTS):
        try:
            message = decode(frame)
        except MessageError as exc:
            assert str(exc)  # named
            rejected += 1
            continue
        check_message(message)  # what comes out is schema-valid
        delivered += 1
    assert delivered + rejected == INPUTS and delivered > 0 and rejected > INPUTS // 2


def test_a_session_receiver_takes_each_valid_message_once():
    sender, receiver = Codec(("server",)), Codec(("controller",))
    sender.start_session("s")
    receiver.start_session("s")
    frames = [sender.encode(valid_messages()[1]) for _ in range(50)]
    taken = 0
    for frame in frames + frames:  # every one replayed once
        try:
            receiver.decode(frame)
            taken += 1
        except MessageError:
            pass
    assert taken == 50


@pytest.mark.slow
def test_a_real_socket_counts_every_hostile_message_and_still_serves():
    # hellos judged by the decoder alone here (the session gate has its own test)
    gate = SessionGate(silence_s=0, setup_s=0, hello_burst=10**6)
    with ServerChannel("tcp://127.0.0.1:0", gate=gate) as server:
        server.accept(b"nobody", "s")  # a session no hostile peer holds
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.connect(server.address)
        batches = [*[[frame] for frame in hostile_inputs(SOCKET_INPUTS, seed=1)], [b"x"] * 40]
        delivered, deadline = 0, time.monotonic() + 60
        for start in range(0, len(batches), 100):
            for frames in batches[start : start + 100]:
                raw.send_multipart(frames)
            sent = min(start + 100, len(batches))
            while delivered + server.rejected_total < sent and time.monotonic() < deadline:
                received = server.receive(timeout_ms=100)
                if received is not None:
                    delivered += 1
                    assert received[1].type == "hello"  # only a hello passes without the session
        assert delivered + server.rejected_total == len(batches)
        raw.send(encode(Message("hello", {"robot": "sim", "control_hz": 50.0, "nonce": "last"})))
        assert server.receive(timeout_ms=2000) is not None  # still serving
        raw.close(linger=0)

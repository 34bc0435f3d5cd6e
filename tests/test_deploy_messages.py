"""Wire format, transport and chunk scheduling of the runtime (no policy involved)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import zmq

from ditvla.deploy.messages import MAX_MESSAGE_BYTES, Codec, Message, MessageError
from ditvla.deploy.schedule import ActionSchedule, rtc_weights
from ditvla.deploy.transport import Channel, TransportError, is_loopback
from ditvla.policies.noise_schedules import DDPM, FlowMatching

KEY = b"0123456789abcdef0123456789abcdef"


def observation(state=None, **meta) -> Message:
    rng = np.random.default_rng(0)
    return Message(
        "observation",
        {"tick": 3, "time": 1.5, "episode": 0, "instruction": "close the drawer", **meta},
        {
            "state": np.arange(39, dtype=np.float32) if state is None else state,
            "image.corner": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
            "image.wrist": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        },
    )


def frames_of(message: Message, key=None) -> list[bytes]:
    return [bytes(f) for f in Codec(key).encode(message)]


def test_round_trip_keeps_every_array_and_field():
    sent = observation()
    received = Codec().decode(frames_of(sent))
    assert received.type == "observation" and received.meta == sent.meta
    for name, array in sent.arrays.items():
        np.testing.assert_array_equal(received.arrays[name], array)
        assert received.arrays[name].dtype == array.dtype


def _header(frames):
    return json.loads(frames[0])


def _with_header(frames, **changes):
    header = {**_header(frames), **changes}
    return [json.dumps(header).encode(), *frames[1:]]


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda f: [b"\xff not json", *f[1:]], "not JSON"),
        (lambda f: _with_header(f, type="shell"), "unknown message type"),
        (lambda f: _with_header(f, v=99), "wire version"),
        (lambda f: f[:-1], "arrays, message has"),
        (lambda f: [f[0], f[1][:-4], *f[2:]], "bytes for shape"),
        (
            lambda f: _with_header(
                f, arrays=[{**a, "dtype": "object"} for a in _header(f)["arrays"]]
            ),
            "dtype 'object'",
        ),
        (lambda f: _with_header(f, meta={"tick": 1, "time": 0.0}), "missing meta field 'episode'"),
        (
            lambda f: _with_header(f, meta={**_header(f)["meta"], "tick": "3"}),
            "'tick' has type str",
        ),
        (lambda f: _with_header(f, meta={**_header(f)["meta"], "cmd": "rm"}), "unexpected meta"),
        (lambda f: [*f, b"x" * (MAX_MESSAGE_BYTES + 1)], "exceeds"),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(corrupt, reason):
    with pytest.raises(MessageError, match=reason):
        Codec().decode(corrupt(frames_of(observation())))


def test_nan_and_wrong_rank_arrays_are_refused():
    state = np.arange(39, dtype=np.float32)
    state[4] = np.nan
    with pytest.raises(MessageError, match="NaN"):
        Codec().decode(frames_of(Message("observation", observation().meta, {"state": state})))
    chunk = Message(
        "actions",
        {"start_tick": 0, "obs_time": 0.0, "context_tick": 0, "episode": 0},
        {"actions": np.zeros(7, np.float32)},
    )
    with pytest.raises(MessageError, match="expected float32 with 2"):
        Codec().encode(chunk)


def test_keyed_messages_are_authenticated_and_not_replayable():
    sender, receiver = Codec(KEY), Codec(KEY)
    first = [bytes(f) for f in sender.encode(observation())]
    assert receiver.decode(first).meta["tick"] == 3
    with pytest.raises(MessageError, match="replayed"):
        receiver.decode(first)
    tampered = [bytes(f) for f in sender.encode(observation())]
    tampered[1] = b"\x00" * len(tampered[1])
    with pytest.raises(MessageError, match="authentication failed"):
        receiver.decode(tampered)
    with pytest.raises(MessageError, match="authentication failed"):
        Codec(KEY).decode(frames_of(observation(), key=b"another key of 32 bytes........."))
    with pytest.raises(MessageError):  # unsigned message to a keyed receiver
        Codec(KEY).decode(frames_of(observation()))


def test_binding_beyond_loopback_needs_a_key():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5555")
    with pytest.raises(TransportError, match="requires a shared key"):
        Channel("tcp://0.0.0.0:0", bind=True)
    Channel("tcp://0.0.0.0:0", bind=True, key=KEY).close()


def test_channel_survives_garbage_and_delivers_the_next_message():
    with Channel("tcp://127.0.0.1:0", bind=True) as server:
        address = server._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.connect(address)
        raw.send_multipart([b"garbage", b"\x00" * 10])
        raw.send_multipart([b'{"v": 1, "type": "observation", "seq": 0, "meta": {}, "arrays": []}'])
        # A wait that meets only bad messages returns nothing (ZeroMQ queues the two peers
        # fairly, so the bad ones are drained before the good peer connects).
        assert server.receive(timeout_ms=2000) is None
        assert server.rejected == 2  # both bad messages dropped, counted, and named
        assert "missing meta field" in server.last_error
        with Channel(address, bind=False) as client:
            # garbage now, the good message later: the wait goes on past the garbage
            raw.send_multipart([b"garbage"])
            later = threading.Timer(0.3, client.send, [observation()])
            later.start()
            received = server.receive(timeout_ms=5000)
            later.join()
        raw.close(linger=0)
    assert received is not None and received.meta["tick"] == 3
    assert server.rejected == 3


def test_latest_rule_switches_to_the_newest_chunk_and_holds_past_the_end():
    schedule = ActionSchedule("latest")
    schedule.add(0, np.full((4, 2), 1.0))
    schedule.add(2, np.full((4, 2), 2.0))
    assert [
        schedule.action_at(t)[0] if schedule.action_at(t) is not None else None for t in range(7)
    ] == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, None]
    schedule.prune(4)  # the first chunk ended at tick 4: forgotten
    assert schedule.action_at(1) is None and schedule.action_at(4)[0] == 2.0


def test_ensemble_rule_weights_older_chunks_more():
    schedule = ActionSchedule("ensemble", ensemble_decay=0.5)
    schedule.add(0, np.zeros((4, 1)))
    schedule.add(1, np.ones((4, 1)))
    w = np.exp(-0.5)
    assert schedule.action_at(0)[0] == 0.0
    assert schedule.action_at(1)[0] == pytest.approx(w / (1 + w))
    assert schedule.action_at(4)[0] == 1.0


def test_rtc_weights_freeze_the_delay_and_decay_over_the_overlap():
    planned = np.array([True] * 10 + [False] * 6)
    weights = rtc_weights(16, delay=3, planned=planned)
    assert (weights[:3] == 1).all() and (weights[10:] == 0).all()
    assert np.all(np.diff(weights[3:10]) < 0) and 0 < weights[9] < weights[3] < 1


@pytest.mark.parametrize("schedule", [FlowMatching(), DDPM()])
def test_inpainting_guide_keeps_frozen_actions(schedule):
    torch.manual_seed(0)
    target = torch.randn(1, 8, 3)
    weights = torch.tensor([1.0] * 4 + [0.0] * 4)[None, :, None]
    predict = lambda x, i: torch.sin(x)  # noqa: E731 — any denoiser
    noise = torch.randn(1, 8, 3)
    free = schedule.sample(predict, noise, 5)
    guided = schedule.sample(predict, noise, 5, guide=lambda x0: x0 + weights * (target - x0))
    torch.testing.assert_close(guided[:, :4], target[:, :4])
    assert not torch.allclose(guided[:, :4], free[:, :4])

"""Wire format, transport and chunk scheduling of the runtime (no policy involved)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import zmq
import zmq.auth

from ditvla.deploy.action_limits import merged_limits, widened_range
from ditvla.deploy.errors import TransportError
from ditvla.deploy.keys import client_keys, generate_keypair, server_keys
from ditvla.deploy.messages import (
    MAX_MESSAGE_BYTES,
    Codec,
    Message,
    MessageError,
    decode,
    encode,
    observation_bytes,
)
from ditvla.deploy.schedule import ActionSchedule
from ditvla.deploy.transport import ClientChannel, ServerChannel, SessionGate, is_loopback
from ditvla.policies.noise_schedules import DDPM, FlowMatching
from ditvla.real_time_chunking import rtc_weights


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


def test_round_trip_keeps_every_array_and_field():
    sent = observation()
    received = decode(encode(sent))
    assert received.type == "observation" and received.meta == sent.meta
    for name, array in sent.arrays.items():
        np.testing.assert_array_equal(received.arrays[name], array)
        assert received.arrays[name].dtype == array.dtype


def _parts(frame: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(frame[:4], "little")
    return json.loads(frame[4 : 4 + length]), frame[4 + length :]


def _with_header(frame: bytes, **changes) -> bytes:
    header, body = _parts(frame)
    raw = json.dumps({**header, **changes}).encode()
    return len(raw).to_bytes(4, "little") + raw + body


def _header(frame: bytes) -> dict:
    return _parts(frame)[0]


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda f: f[:4] + b"\xff not json" + f[4:], "not JSON|exceeds the message"),
        (lambda f: _with_header(f, type="shell"), "unknown message type"),
        (lambda f: _with_header(f, v=99), "wire version"),
        (lambda f: f[:-4], "bytes for shape"),
        (lambda f: f + b"xx", "bytes after the last array"),
        (
            lambda f: _with_header(
                f, arrays=[{**a, "dtype": "object"} for a in _header(f)["arrays"]]
            ),
            "dtype not one of",
        ),
        (lambda f: _with_header(f, meta={"tick": 1, "time": 0.0}), "missing meta field 'episode'"),
        (
            lambda f: _with_header(f, meta={**_header(f)["meta"], "tick": "3"}),
            "'tick' has type str",
        ),
        (lambda f: _with_header(f, meta={**_header(f)["meta"], "cmd": "rm"}), "unexpected meta"),
        (  # JSON carries a lone surrogate, which a tokenizer cannot take
            lambda f: _with_header(f, meta={**_header(f)["meta"], "instruction": "go \ud800 now"}),
            "no lone surrogates",
        ),
        (lambda f: f + b"x" * (MAX_MESSAGE_BYTES + 1), "exceeds"),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(corrupt, reason):
    with pytest.raises(MessageError, match=reason):
        decode(corrupt(encode(observation())))


def test_nan_and_wrong_rank_arrays_are_refused():
    state = np.arange(39, dtype=np.float32)
    frame = bytearray(encode(Message("observation", observation().meta, {"state": state})))
    frame[-4:] = np.array([np.nan], np.float32).tobytes()  # the last state value
    with pytest.raises(MessageError, match="NaN"):
        decode(bytes(frame))
    state[4] = np.nan
    with pytest.raises(MessageError, match="NaN"):
        encode(Message("observation", observation().meta, {"state": state}))
    chunk = Message(
        "actions",
        {"start_tick": 0, "obs_time": 0.0, "context_tick": 0, "episode": 0},
        {"actions": np.zeros(7, np.float32)},
    )
    with pytest.raises(MessageError, match="expected float32 with 2"):
        encode(chunk)


def test_only_the_server_tags_a_robot_and_every_context_names_one():
    """A controller cannot name a robot (the server tags the frames it hands System 2),
    and a context that names no robot is refused rather than taken as the first robot's."""
    with pytest.raises(MessageError, match="unexpected meta field 'robot_id'"):
        encode(observation(robot_id=0))
    arrays = {"tokens": np.zeros((1, 2, 3), np.float32), "mask": np.ones((1, 2), np.uint8)}
    with pytest.raises(MessageError, match="missing meta field 'robot_id'"):
        encode(Message("context", {"tick": 3, "episode": 0}, arrays))
    tagged = Message("frames", {"tick": 3, "episode": 0, "robot_id": 1}, observation().arrays)
    with pytest.raises(MessageError, match="unexpected array 'state'"):
        encode(tagged)  # frames carry the cameras only


def test_sessions_refuse_replays_old_sessions_and_reflected_messages():
    server, controller = Codec(("controller",)), Codec(("server",))
    server.start_session("s1")
    controller.start_session("s1")
    first = controller.encode(observation())
    assert server.decode(first).meta["tick"] == 3
    with pytest.raises(MessageError, match="replayed"):
        server.decode(first)
    # the server restarts: a new session; the old traffic is refused
    server.start_session("s2")
    with pytest.raises(MessageError, match="another session"):
        server.decode(controller.encode(observation()))
    # a chunk the server sent, reflected back to it, is not taken
    chunk = Message(
        "actions",
        {"start_tick": 0, "obs_time": 0.0, "context_tick": 0, "episode": 0},
        {"actions": np.zeros((4, 7), np.float32)},
    )
    with pytest.raises(MessageError, match="do not come from this side"):
        server.decode(server.encode(chunk))


def test_binding_beyond_loopback_needs_keys(tmp_path):
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5555")
    with pytest.raises(TransportError, match="requires keys"):
        ServerChannel("tcp://0.0.0.0:0")
    generate_keypair(tmp_path, "server")
    ServerChannel("tcp://0.0.0.0:0", keys=server_keys(tmp_path)).close()


def test_key_files_are_private_never_overwritten_and_checked(tmp_path):
    secret = generate_keypair(tmp_path, "server")
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(TransportError, match="exists; pass --force"):
        generate_keypair(tmp_path, "server")
    generate_keypair(tmp_path, "server", force=True)
    secret.chmod(0o644)
    with pytest.raises(TransportError, match="readable by others"):
        server_keys(tmp_path)
    secret.chmod(0o600)
    link = tmp_path / "elsewhere"
    link.write_text("x")
    (tmp_path / "robot.key_secret").symlink_to(link)
    with pytest.raises(TransportError, match="exists"):  # the link is not followed
        generate_keypair(tmp_path, "robot")
    assert link.read_text() == "x"
    with pytest.raises(TransportError, match="not a regular file"):
        client_keys(tmp_path)


def test_keygen_writes_a_whole_pair_or_nothing(tmp_path):
    generate_keypair(tmp_path, "robot")
    (tmp_path / "robot.key").unlink()  # only the secret file is left
    with pytest.raises(TransportError, match=r"robot\.key_secret exists"):
        generate_keypair(tmp_path, "robot")
    assert not (tmp_path / "robot.key").exists()  # no public key that does not match it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["robot.key_secret"]
    generate_keypair(tmp_path, "robot", force=True)
    public = zmq.auth.load_certificate(tmp_path / "robot.key")[0]
    assert public == zmq.auth.load_certificate(tmp_path / "robot.key_secret")[0]


def test_an_allow_list_others_could_write_to_is_refused(tmp_path):
    generate_keypair(tmp_path, "server")
    generate_keypair(tmp_path, "robot")
    server_keys(tmp_path)
    (tmp_path / "robot.key").chmod(0o666)
    with pytest.raises(TransportError, match=r"robot\.key: writable by others"):
        server_keys(tmp_path)
    (tmp_path / "robot.key").chmod(0o644)
    tmp_path.chmod(0o777)
    with pytest.raises(TransportError, match="anyone can add a key"):
        server_keys(tmp_path)
    tmp_path.chmod(0o755)
    (tmp_path / "intruder.key").symlink_to(tmp_path / "robot.key")
    with pytest.raises(TransportError, match=r"intruder\.key: an allowed key that is not"):
        server_keys(tmp_path)


def test_curve_admits_the_robot_and_keeps_others_out(tmp_path):
    generate_keypair(tmp_path, "server")
    generate_keypair(tmp_path, "robot")
    other = tmp_path / "other"
    generate_keypair(other, "robot")
    (other / "server.key").write_bytes((tmp_path / "server.key").read_bytes())
    with ServerChannel("tcp://127.0.0.1:0", keys=server_keys(tmp_path)) as server:
        stranger = ClientChannel(server.address, keys=client_keys(other))
        plain = zmq.Context.instance().socket(zmq.DEALER)
        plain.connect(server.address)
        stranger.send(Message("hello", {"robot": "x", "control_hz": 50.0, "nonce": "x"}))
        plain.send(b"garbage")
        with ClientChannel(server.address, keys=client_keys(tmp_path)) as robot:
            robot.send(Message("hello", {"robot": "sim", "control_hz": 50.0, "nonce": "n1"}))
            received = server.receive(timeout_ms=5000)
            assert received is not None and received[1].meta["nonce"] == "n1"
            assert server.receive(timeout_ms=500) is None  # nothing of the others got through
        assert server.rejected["handshake refused"] >= 1
        stranger.close()
        plain.close(linger=0)


def test_channel_survives_garbage_and_delivers_the_next_message():
    with ServerChannel("tcp://127.0.0.1:0") as server:
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.connect(server.address)
        raw.send_multipart([b"garbage", b"\x00" * 10])
        raw.send(b"\x05\x00\x00\x00{}")
        # A wait that meets only bad messages returns nothing (ZeroMQ queues the two peers
        # fairly, so the bad ones are drained before the good peer connects).
        assert server.receive(timeout_ms=2000) is None
        assert server.rejected_total == 2  # both bad messages dropped, counted, and named
        with ClientChannel(server.address) as client:
            # garbage now, the good message later: the wait goes on past the garbage
            raw.send(b"garbage")
            hello = Message("hello", {"robot": "sim", "control_hz": 50.0, "nonce": "n1"})
            later = threading.Timer(0.3, client.send, [hello])
            later.start()
            received = server.receive(timeout_ms=5000)
            later.join()
        raw.close(linger=0)
    assert received is not None and received[1].meta["robot"] == "sim"
    assert server.rejected_total == 3


def _hello(nonce: str) -> Message:
    return Message("hello", {"robot": "sim", "control_hz": 50.0, "nonce": nonce})


def test_a_robot_keeps_its_session_until_it_goes_silent():
    """Another peer's hello neither takes a live session nor reaches the server; replayed
    hellos and a peer's hellos in a flood are refused; a silent robot's session opens."""
    now = [0.0]
    gate = SessionGate(silence_s=2.0, hello_burst=1, hellos_per_s=4, clock=lambda: now[0])
    server = ServerChannel("tcp://127.0.0.1:0", gate=gate)
    robot, other = ClientChannel(server.address), ClientChannel(server.address)
    with server, robot, other:
        robot.send(_hello("robot-1"))
        peer, _ = server.receive(timeout_ms=5000)
        server.accept(peer, "s1")
        robot_frame = encode(_hello("robot-1"))  # a byte-exact copy of its hello
        other.send(_hello("other-1"))  # the session is live: refused
        other._socket.send(robot_frame)  # a replay: refused
        now[0] += 0.1
        robot.send(_hello("robot-2"))  # its own hellos, too fast: refused
        assert server.receive(timeout_ms=1000) is None
        assert server.rejected == {
            "session held by another robot": 1,
            "replayed hello": 1,
            "hellos too fast": 1,
        }
        now[0] += 1.5  # the robot spoke 1.6 s ago: still its session
        other.send(_hello("other-2"))
        assert server.receive(timeout_ms=1000) is None
        robot.codec.start_session("s1")
        robot.send(observation())
        assert server.receive(timeout_ms=5000)[1].type == "observation"  # heard now
        now[0] += 1.9
        other.send(_hello("other-3"))
        assert server.receive(timeout_ms=1000) is None
        now[0] += 0.3  # 2.2 s of silence: another robot may open a session
        other.send(_hello("other-4"))
        received = server.receive(timeout_ms=5000)
        assert received is not None and received[1].meta["nonce"] == "other-4"
    assert server.rejected["session held by another robot"] == 3


def test_a_fleet_gate_keeps_each_live_session_and_gives_a_silent_robots_slot_away():
    """Two sessions: a third peer is refused while both robots set up (silent for seconds)
    and while both speak; once one is silent for 2 s its slot, and only its, goes."""
    now = [0.0]
    gate = SessionGate(silence_s=2.0, setup_s=10.0, max_sessions=2, clock=lambda: now[0])
    for peer in (b"a", b"b"):
        assert gate.refusal(peer, _hello(peer.decode())) is None and gate.open(peer) is None
    now[0] = 5.0  # both still being set up: neither has spoken
    assert gate.refusal(b"c", _hello("c1")) == "session held by another robot"
    gate.heard(b"a")
    gate.heard(b"b")
    now[0] = 6.5
    gate.heard(b"a")
    assert gate.refusal(b"c", _hello("c2")) == "session held by another robot"
    now[0] = 7.5  # b silent for 2.5 s
    assert gate.refusal(b"c", _hello("c3")) is None
    assert gate.open(b"c") == b"b" and set(gate.live_until) == {b"a", b"c"}


def test_a_robot_that_begins_an_episode_keeps_its_slot_while_it_resets():
    """A ``reset`` (the robot about to reset itself, silent for seconds) keeps the robot's
    slot for the setup grace; after that, its silence frees the slot as any other."""
    now = [0.0]
    gate = SessionGate(silence_s=2.0, setup_s=10.0, max_sessions=1, clock=lambda: now[0])
    gate.open(b"a")
    gate.heard(b"a")
    gate.heard(b"a", setting_up=True)  # its reset
    now[0] = 9.5
    assert gate.refusal(b"c", _hello("c1")) == "session held by another robot"
    gate.heard(b"a")  # its first observation of the episode: the usual silence from now
    now[0] = 11.4
    assert gate.refusal(b"c", _hello("c2")) == "session held by another robot"
    now[0] = 11.6
    assert gate.refusal(b"c", _hello("c3")) is None


def test_a_frame_beyond_the_policys_largest_observation_is_cut_off():
    """The server's frame cap is what its policy's observations need, so a message of
    many large frames is dropped at its first frame (ZeroMQ would buffer it whole)."""
    cap = observation_bytes(cameras=2, image_size=64, state_dim=8)
    assert len(encode(observation(np.zeros(8, np.float32)))) > cap  # 128 px frames
    with ServerChannel("tcp://127.0.0.1:0", max_frame_bytes=cap) as server:
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.connect(server.address)
        raw.send_multipart([b"x" * (cap + 1)] * 100)
        with ClientChannel(server.address) as robot:
            robot.send(_hello("robot"))
            received = server.receive(timeout_ms=5000)
            assert received is not None and received[1].meta["nonce"] == "robot"
        # never read, so never counted: with a cap of the whole 32 MiB, it arrives
        # whole and is refused as "a message of 100 frames"
        assert all(server.receive(timeout_ms=100) is None for _ in range(10))
        assert server.rejected_total == 0
        raw.close(linger=0)


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


def test_action_limits_default_to_the_widened_training_range_and_options_replace_a_side():
    low, high = widened_range([-1.0, 0.0], [1.0, 0.0])
    np.testing.assert_allclose(low, [-1.201, -0.001])
    np.testing.assert_allclose(high, [1.201, 0.001])
    low, high = merged_limits(2, low, high, None, 0.5)
    assert low.dtype == high.dtype == np.float32
    np.testing.assert_allclose(low, [-1.201, -0.001], rtol=1e-6)
    np.testing.assert_array_equal(high, [0.5, 0.5])
    low, high = merged_limits(2, None, None, -2.0, None)  # nobody bounds the top
    np.testing.assert_array_equal(low, [-2.0, -2.0])
    assert np.isposinf(high).all()


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

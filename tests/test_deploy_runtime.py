"""The dual-system runtime with real processes: `ditvla serve` + `ditvla robot --sim`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ditvla.policies.config import PolicyConfig
from ditvla.policies.policy import DiTVLAPolicy

CLI = [sys.executable, "-m", "ditvla.cli"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = PolicyConfig.preset(
        "tiny", cameras=["corner"], image_size=32, state_dim=39, action_dim=4
    )
    folder = tmp_path_factory.mktemp("runtime") / "policy"
    DiTVLAPolicy(config).save_pretrained(folder)
    return folder


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def robot(address, out, *extra):
    return subprocess.Popen(
        [
            *CLI,
            "robot",
            "--sim",
            "metaworld:drawer-close-v3",
            "--server",
            address,
            "--out",
            str(out),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process, timeout=180) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def ticks(out) -> list[dict]:
    import csv

    with open(out / "ticks.csv") as f:
        return list(csv.DictReader(f))


def test_act_inpainting_keeps_the_frozen_actions(policy_dir):
    policy = DiTVLAPolicy.from_pretrained(policy_dir)
    obs = {"images": {"corner": np.zeros((32, 32, 3), np.uint8)}, "instruction": "close the drawer"}
    context = policy.encode(obs)
    state = np.zeros(39, np.float32)
    target = np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype(np.float32)
    weights = np.r_[np.ones(5), np.zeros(11)].astype(np.float32)
    noise = torch.randn(1, 16, 4)
    chunk = policy.act(context, state, noise=noise, inpaint=(target, weights))[0]
    free = policy.act(context, state, noise=noise)[0]
    np.testing.assert_allclose(chunk[:5].numpy(), target[:5], atol=1e-4)
    assert not np.allclose(free[:5].numpy(), target[:5], atol=1e-2)
    with pytest.raises(ValueError, match="inpaint"):
        policy.act(context, state, inpaint=(target[:4], weights))


@pytest.mark.slow
def test_serve_and_robot_processes(policy_dir, tmp_path):
    address = free_address()
    server_stats = tmp_path / "server_stats.json"
    server = subprocess.Popen(
        [
            *CLI,
            *("serve", "--policy", str(policy_dir), "--address", address, "--merge", "rtc"),
            *("--head-dtype", "bfloat16", "--stats-json", str(server_stats)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # 1. an episode streams chunks from both systems and is executed on the tick axis
        first = tmp_path / "first"
        finished(robot(address, first, "--episodes", "1", "--max-steps", "120", "--merge", "rtc"))
        summary = json.loads((first / "summary.json").read_text())
        rows = ticks(first)
        assert summary["ticks"] == len(rows) > 0 and summary["chunks"] > 0
        assert summary["rejected_messages"] == 0 and summary["missed_deadlines"] >= 0
        # from the first chunk on (when it comes depends on how fast System 2 warms up),
        # the robot executes streamed actions on most ticks
        start = next((i for i, r in enumerate(rows) if r["executed"] == "action"), None)
        assert start is not None, "no streamed action was executed"
        streamed = rows[start:]
        assert sum(r["executed"] == "action" for r in streamed) > len(streamed) // 2
        assert summary["system1_hz"] > 0 and summary["system2_hz"] > 0

        # 2. System 2 killed: the server restarts it and chunks flow again
        children = subprocess.run(
            ["pgrep", "-P", str(server.pid)], capture_output=True, text=True
        ).stdout.split()
        assert children, "System 2 runs in its own process"
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        second = tmp_path / "second"
        # the robot holds while the new process starts, then acts again (how long the
        # restart takes depends on the machine: the restart itself is checked below)
        finished(robot(address, second, "--episodes", "1", "--max-steps", "1500"))
        rows = ticks(second)
        assert any(r["executed"] == "action" for r in rows[-100:]), "no actions after the restart"

        # 3. SIGTERM to the controller: it stops at once with the robot held, summary written
        fourth = tmp_path / "fourth"
        controller = robot(address, fourth, "--duration-s", "60")
        time.sleep(4)
        controller.send_signal(signal.SIGTERM)
        finished(controller, timeout=30)
        assert json.loads((fourth / "summary.json").read_text())["ticks"] < 60 * 50
        # 4. the server dies mid-run: the robot holds (watchdog), ends cleanly, keeps its metrics
        third = tmp_path / "third"
        controller = robot(address, third, "--duration-s", "8", "--max-steps", "1000")
        time.sleep(5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        finished(controller)
        rows = ticks(third)
        assert rows[-1]["executed"] in ("watchdog", "hold")
        assert sum(r["executed"] in ("watchdog", "hold") for r in rows) >= 50
        # the killed System 2 was restarted once, by the server
        assert json.loads(server_stats.read_text())["system2_restarts"] == 1

    finally:
        server.kill()
        server.wait()


# ---------------------------------------------------------------------- hostile and broken input
def keyed_folder(tmp_path):
    from ditvla.deploy.keys import generate_keypair

    keys = tmp_path / "keys"
    for name in ("server", "robot", "buggy"):
        generate_keypair(keys, name)
    return keys


def framed(header: bytes) -> bytes:
    return len(header).to_bytes(4, "little") + header


HOSTILE_FRAMES = [
    b"\x00",
    framed(b"[" * 50_000 + b"]" * 50_000),  # nesting beyond Python's recursion limit
    framed(b'{"v": 2, "seq": ' + b"9" * 6000 + b"}"),  # beyond Python's integer digit limit
    framed(
        b'{"v": 2, "type": "hello", "session": "", "seq": 0, "arrays": [], '
        b'"meta": {"robot": "x", "control_hz": 0}}'
    ),  # schema-valid in type, not in range
    framed(
        b'{"v": 2, "type": "observation", "session": "", "seq": 0, "meta": {"tick": 1, '
        b'"time": 0, "episode": 0}, "arrays": [{"name": "state", "dtype": [1], "shape": '
        b"[true, 2]}]}"
    ),
    framed(
        b'{"v": 2, "type": "observation", "session": "", "seq": 0, "meta": {"tick": 1, '
        b'"time": 0, "episode": 0}, "arrays": [{"name": "state", "dtype": "uint8", "shape": '
        + str([1] * 65).encode()
        + b"}]}"
    ),
]


@pytest.mark.slow
def test_hostile_peers_neither_crash_the_server_nor_read_chunks(policy_dir, tmp_path):
    """A keyed server on loopback: peers without an admitted key are refused at the
    handshake; an admitted but buggy peer's garbage is counted; the robot is served."""
    import zmq

    from ditvla.deploy.keys import client_keys, generate_keypair
    from ditvla.deploy.messages import Message
    from ditvla.deploy.transport import ClientChannel

    keys = keyed_folder(tmp_path)
    outsider = tmp_path / "outsider"
    generate_keypair(outsider, "robot")
    (outsider / "server.key").write_bytes((keys / "server.key").read_bytes())
    address = free_address()
    server = subprocess.Popen(
        [*CLI, "serve", "--policy", str(policy_dir), "--address", address, "--keys", str(keys)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    plain = zmq.Context.instance().socket(zmq.DEALER)
    plain.connect(address)
    stranger = ClientChannel(address, keys=client_keys(outsider))
    buggy = ClientChannel(address, keys=client_keys(keys, "buggy"))
    try:
        for frame in HOSTILE_FRAMES:
            plain.send(frame)
            buggy._socket.send(frame)
        buggy._socket.send_multipart([b"x"] * 50)  # many frames
        stranger.send(Message("hello", {"robot": "intruder", "control_hz": 50.0}))
        out = tmp_path / "robot"
        robot_process = robot(
            address, out, "--keys", str(keys), "--episodes", "1", "--max-steps", "150"
        )
        finished(robot_process)
        rows = ticks(out)
        assert sum(r["executed"] == "action" for r in rows) > len(rows) // 3
        # nobody else got anything: the stranger never passed the handshake
        assert stranger.receive(timeout_ms=200) is None and plain.poll(200) == 0
        assert server.poll() is None, "the server died"
    finally:
        plain.close(linger=0)
        stranger.close()
        buggy.close()
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    status = [line for line in err.splitlines() if line.startswith("chunks")][-1]
    rejected = int(status.split("rejected ")[1].split()[0])
    assert rejected >= len(HOSTILE_FRAMES) + 1 + 2  # garbage, many frames, refused handshakes
    assert "S2 restarts 0" in status


def unfit_chunks(tick: int, episode: int, observations: int) -> list[tuple]:
    """Chunks a robot must not run; all but the third fail at once."""
    return [
        (tick, episode, np.zeros((8, 3), np.float32)),  # 3 wide, the robot has 4
        (tick + 10_000, episode, np.zeros((8, 4), np.float32)),  # far future
        (max(0, tick - 20), episode, np.zeros((8, 4), np.float32)),  # over once tick > 7
        (tick, episode, np.full((8, 4), 5.0, np.float32)),  # beyond the limits
        (tick, episode + 7, np.zeros((8, 4), np.float32)),  # another episode
    ]


class FakeServer:
    """A server that speaks the protocol and answers each observation with the chunks
    ``chunks(tick, episode, observations so far)`` gives: (start tick, episode, actions)."""

    def __init__(self, state_keys=("proprio",), chunks=unfit_chunks):
        import secrets

        from ditvla.deploy.transport import ServerChannel

        self.channel = ServerChannel("tcp://127.0.0.1:0")
        self.session = secrets.token_hex(4)
        self.state_keys = list(state_keys)
        self.chunks = chunks
        self.observations = 0

    def serve(self, process, seconds: float = 120) -> int:
        """Until ``process`` (the robot) ends; returns the chunks sent."""
        from ditvla.deploy.messages import Message

        end, sent = time.monotonic() + seconds, 0
        while time.monotonic() < end and process.poll() is None:
            received = self.channel.receive(timeout_ms=20)
            if received is None:
                continue
            peer, message = received
            if message.type == "hello":
                self.channel.accept(peer, self.session)
                limits = {
                    "action_low": -np.ones(4, np.float32),
                    "action_high": np.ones(4, np.float32),
                }
                spec = {"cameras": ["corner"], "image_size": 32, "state_dim": 8, "action_dim": 4}
                spec.update(state_keys=self.state_keys, nonce=message.meta["nonce"])
                self.channel.send(Message("spec", spec, limits))
            elif message.type == "observation":
                tick, episode = message.meta["tick"], message.meta["episode"]
                chunks = self.chunks(tick, episode, self.observations)
                self.observations += 1
                for start, episode_of, actions in chunks:
                    meta = {"start_tick": start, "obs_time": message.meta["time"]}
                    meta.update(context_tick=tick, episode=episode_of)
                    sent += self.channel.send(Message("actions", meta, {"actions": actions}))
        return sent


@pytest.mark.slow
def test_the_controller_holds_on_chunks_that_do_not_fit_its_robot(tmp_path):
    fake = FakeServer()
    try:
        out = tmp_path / "robot"
        process = robot(fake.channel.address, out, "--episodes", "1", "--max-steps", "100")
        sent = fake.serve(process)
    finally:
        fake.channel.close()
    finished(process)
    rows = ticks(out)
    summary = json.loads((out / "summary.json").read_text())
    # held throughout, but for the first 8 ticks, which the third kind of chunk covers
    assert sent > 0 and all(r["executed"] != "action" for r in rows[8:])
    assert set(summary["refused_chunks"]) >= {
        "wrong width or length",
        "outside the tick window",
        "beyond the action limits",
        "other episode",
    }


@pytest.mark.slow
def test_the_controller_measures_how_far_actions_jump_when_a_new_chunk_takes_over(tmp_path):
    def alternating(tick, episode, observations):  # every 6th observation: 0s, then 0.5s
        if observations % 6:
            return []
        value = 0.5 * (observations // 6 % 2)
        return [(tick + 1, episode, np.full((12, 4), value, np.float32))]

    fake = FakeServer(chunks=alternating)
    try:
        out = tmp_path / "robot"
        process = robot(fake.channel.address, out, "--episodes", "1", "--max-steps", "120")
        fake.serve(process)
    finally:
        fake.channel.close()
    finished(process)
    rows = ticks(out)
    summary = json.loads((out / "summary.json").read_text())
    switches = [r for r in rows if r["new_chunk"] == "True"]
    assert len(switches) >= 5, "the chunks took over one after another"
    # constant within a chunk, a step of 0.5 in each of 4 dimensions (L2 1.0) at a switch
    assert summary["action_change_within_chunk"] == 0.0
    assert 0.5 < summary["action_jump_at_switch"] <= 1.0 + 1e-6


def wait_for_chunks(server: subprocess.Popen, deadline_s: float) -> None:
    """Read a server's once-a-second status lines until it has sent a chunk (however long
    it took to start on a loaded machine), or fail at the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        line = server.stderr.readline()
        if not line:
            break  # the server exited
        match = re.search(r"chunks (\d+)", line)
        if match and int(match.group(1)) > 0:
            return
    pytest.fail(f"the server sent no chunk within {deadline_s} s")


@pytest.mark.slow
def test_a_server_restart_starts_a_new_session_and_chunks_flow_again(policy_dir, tmp_path):
    address = free_address()
    serve = [*CLI, "serve", "--policy", str(policy_dir), "--address", address]

    def start():
        return subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    first = start()
    out = tmp_path / "robot"
    controller = robot(address, out, "--duration-s", "45", "--max-steps", "5000")
    second = None
    try:
        wait_for_chunks(first, deadline_s=40)  # the first server drives
        first.kill()  # no goodbye: the robot holds, then says hello to whoever answers
        first.wait()
        second = start()
        finished(controller)
    finally:
        for process in (first, second, controller):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    executed = [r["executed"] == "action" for r in ticks(out)]
    driven = executed.index(True)  # the first server
    held = executed.index(False, driven)  # held while none answered
    assert sum(executed[held:]) > 100  # the second one drives: a new session


def test_a_robot_reading_nan_holds_and_the_loop_goes_on():
    """A test double at the boundary we cannot reach here (a physical robot's sensors)."""
    from ditvla.deploy.controller import Controller, ControllerConfig
    from ditvla.deploy.transport import ClientChannel

    class NaNRobot:
        instruction, action_dim = "", 4

        def __init__(self):
            self.held = self.moved = 0

        def observe(self):
            return np.full(8, np.nan, np.float32), None

        def send_action(self, action):
            self.moved += 1

        def hold(self):
            self.held += 1

        def close(self):
            pass

    device = NaNRobot()
    with ClientChannel(free_address()) as channel:  # nobody listens: sends are dropped
        controller = Controller(channel, device, ControllerConfig(hz=200, realtime=False))
        assert controller.run_episode(0, 20) == 20
    assert device.moved == 0 and device.held >= 20
    assert controller.refused["robot state not finite"] == 20


@pytest.mark.slow
def test_an_observation_that_does_not_fit_is_refused_at_the_server(policy_dir):
    """A frame of the wrong size never reaches System 2 (which would die on it)."""
    from ditvla.deploy.controller import handshake
    from ditvla.deploy.messages import Message
    from ditvla.deploy.transport import ClientChannel

    address = free_address()
    server = subprocess.Popen(
        [*CLI, "serve", "--policy", str(policy_dir), "--address", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    chunks = 0
    try:
        with ClientChannel(address) as channel:
            handshake(channel, "test", 50.0, timeout_s=120)
            for tick in range(200):
                size = 31 if tick < 100 else 32  # first the wrong size, then the right one
                frame = np.zeros((size, size, 3), np.uint8)
                meta = {"tick": tick, "time": time.monotonic(), "episode": 0}
                arrays = {"state": np.zeros(39, np.float32), "image.corner": frame}
                channel.send(Message("observation", {**meta, "instruction": "x"}, arrays))
                reply = channel.receive(timeout_ms=20)
                chunks += reply is not None and reply.type == "actions"
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    status = [line for line in err.splitlines() if line.startswith("chunks")][-1]
    assert chunks > 0 and "S2 restarts 0" in status
    assert int(status.split("bad observations ")[1].split()[0]) >= 100


def test_a_robot_that_cannot_build_the_policy_state_refuses_naming_both(tmp_path):
    fake = FakeServer(state_keys=("proprio", "elbow"))
    try:
        process = robot(fake.channel.address, tmp_path / "robot", "--episodes", "1")
        fake.serve(process, seconds=60)
    finally:
        fake.channel.close()
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "reads state proprio + elbow" in err and "offers proprio, objects, goal" in err

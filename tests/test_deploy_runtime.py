"""The dual-system runtime: `ditvla serve` + `ditvla robot --sim` as real processes end to
end, the server as a real process against a robot in this process, and the controller's
decisions tick by tick on a clock the test advances (against a server in this process that
speaks the protocol), where timing is not what is tested.

Nothing here waits a fixed time or asserts a speed: a test waits for a condition (a chunk
executed, a process that has installed its signal handlers) with a generous timeout, and
reads the server's counters from ``ditvla serve --stats-json``.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import runtime as bench_runtime
from ditvla.deploy.controller import Controller, ControllerConfig, handshake, run_session
from ditvla.deploy.messages import Codec, Message
from ditvla.policies.config import PolicyConfig
from ditvla.policies.policy import DiTVLAPolicy

CLI = [sys.executable, "-m", "ditvla.cli"]
HZ = 50.0
WAIT_S = 120.0  # how long a test waits for a condition: far beyond what it takes


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    # an untrained head's actions, within the range a trained policy records (the server
    # holds chunks to it, and the controller to the robot's own bounds without one)
    config = PolicyConfig.preset(
        "tiny",
        cameras=["corner"],
        image_size=32,
        state_dim=39,
        action_dim=4,
        action_range=([-8.0] * 4, [8.0] * 4),
    )
    folder = tmp_path_factory.mktemp("runtime") / "policy"
    DiTVLAPolicy(config).save_pretrained(folder)
    return folder


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def serve(policy_dir, address, log: Path, *extra) -> subprocess.Popen:
    """A `ditvla serve` process; its status lines go to ``log`` (read by nobody but a
    person looking into a failure)."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [*CLI, "serve", "--policy", str(policy_dir), "--address", address, *extra],
            stdout=subprocess.DEVNULL,
            stderr=f,
        )


def serve_with_stats(policy_dir, tmp_path: Path, *extra) -> tuple[subprocess.Popen, str, Path]:
    """A `ditvla serve` on a free address writing its counters to a JSON file at exit:
    (the process, its address, the file)."""
    address, stats_file = free_address(), tmp_path / "server_stats.json"
    server = serve(
        policy_dir, address, tmp_path / "server.log", *extra, "--stats-json", str(stats_file)
    )
    return server, address, stats_file


def stop(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)
    return server.wait(timeout=30)


def robot(address, out, *extra, sim="metaworld:drawer-close-v3"):
    return subprocess.Popen(
        [
            *CLI,
            "robot",
            "--sim",
            sim,
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
    with open(out / "ticks.csv") as f:
        return list(csv.DictReader(f))


def wait_for(condition, what: str, timeout_s: float = WAIT_S):
    """``condition()``'s first true value, polled until ``timeout_s``; fail naming ``what``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s")


def catches(process: subprocess.Popen, signum: int) -> bool:
    """Whether ``process`` has a handler of its own for ``signum`` (see
    :func:`bench.runtime.catches`). Fails at once if the process has ended."""
    if process.poll() is not None:
        _, err = process.communicate()
        pytest.fail(f"the robot ended with {process.returncode}: {err[-3000:]}")
    return bench_runtime.catches(process.pid, signum)


def system2_pids(server: subprocess.Popen) -> set[int]:
    """The server's System 2 process (a child started by multiprocessing's spawn)."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    pids = set()
    for pid in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except FileNotFoundError:  # ended meanwhile
            continue
    return pids


# ---------------------------------------------------------------------- test doubles
class FakeRobot:
    """A robot whose state never changes and whose camera gives the same frame (a pixel
    too small for its first ``bad_frames`` ticks); it counts what it is told."""

    instruction = "close the drawer"

    def __init__(self, action_dim=4, state_dim=39, bad_frames=0, action_bounds=None):
        self.action_dim, self.state_dim, self.bad_frames = action_dim, state_dim, bad_frames
        self.action_bounds = action_bounds
        self.actions: list[np.ndarray] = []
        self.held = self.observed = 0
        self.closed = False

    def observe(self):
        size = 31 if self.observed < self.bad_frames else 32
        self.observed += 1
        frame = np.zeros((size, size, 3), np.uint8)
        return np.zeros(self.state_dim, np.float32), {"corner": frame}

    def send_action(self, action):
        self.actions.append(action)

    def hold(self):
        self.held += 1

    def close(self):
        self.closed = True


class FakeClock:
    """Time that passes only when the loop waits: every tick starts on its deadline."""

    def __init__(self):
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def sleep_until(self, deadline: float) -> None:
        self.t = max(self.t, deadline)


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
    """A server that speaks the protocol: a hello is answered with a spec (4 actions in
    [-1, 1], the state parts ``state_keys``), each observation with the chunks
    ``chunks(tick, episode, observations so far)`` gives: (start tick, episode, actions)."""

    def __init__(self, state_keys=("proprio",), chunks=unfit_chunks, limits=True):
        self.session = secrets.token_hex(4)
        self.state_keys = list(state_keys)
        self.chunks = chunks
        self.limits = limits  # False: a policy that recorded no action range
        self.observations = 0

    def answer(self, message: Message) -> list[Message]:
        if message.type == "hello":
            limits = {"action_low": -np.ones(4, np.float32), "action_high": np.ones(4, np.float32)}
            limits = limits if self.limits else {}
            spec = {"cameras": ["corner"], "image_size": 32, "state_dim": 8, "action_dim": 4}
            spec.update(state_keys=self.state_keys, nonce=message.meta["nonce"])
            return [Message("spec", spec, limits)]
        if message.type != "observation":
            return []
        tick, episode = message.meta["tick"], message.meta["episode"]
        chunks = self.chunks(tick, episode, self.observations)
        self.observations += 1
        answers = []
        for start, episode_of, actions in chunks:
            meta = {"start_tick": start, "obs_time": message.meta["time"]}
            meta.update(context_tick=tick, episode=episode_of)
            answers.append(Message("actions", meta, {"actions": actions}))
        return answers

    def serve(self, channel, process, seconds: float = 120) -> None:
        """Over ``channel`` (a ServerChannel) until ``process`` (the robot) ends or
        ``seconds`` pass."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and process.poll() is None:
            received = channel.receive(timeout_ms=20)
            if received is None:
                continue
            peer, message = received
            if message.type == "hello":
                channel.accept(peer, self.session)
            for answer in self.answer(message):
                channel.send(answer, to=peer)


class InProcessChannel:
    """The controller's end of a channel to a :class:`FakeServer` in this process: each
    message it sends is encoded, decoded on the server's side and answered at once, through
    the real codecs (sessions and sequence numbers included); the answers wait for the
    controller's next receive. ``sent_chunks``: how many chunks the server sent."""

    address = "inproc://fake-server"
    rejected_total = 0

    def __init__(self, server: FakeServer):
        self.server = server
        self.codec = Codec(accepts_from=("server",))
        self._server_codec = Codec(accepts_from=("controller",))
        self._waiting: list[bytes] = []
        self.sent_chunks = 0

    def send(self, message: Message) -> bool:
        received = self._server_codec.decode(self.codec.encode(message))
        for answer in self.server.answer(received):
            if answer.type == "spec":
                self._server_codec.start_session(self.server.session)
            self.sent_chunks += answer.type == "actions"
            self._waiting.append(self._server_codec.encode(answer))
        return True

    def receive_all(self) -> list[Message]:
        waiting, self._waiting = self._waiting, []
        return [self.codec.decode(frame) for frame in waiting]

    def receive(self, timeout_ms: float = 0) -> Message | None:
        return self.codec.decode(self._waiting.pop(0)) if self._waiting else None


def controller_for(channel, device) -> Controller:
    """A controller in this process, on the real clock, once the server has answered."""
    spec = handshake(channel, "robot", HZ, timeout_s=WAIT_S)
    return Controller(channel, device, ControllerConfig(hz=HZ, realtime=False), spec)


def acting(controller: Controller) -> bool:
    return bool(controller.records) and controller.records[-1].executed == "action"


def run_until(controller: Controller, condition) -> None:
    """Tick until ``condition()`` holds, for at most :data:`WAIT_S`."""
    controller.run_episode(0, int(WAIT_S * HZ), done=condition)


def one_episode(max_ticks: int):
    def run(controller: Controller) -> list[dict]:
        controller.run_episode(0, max_ticks)
        return []

    return run


def session_with(server: FakeServer, device: FakeRobot, max_ticks: int, out: Path):
    """A whole session against ``server`` in this process, tick by tick on a fake clock."""
    channel = InProcessChannel(server)
    config = ControllerConfig(hz=HZ, realtime=False)
    run_session(
        channel,
        "robot",
        lambda spec: device,
        one_episode(max_ticks),
        config=config,
        out=out,
        install_signals=False,
        clock=FakeClock(),
    )
    return channel, ticks(out), json.loads((out / "summary.json").read_text())


# ---------------------------------------------------------------------- tests
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
    from ditvla.deploy.transport import ClientChannel

    address = free_address()
    server_stats = tmp_path / "server_stats.json"
    server = serve(
        policy_dir,
        address,
        tmp_path / "server.log",
        *("--merge", "rtc", "--head-dtype", "bfloat16", "--stats-json", str(server_stats)),
        *("--device", "cpu", "--system2-device", "cpu"),
    )
    try:
        # 1. an episode streams chunks from both systems and is executed on the tick axis
        # (the robot's handshake waits until System 2 has warmed up)
        first = tmp_path / "first"
        finished(robot(address, first, "--episodes", "1", "--max-steps", "250", "--merge", "rtc"))
        summary = json.loads((first / "summary.json").read_text())
        rows = ticks(first)
        assert summary["ticks"] == len(rows) > 0 and summary["chunks"] > 0
        assert summary["rejected_messages"] == 0
        # streamed actions are executed, and none before the first chunk arrived
        arrived = next(i for i, r in enumerate(rows) if r["chunk_latency_ms"])
        executed = [i for i, r in enumerate(rows) if r["executed"] == "action"]
        assert executed, "no streamed action was executed"
        assert executed[0] >= arrived
        assert summary["system1_hz"] > 0 and summary["system2_hz"] > 0

        # 2. System 2 killed: the server restarts it and chunks flow again (to a robot in
        # this process, which runs until they do)
        killed = system2_pids(server)
        assert killed, "System 2 runs in its own process"
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: system2_pids(server) - killed, "the server starts a new System 2")
        with ClientChannel(address) as channel:
            controller = controller_for(channel, FakeRobot())
            run_until(controller, lambda: acting(controller))
        assert acting(controller), "no actions after the restart"

        # 3. SIGTERM to the controller: it stops at once with the robot held, summary written
        fourth = tmp_path / "fourth"
        controller = robot(address, fourth, "--duration-s", "60")
        wait_for(lambda: catches(controller, signal.SIGTERM), "the robot's loop starts")
        controller.send_signal(signal.SIGTERM)
        finished(controller, timeout=30)
        assert json.loads((fourth / "summary.json").read_text())["ticks"] < 60 * 50

        # 4. the server dies mid-run: the robot holds (watchdog), ends cleanly, keeps its metrics
        # (it runs until stopped, not for a fixed time: a loaded machine takes seconds to
        # stop the server, and a robot run of a few seconds could end before the server did)
        third = tmp_path / "third"
        controller = robot(address, third, "--duration-s", "600", "--max-steps", "100000")
        wait_for(lambda: catches(controller, signal.SIGTERM), "the robot's loop starts")
        assert stop(server) == 0
        time.sleep(3.0)  # 150 ticks at 50 Hz with no server
        controller.send_signal(signal.SIGTERM)
        finished(controller, timeout=30)
        rows = ticks(third)
        assert rows[-1]["executed"] in ("watchdog", "hold")
        assert sum(r["executed"] in ("watchdog", "hold") for r in rows) >= 50
    finally:
        server.kill()
        server.wait()
    stats = json.loads(server_stats.read_text())
    assert stats["chunks"] > 0 and stats["contexts"] > 0
    assert stats["system2_restarts"] == 1  # the killed System 2, restarted once by the server
    # System 1 holds the head; the VLM's weights live in System 2's process only
    assert stats["system1_weight_bytes"] > 0 and stats["released_weight_bytes"] > 0


class RestartWhenDriving:
    """A ``done`` for the control loop: once the first server drives the robot, kill it (no
    goodbye: the robot holds, then says hello to whoever answers) and start another; done
    when the robot has executed 100 actions after it held."""

    def __init__(self, controller: Controller, servers: list, start_server):
        self.controller, self.servers, self.start_server = controller, servers, start_server
        self.held = False
        self.actions_after = 0

    def __call__(self) -> bool:
        acted = acting(self.controller)
        if len(self.servers) == 1:
            if acted:
                self.servers[0].kill()
                self.servers[0].wait()
                self.servers.append(self.start_server())
        elif not self.held:
            self.held = not acted
        else:
            self.actions_after += acted
        return self.actions_after > 100


@pytest.mark.slow
def test_a_server_restart_starts_a_new_session_and_chunks_flow_again(policy_dir, tmp_path):
    from ditvla.deploy.transport import ClientChannel

    address = free_address()
    logs = iter(tmp_path / name for name in ("first.log", "second.log"))
    servers = [serve(policy_dir, address, next(logs))]
    try:
        with ClientChannel(address) as channel:
            controller = controller_for(channel, FakeRobot())
            first_session = channel.codec.session
            restart = RestartWhenDriving(
                controller, servers, lambda: serve(policy_dir, address, next(logs))
            )
            run_until(controller, restart)
    finally:
        for server in servers:
            server.kill()
            server.wait()
    executed = [r.executed == "action" for r in controller.records]
    driven = executed.index(True)  # the first server
    held = executed.index(False, driven)  # held while none answered
    assert sum(executed[held:]) > 100  # the second one drives:
    assert channel.codec.session != first_session  # in a new session


class EpisodeLoop(threading.Thread):
    """``controller``'s episodes of ``ticks`` ticks each, one after another in a thread of
    their own, until ``until`` is set (or :data:`WAIT_S` passes); what it raised is kept in
    :attr:`error` for the test."""

    def __init__(self, controller: Controller, ticks: int, until: threading.Event):
        super().__init__(daemon=True)
        self.controller, self.ticks, self.until = controller, ticks, until
        self.episodes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        end = time.monotonic() + WAIT_S
        try:
            while not self.until.is_set() and time.monotonic() < end:
                self.controller.run_episode(self.episodes, self.ticks, done=self.until.is_set)
                self.episodes += 1
        except BaseException as exc:  # the test reports it
            self.error = exc


def executed_since(controller: Controller, tick: int) -> bool:
    """Whether ``controller``'s robot executed an action at ``tick`` or later."""
    return any(r.executed == "action" for r in controller.records[tick:])


def third_peer_speaks_while_both_act(address: str, a: Controller, b: Controller, switching):
    """Once robots ``a`` and ``b`` execute actions, a third peer says hello three times and
    gets nothing; then both act again, ``switching`` (a's loop) over 3 episodes at least."""
    from ditvla.deploy.transport import ClientChannel

    wait_for(lambda: executed_since(a, 0) and executed_since(b, 0), "both robots act")
    with ClientChannel(address) as third:
        for nonce in ("third-1", "third-2", "third-3"):
            third.send(Message("hello", {"robot": "third", "control_hz": HZ, "nonce": nonce}))
            assert third.receive(timeout_ms=700) is None, "a third peer got a session"
    since = (len(a.records), len(b.records))
    wait_for(
        lambda: (
            switching.episodes >= 3 and executed_since(a, since[0]) and executed_since(b, since[1])
        ),
        "both robots act after the third peer spoke, one over 3 episodes",
    )


@pytest.mark.slow
def test_a_fleet_server_keeps_each_robots_session_and_chunks_its_own(policy_dir, tmp_path):
    """Two robots on one `serve --max-robots 2`, each on its own connection: one switching
    episodes every 40 ticks, one in a single episode. Once both execute actions, a third
    peer's hellos get nothing; no session ends for another peer; both go on executing,
    and the single-episode robot never gets a chunk of another episode."""
    from ditvla.deploy.transport import ClientChannel

    server, address, stats_file = serve_with_stats(policy_dir, tmp_path, "--max-robots", "2")
    until = threading.Event()
    try:
        with ClientChannel(address) as channel_a, ClientChannel(address) as channel_b:
            a, b = controller_for(channel_a, FakeRobot()), controller_for(channel_b, FakeRobot())
            loops = [EpisodeLoop(a, 40, until), EpisodeLoop(b, int(WAIT_S * HZ), until)]
            for loop in loops:
                loop.start()
            try:
                third_peer_speaks_while_both_act(address, a, b, loops[0])
            finally:
                until.set()
                for loop in loops:
                    loop.join(WAIT_S)
        assert all(loop.error is None for loop in loops), [loop.error for loop in loops]
    finally:
        assert stop(server) == 0
    stats = json.loads(stats_file.read_text())
    assert stats["takeovers"] == 0  # neither robot's slot went to another peer
    # every session the server opened is one a robot adopted (more than one each only
    # after a silence of the server's, when the robot says hello again)
    assert stats["sessions"] == a.sessions + b.sessions
    assert stats["rejected_messages"] >= 3  # the third peer's hellos
    assert b.refused["other episode"] == 0  # the other robot's episodes never reach it


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
    handshake; an admitted but buggy peer's garbage is counted, and its hellos do not take
    the robot's session; the robot is served."""
    import zmq

    from ditvla.deploy.keys import client_keys, generate_keypair
    from ditvla.deploy.transport import ClientChannel

    keys = keyed_folder(tmp_path)
    outsider = tmp_path / "outsider"
    generate_keypair(outsider, "robot")
    (outsider / "server.key").write_bytes((keys / "server.key").read_bytes())
    server, address, stats_file = serve_with_stats(policy_dir, tmp_path, "--keys", str(keys))
    plain = zmq.Context.instance().socket(zmq.DEALER)
    plain.connect(address)
    stranger = ClientChannel(address, keys=client_keys(outsider))
    buggy = ClientChannel(address, keys=client_keys(keys, "buggy"))
    try:
        for frame in HOSTILE_FRAMES:
            plain.send(frame)
            buggy._socket.send(frame)
        buggy._socket.send_multipart([b"x"] * 50)  # many frames
        stranger.send(Message("hello", {"robot": "intruder", "control_hz": 50.0, "nonce": "x"}))
        with ClientChannel(address, keys=client_keys(keys, "robot")) as channel:
            controller = controller_for(channel, FakeRobot())
            for i in range(20):  # an admitted peer tries to take the session, as fast as it can
                buggy.send(Message("hello", {"robot": "b", "control_hz": 50.0, "nonce": str(i)}))
            run_until(controller, lambda: acting(controller))
        assert acting(controller), "the robot was not served"
        assert buggy.receive(timeout_ms=200) is None, "a second peer got the spec"
        # nobody else got anything: the stranger never passed the handshake
        assert stranger.receive(timeout_ms=200) is None and plain.poll(200) == 0
        assert server.poll() is None, "the server died"
    finally:
        plain.close(linger=0)
        stranger.close()
        buggy.close()
        stop(server)
    stats = json.loads(stats_file.read_text())
    # garbage, many frames, refused handshakes
    assert stats["rejected_messages"] >= len(HOSTILE_FRAMES) + 1 + 2
    assert stats["system2_restarts"] == 0


def test_the_controller_holds_on_chunks_that_do_not_fit_its_robot(tmp_path):
    channel, rows, summary = session_with(FakeServer(), FakeRobot(state_dim=8), 100, tmp_path)
    # the one chunk that fits (for ticks 0-7) runs from the tick after the first
    # observation; then the robot holds throughout
    assert [r["executed"] for r in rows[:8]] == ["hold"] + ["action"] * 7
    assert channel.sent_chunks > 0 and all(r["executed"] != "action" for r in rows[8:])
    assert set(summary["refused_chunks"]) >= {
        "wrong width or length",
        "outside the tick window",
        "beyond the action limits",
        "other episode",
    }


def test_without_the_servers_limits_the_robots_own_bounds_hold(tmp_path):
    """A policy that recorded no action range (or a compromised server that sends none):
    chunks beyond the robot's own action space never reach it."""

    def far(tick, episode, observations):  # |a| = 4 against a robot in [-1, 1]
        return [(tick + 1, episode, np.full((8, 4), 4.0, np.float32))]

    bounds = (-np.ones(4, np.float32), np.ones(4, np.float32))
    device = FakeRobot(state_dim=8, action_bounds=bounds)
    server = FakeServer(chunks=far, limits=False)
    channel, _, summary = session_with(server, device, 30, tmp_path)
    assert channel.sent_chunks > 0 and device.actions == []
    assert summary["refused_chunks"]["beyond the action limits"] == channel.sent_chunks - 1
    unbounded = FakeRobot(state_dim=8)  # a robot that declares no bounds runs them
    session_with(FakeServer(chunks=far, limits=False), unbounded, 30, tmp_path / "free")
    assert unbounded.actions and np.all(unbounded.actions[0] == 4.0)


def test_the_controller_measures_how_far_actions_jump_when_a_new_chunk_takes_over(tmp_path):
    def alternating(tick, episode, observations):  # every 6th observation: 0s, then 0.5s
        if observations % 6:
            return []
        value = 0.5 * (observations // 6 % 2)
        return [(tick + 1, episode, np.full((12, 4), value, np.float32))]

    _, rows, summary = session_with(FakeServer(chunks=alternating), FakeRobot(), 120, tmp_path)
    switches = [r for r in rows if r["new_chunk"] == "True"]
    assert len(switches) >= 5, "the chunks took over one after another"
    # constant within a chunk, a step of 0.5 in each of 4 dimensions (L2 1.0) at a switch
    assert summary["action_change_within_chunk"] == 0.0
    assert summary["action_jump_at_switch"] == pytest.approx(1.0)


def test_a_session_ends_with_the_robot_closed_and_late_chunks_counted(tmp_path):
    device = FakeRobot(state_dim=8)
    channel, rows, summary = session_with(FakeServer(), device, 30, tmp_path)
    assert device.closed and summary["ticks"] == len(rows) == 30
    # the last observation's answer arrived after the last tick: counted, not run
    assert summary["chunks_received"] == channel.sent_chunks


def test_a_robot_reading_nan_holds_and_the_loop_goes_on():
    """A test double at the boundary we cannot reach here (a physical robot's sensors)."""
    from ditvla.deploy.transport import ClientChannel

    class NaNRobot:
        instruction, action_dim, action_bounds = "", 4, None

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
        config = ControllerConfig(hz=200, realtime=False)
        controller = Controller(channel, device, config, clock=FakeClock())
        assert controller.run_episode(0, 20) == 20
    assert device.moved == 0 and device.held >= 20
    assert controller.refused["robot state not finite"] == 20


def test_the_server_hears_of_an_episode_before_the_robot_resets():
    """The controller says ``reset`` before the robot's own reset (silent for seconds: a
    simulator rebuilt, its first frames rendered), so the server keeps the robot's slot."""
    channel = InProcessChannel(FakeServer(chunks=lambda *_: []))
    said = []
    send = channel.send
    channel.send = lambda message: said.append(message.type) or send(message)
    config = ControllerConfig(hz=HZ, realtime=False)
    controller = Controller(channel, FakeRobot(), config, clock=FakeClock())
    controller.run_episode(0, 2, reset=lambda: said.append("the robot resets"))
    assert said == ["reset", "the robot resets", "observation", "observation"]


def test_frames_system2_cannot_encode_cost_only_their_own_robot_a_context():
    """One robot's frames that fail in the VLM (here: an instruction it raises on) are
    answered ``unencodable``; the other robots of the batch get their contexts."""
    from ditvla.deploy.server import system2_answers

    class Policy:
        spec = SimpleNamespace(cameras=("corner",))

        def encode(self, observation):
            if "poison" in observation["instruction"]:
                raise ValueError("the tokenizer cannot take it")
            n = len(observation["instruction"])
            return SimpleNamespace(tokens=torch.ones(n, 2, 3), mask=torch.ones(n, 2))

    frame = {"image.corner": np.zeros((32, 32, 3), np.uint8)}
    batch = [
        Message("frames", {"tick": 1, "episode": 0, "robot_id": i, "instruction": text}, frame)
        for i, text in enumerate(("go", "poison", "stop"))
    ]
    answers = system2_answers(Policy(), batch)
    assert [(a.type, a.meta["robot_id"]) for a in answers] == [
        ("context", 0),
        ("unencodable", 1),
        ("context", 2),
    ]
    assert answers[0].arrays["tokens"].shape == (1, 2, 3)


@pytest.mark.slow
def test_an_observation_that_does_not_fit_is_refused_at_the_server(policy_dir, tmp_path):
    """A frame of the wrong size never reaches System 2 (which would die on it)."""
    from ditvla.deploy.transport import ClientChannel

    server, address, stats_file = serve_with_stats(policy_dir, tmp_path)
    try:
        with ClientChannel(address) as channel:
            # a camera whose first 100 frames are a pixel too small, then right
            controller = controller_for(channel, FakeRobot(bad_frames=100))
            run_until(controller, lambda: acting(controller))
            assert acting(controller), "no chunk came from the frames of the right size"
            assert channel.dropped_sends == 0
    finally:
        stop(server)
    stats = json.loads(stats_file.read_text())
    assert stats["system2_restarts"] == 0 and stats["bad_observations"] == 100


def test_a_robot_that_cannot_build_the_policy_state_refuses_naming_both(tmp_path):
    from ditvla.deploy.transport import ServerChannel

    fake = FakeServer(state_keys=("proprio", "elbow"))
    with ServerChannel("tcp://127.0.0.1:0") as channel:
        process = robot(channel.address, tmp_path / "robot", "--episodes", "1")
        fake.serve(channel, process, seconds=WAIT_S)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "reads state proprio + elbow" in err and "offers proprio, objects, goal" in err


def test_serve_names_a_device_this_machine_lacks_before_loading_anything(policy_dir):
    from ditvla.deploy.server import ServeConfig
    from ditvla.errors import ConfigError

    missing = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=rf"'cuda:{missing}': this machine has {missing} CUDA"):
        ServeConfig(policy=str(policy_dir), system2_device=f"cuda:{missing}")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"):
        ServeConfig(policy=str(policy_dir), device="gpu0")
    result = subprocess.run(
        [*CLI, "serve", "--policy", str(policy_dir), "--device", f"cuda:{missing}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "this machine has" in result.stderr
    assert "Traceback" not in result.stderr

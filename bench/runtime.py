"""Runtime benchmark: a 50 Hz controller with the slow and fast systems running, and the
round trip of one observation + one action chunk through our transport vs LeRobot's
async-inference gRPC/pickle path, on loopback, in the same run.

1. `ditvla serve` (a tiny policy over two 128x128 cameras: System 2 in its own process,
   System 1 in the server) and `ditvla robot --sim metaworld:drawer-close-v3 --hz 50`
   run as separate processes for --duration seconds; the controller's summary gives the
   tick jitter (start of tick minus its deadline), missed deadlines, latency and rates.
2. Round trips: the client sends an observation (two uint8 128x128x3 frames + a 39-D
   float32 state) and waits for a 16x7 float32 chunk from a server process that answers
   at once. Ours: ZeroMQ + header/raw buffers (ditvla.deploy.transport). LeRobot's:
   its AsyncInference gRPC service with its own chunked-bytes helpers and pickle, as
   lerobot's robot_client / policy_server do (SendObservations, then GetActions).

3. ``--hostile``: the control loop of 1 with CURVE keys on loopback while three local
   peers without an admitted key — one plain, one with a CURVE key pair of its own, one
   that only listens and asks for the session — flood the server with garbage, huge,
   many-framed, deeply nested and replayed messages and count what they receive.

4. ``--fleet N``: N sim robots (N `ditvla robot --sim` processes) on one
   `ditvla serve --max-robots N`, each in its own session; with --hostile also a local
   peer with an admitted key of its own that, once every robot runs, floods the server
   with fresh hellos (takeover tries), replays, many-framed messages and an instruction no
   tokenizer can take, and counts what it receives.

    python -m bench.runtime [--duration 120] [--round-trips 300] [--hostile] [--fleet N]

Last line: ``50 Hz control: ...``; with --hostile, ``hostile 50 Hz: p99 jitter <x> ms,
missed <n>; robot got <a>/<b> chunks, intruders got <c>``; with --fleet, ``fleet 50 Hz:
robots <N>, p99 jitter <j> ms, missed <m>; chunks delivered <a>/<b>, to intruders <c>;
takeovers <t>; system2 restarts <r>`` (j: the worst robot's p99; a: chunks the robots
received, b: chunks the server sent; c: messages any intruder received; t: sessions the
server ended to give their slot to another peer).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import numpy as np

from bench.loopback import free_port

OBS_IMAGES = {"corner": (128, 128, 3), "gripperPOV": (128, 128, 3)}
STATE_DIM, HORIZON, ACTION_DIM = 39, 16, 7


# ---------------------------------------------------------------------- 1. control loop
INTRUDERS = ("plain", "curve", "reader")  # no admitted key
RIVAL = "admitted"  # --fleet --hostile: a peer with an admitted key of its own


def control_loop(duration: float, folder: Path, hostile: bool = False, robots: int = 1) -> dict:
    """`ditvla serve --max-robots ROBOTS` + ROBOTS `ditvla robot --sim` processes for
    ``duration`` seconds; with ``hostile``, keyed (CURVE on loopback) while three local
    peers without admitted keys flood the server and try to read chunks (and, for a fleet,
    a peer with an admitted key of its own floods it with hellos once every robot runs).
    Returns each robot's summary ("robots"), the server's counters and the intruders'."""
    cli = [sys.executable, "-m", "ditvla.cli"]
    address = f"tcp://127.0.0.1:{free_port()}"
    keys = _keys(folder, rival=robots > 1) if hostile else []
    serve = [*cli, "serve", "--policy", str(_tiny_policy(folder)), "--address", address]
    serve += ["--max-robots", str(robots), "--quiet", "--stats-json", str(folder / "server.json")]
    server = subprocess.Popen([*serve, *keys])
    # the rival's window: from when every robot runs to when the first one ends (whose
    # slot, silent 2 s later, is then any peer's to take)
    every_robot_runs, a_robot_ended = (
        mp.get_context("spawn").Event(),
        mp.get_context("spawn").Event(),
    )
    kinds = (*INTRUDERS, RIVAL) if hostile and robots > 1 else INTRUDERS if hostile else ()
    intruders = [
        mp.get_context("spawn").Process(
            target=_intruder,
            args=(address, kind, duration + 10, folder, folder / f"{kind}.json"),
            kwargs={"window": (every_robot_runs, a_robot_ended) if kind == RIVAL else None},
        )
        for kind in kinds
    ]
    for process in intruders:
        process.start()
    robot = [*cli, "robot", "--sim", "metaworld:drawer-close-v3", "--server", address, *keys]
    run = ["--hz", "50", "--duration-s", str(duration), "--max-steps", "500"]
    try:
        fleet = [
            subprocess.Popen(
                [*robot, *run, "--out", str(folder / f"robot{i}")], stdout=subprocess.DEVNULL
            )
            for i in range(robots)
        ]
        while not all(_loop_runs(process) for process in fleet):
            time.sleep(0.1)
        every_robot_runs.set()
        while all(process.poll() is None for process in fleet):
            time.sleep(0.01)
        a_robot_ended.set()
        for process in fleet:
            if process.wait() != 0:
                raise RuntimeError(f"a robot ended with {process.returncode}")
    finally:
        server.terminate()
        server.wait()
        for process in intruders:
            process.join(30)
    return {
        "robots": [
            json.loads((folder / f"robot{i}" / "summary.json").read_text()) for i in range(robots)
        ],
        "server": json.loads((folder / "server.json").read_text()),
        "intruders": {kind: json.loads((folder / f"{kind}.json").read_text()) for kind in kinds},
    }


def _tiny_policy(folder: Path) -> Path:
    """A tiny untrained policy over the two 128x128 cameras, saved in ``folder/policy``."""
    import torch

    from ditvla.policies.config import PolicyConfig
    from ditvla.policies.policy import DiTVLAPolicy

    torch.manual_seed(0)
    # the range a trained policy records, wide enough for an untrained head's actions (a
    # policy without one is held to the robot's own [-1, 1], and every chunk is refused)
    config = PolicyConfig.preset(
        "tiny",
        cameras=list(OBS_IMAGES),
        image_size=128,
        state_dim=STATE_DIM,
        action_dim=4,
        action_range=([-8.0] * 4, [8.0] * 4),
    )
    DiTVLAPolicy(config).save_pretrained(folder / "policy")
    return folder / "policy"


def _keys(folder: Path, rival: bool) -> list[str]:
    """CURVE keys: the server's and the robots' (one pair the fleet shares) in
    ``folder/keys`` (with ``rival``, the rival's too: admitted), and a pair the server
    never admitted in ``folder/outsider``; the options that pass them."""
    from ditvla.deploy.keys import generate_keypair

    for name in ("server", "robot", *((RIVAL,) if rival else ())):
        generate_keypair(folder / "keys", name)
    generate_keypair(folder / "outsider", "robot")
    return ["--keys", str(folder / "keys")]


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (Linux: the SigCgt
    mask in /proc/PID/status); a `ditvla robot` installs its SIGTERM handler when its
    control loop is about to start."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:"))[7:], 16)
    return bool(caught >> (signum - 1) & 1)


def _loop_runs(process: subprocess.Popen) -> bool:
    """Whether a `ditvla robot` holds its session and runs its loop. RuntimeError if it
    has ended."""
    if process.poll() is not None:
        raise RuntimeError(f"a robot ended with {process.returncode} before its loop ran")
    return catches(process.pid, signal.SIGTERM)


def delivery(result: dict) -> tuple[int, int, int]:
    """(chunks the robots received, chunks the server sent, messages the intruders
    received), each as counted by whoever received or sent it."""
    got = sum(robot["chunks_received"] for robot in result["robots"])
    stolen = sum(intruder["received"] for intruder in result["intruders"].values())
    return got, result["server"]["chunks"], stolen


def _hostile_frames(rng) -> list[list[bytes]]:
    """Garbage, oversized, many-framed, deeply nested, huge-number and replayed messages."""
    from ditvla.deploy.messages import Message, encode

    hello = encode(Message("hello", {"robot": "intruder", "control_hz": 50.0, "nonce": "x"}))
    observation = encode(
        Message("observation", {"tick": 1, "time": 1.0, "episode": 0}, _observation_arrays())
    )
    nested = b"[" * 100_000 + b"]" * 100_000
    return [
        [rng.bytes(64)],
        [rng.bytes(4 * 1024 * 1024)],  # oversized for the frame cap? no: 4 MB, under it
        [b"x" * 1024] * 200,  # many frames
        [len(nested).to_bytes(4, "little") + nested],
        [b'\x20\x00\x00\x00{"v": 2, "seq": ' + b"9" * 5000 + b"}"],
        [hello],  # an attempt to take over the session
        [observation],  # and replays of a valid message
        [observation],
    ]


def _unencodable_observation() -> bytes:
    """An observation whose instruction holds a lone UTF-16 surrogate (JSON's ``\\ud800``
    escape; a tokenizer raises on it): the schema must refuse it."""
    from ditvla.deploy.messages import HEADER_LENGTH, WIRE_VERSION

    state = np.zeros(STATE_DIM, np.float32)
    header = {
        "v": WIRE_VERSION,
        "type": "observation",
        "session": "",
        "seq": 0,
        "meta": {"tick": 1, "time": 1.0, "episode": 0, "instruction": "go \ud800 now"},
        "arrays": [{"name": "state", "dtype": "float32", "shape": [STATE_DIM]}],
    }
    text = json.dumps(header).encode()
    return HEADER_LENGTH.pack(len(text)) + text + state.tobytes()


def _fresh_hello(nonce: str) -> bytes:
    from ditvla.deploy.messages import Message, encode

    return encode(Message("hello", {"robot": "rival", "control_hz": 50.0, "nonce": nonce}))


def _intruder(
    address: str, kind: str, seconds: float, folder: Path, out: Path, window=None
) -> None:
    """A local peer: without an admitted key it floods (plain, curve) or tries to read
    (reader); the admitted rival sends about a thousand messages a second, fresh hellos and
    hostile ones, within ``window`` (two events: from the first being set to the second).
    Each counts every message it receives."""
    import zmq

    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if kind != "plain":  # CURVE with a key pair and the server's public key
        import zmq.auth

        secret = "keys/admitted.key_secret" if kind == RIVAL else "outsider/robot.key_secret"
        public, secret = zmq.auth.load_certificate(folder / secret)
        server_public, _ = zmq.auth.load_certificate(folder / "keys" / "server.key")
        socket.curve_publickey, socket.curve_secretkey = public, secret
        socket.curve_serverkey = server_public
    start, stop = window or (None, None)
    if start is not None:
        start.wait(seconds)
    socket.connect(address)
    rng = np.random.default_rng(hash(kind) % 2**32)
    frames = [*_hostile_frames(rng), [_unencodable_observation()]]
    sent = received = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (stop is not None and stop.is_set()):
        if kind == "reader":
            time.sleep(0.2)
            message = frames[5]  # keeps asking for the session
        elif kind == RIVAL:  # a takeover try (a fresh hello) every other message
            time.sleep(0.001)
            message = (
                [_fresh_hello(f"rival-{sent}")]
                if sent % 2 == 0
                else frames[sent // 2 % len(frames)]
            )
        else:
            message = frames[sent % len(frames)]
        try:
            socket.send_multipart(message, flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.001)
        while socket.poll(0):
            socket.recv_multipart()
            received += 1
    socket.close()
    out.write_text(json.dumps({"sent": sent, "received": received}))


# ---------------------------------------------------------------------- 2. round trips
def _observation_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        f"image.{cam}": rng.integers(0, 256, shape, dtype=np.uint8)
        for cam, shape in OBS_IMAGES.items()
    }
    arrays["state"] = rng.normal(size=STATE_DIM).astype(np.float32)
    return arrays


def _ours_server(address: str) -> None:
    from ditvla.deploy.messages import Message
    from ditvla.deploy.transport import ServerChannel

    chunk = np.zeros((HORIZON, ACTION_DIM), np.float32)
    spec = {"cameras": list(OBS_IMAGES), "image_size": 128, "state_dim": STATE_DIM}
    with ServerChannel(address) as channel:
        while True:
            received = channel.receive(timeout_ms=1000)
            if received is None:
                continue
            peer, message = received
            if message.type == "hello":
                channel.accept(peer, "bench")
                meta = {**spec, "action_dim": ACTION_DIM, "nonce": message.meta["nonce"]}
                channel.send(Message("spec", meta), to=peer)
                continue
            meta = {
                "start_tick": message.meta["tick"],
                "obs_time": message.meta["time"],
                "context_tick": message.meta["tick"],
                "episode": 0,
            }
            channel.send(Message("actions", meta, {"actions": chunk}), to=peer)


def ours_round_trips(n: int) -> np.ndarray:
    from ditvla.deploy.controller import handshake
    from ditvla.deploy.messages import Message
    from ditvla.deploy.transport import ClientChannel

    address = f"tcp://127.0.0.1:{free_port()}"
    server = mp.get_context("spawn").Process(target=_ours_server, args=(address,), daemon=True)
    server.start()
    arrays = _observation_arrays()
    times = []
    with ClientChannel(address) as channel:
        handshake(channel, "bench", 50.0)
        for i in range(n + 20):
            started = time.perf_counter()
            channel.send(
                Message(
                    "observation",
                    {"tick": i, "time": started, "episode": 0, "instruction": "close the drawer"},
                    arrays,
                )
            )
            reply = channel.receive(timeout_ms=30_000)
            assert reply is not None and reply.arrays["actions"].shape == (HORIZON, ACTION_DIM)
            times.append(time.perf_counter() - started)
    server.kill()
    return np.array(times[20:]) * 1e3


def _lerobot_server(port: int) -> None:
    import grpc
    import torch
    from lerobot.async_inference.helpers import TimedAction
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import receive_bytes_in_chunks

    class Servicer(services_pb2_grpc.AsyncInferenceServicer):
        def __init__(self):
            self.last = None
            self.shutdown = mp.get_context("spawn").Event()

        def SendObservations(self, request_iterator, context):
            data = receive_bytes_in_chunks(request_iterator, None, self.shutdown)
            self.last = pickle.loads(data)  # lerobot's path (we never do this)
            return services_pb2.Empty()

        def GetActions(self, request, context):
            obs = self.last
            chunk = [
                TimedAction(
                    timestamp=obs.get_timestamp(),
                    timestep=obs.get_timestep() + i,
                    action=torch.zeros(ACTION_DIM),
                )
                for i in range(HORIZON)
            ]
            return services_pb2.Actions(data=pickle.dumps(chunk))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    services_pb2_grpc.add_AsyncInferenceServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def lerobot_round_trips(n: int) -> np.ndarray:
    import grpc
    from lerobot.async_inference.helpers import TimedObservation
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import grpc_channel_options, send_bytes_in_chunks

    port = free_port()
    server = mp.get_context("spawn").Process(target=_lerobot_server, args=(port,), daemon=True)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", grpc_channel_options())
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = services_pb2_grpc.AsyncInferenceStub(channel)
    arrays = _observation_arrays()
    raw = {k.removeprefix("image."): v for k, v in arrays.items() if k.startswith("image.")}
    raw.update({f"joint_{j}.pos": float(v) for j, v in enumerate(arrays["state"])})
    raw["task"] = "close the drawer"
    times = []
    for i in range(n + 20):
        started = time.perf_counter()
        obs = TimedObservation(timestamp=time.time(), timestep=i, observation=raw)
        stub.SendObservations(send_bytes_in_chunks(pickle.dumps(obs), services_pb2.Observation))
        reply = stub.GetActions(services_pb2.Empty())
        actions = pickle.loads(reply.data)
        assert len(actions) == HORIZON
        times.append(time.perf_counter() - started)
    channel.close()
    server.kill()
    return np.array(times[20:]) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.runtime",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=120.0, help="control-loop seconds")
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument(
        "--hostile",
        action="store_true",
        help="keyed server; three local peers without admitted keys flood it and try to "
        "read chunks (no round trips then)",
    )
    parser.add_argument(
        "--fleet",
        type=int,
        default=0,
        metavar="N",
        help="N sim robots on one `serve --max-robots N` (no round trips then)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    if args.fleet or args.hostile:
        with tempfile.TemporaryDirectory() as folder:
            result = control_loop(args.duration, Path(folder), args.hostile, max(1, args.fleet))
        for robot in result["robots"]:
            robot.pop("episodes")
        print(json.dumps(result, indent=1))
        print(_fleet_line(result) if args.fleet else _hostile_line(result))
        return

    with tempfile.TemporaryDirectory() as folder:
        summary = control_loop(args.duration, Path(folder))["robots"][0]
    print(
        f"control loop: {summary['ticks']} ticks at {summary['control_hz']:.1f} Hz | jitter "
        f"p50 {summary['jitter_p50_ms']:.3f} ms, p99 {summary['jitter_p99_ms']:.3f} ms, max "
        f"{summary['jitter_max_ms']:.2f} ms | missed {summary['missed_deadlines']} | "
        f"obs->action p50 {summary['latency_p50_ms']:.0f} ms | S1 {summary['system1_hz']:.1f} Hz, "
        f"S2 {summary['system2_hz']:.1f} Hz | held ticks {summary['held_ticks']}"
    )
    ours = ours_round_trips(args.round_trips)
    theirs = lerobot_round_trips(args.round_trips)
    for name, t in (("ditvla zmq", ours), ("lerobot grpc+pickle", theirs)):
        print(f"round trip {name}: p50 {np.median(t):.3f} ms, p99 {np.percentile(t, 99):.3f} ms")
    print(
        f"50 Hz control: p99 jitter {summary['jitter_p99_ms']:.2f} ms, missed "
        f"{summary['missed_deadlines']}; transport round trip {np.median(ours):.2f} ms vs "
        f"lerobot {np.median(theirs):.2f} ms"
    )


def _hostile_line(result: dict) -> str:
    robot = result["robots"][0]
    got, sent, stolen = delivery(result)
    return (
        f"hostile 50 Hz: p99 jitter {robot['jitter_p99_ms']:.2f} ms, missed "
        f"{robot['missed_deadlines']}; robot got {got}/{sent} chunks, intruders got {stolen}"
    )


def _fleet_line(result: dict) -> str:
    """The worst robot's p99 jitter, the fleet's missed deadlines; takeovers: sessions the
    server ended to give their slot to another peer (its own count)."""
    robots = result["robots"]
    got, sent, stolen = delivery(result)
    jitter = max(robot["jitter_p99_ms"] for robot in robots)
    missed = sum(robot["missed_deadlines"] for robot in robots)
    takeovers, restarts = result["server"]["takeovers"], result["server"]["system2_restarts"]
    return (
        f"fleet 50 Hz: robots {len(robots)}, p99 jitter {jitter:.2f} ms, missed {missed}; "
        f"chunks delivered {got}/{sent}, to intruders {stolen}; takeovers {takeovers}; "
        f"system2 restarts {restarts}"
    )


if __name__ == "__main__":
    main()

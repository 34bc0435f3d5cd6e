"""The policy server, ``ditvla serve``: System 2 (the VLM) and System 1 (the DiT head).

- **System 2** runs in its own process (so a crash there is survivable and its threads
  are its own): it takes the newest observation with camera frames, runs
  ``policy.encode`` and sends back the context tokens. It runs at lower CPU priority and
  with ``system2_threads`` torch threads, so it cannot starve the fast path. When it
  dies or hangs it is restarted.
- **System 1** runs in the server's main loop with ``system1_threads`` torch threads: at
  ``system1_hz`` it denoises a chunk from the newest context and the newest state and
  sends it, tagged with the tick of the state it came from. It stops issuing chunks when
  the context is older than ``max_context_age_s`` (the robot then holds), drops chunks
  with NaN, and clips actions to the configured limits.

With ``merge="rtc"`` System 1 keeps a copy of what it sent and computes each chunk with
real-time chunking (see :mod:`ditvla.deploy.schedule`).

A server serves up to ``max_robots`` robots at once (a fleet), each in a session of its own
(:class:`RobotSession`: its episode, context, state, frames and chunks; its session id and
sequence numbers in the channel): System 2 encodes the fresh frames of all robots in one
forward, System 1 acts for each robot from its own newest context, and a robot's chunks go
to its connection only. Each weight is held once, whatever the fleet's size: System 2's
process keeps the VLM, System 1 the action head (:mod:`ditvla.policies.system_split`).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditvla.contract import HeadDType, SplitsBySystem, load_policy
from ditvla.deploy.action_limits import merged_limits, widened_range
from ditvla.deploy.keys import ServerKeys
from ditvla.deploy.messages import Message, observation_bytes
from ditvla.deploy.schedule import MERGE_RULES, ActionSchedule, MergeRule, safe_actions
from ditvla.deploy.transport import DEFAULT_ADDRESS, PairChannel, ServerChannel, SessionGate
from ditvla.devices import device_named
from ditvla.errors import ConfigError
from ditvla.real_time_chunking import rtc_weights

SYSTEM2_TIMEOUT_S = 30.0
MAX_MESSAGES_PER_TICK = 16
# Below the controller's priority when they share a machine: System 1 a little, System 2 more.
SYSTEM1_NICE = 5
SYSTEM2_NICE = 10


@dataclass
class ServeConfig:
    """How ``ditvla serve`` runs a policy for a robot controller.

    Args:
        policy: a saved policy folder.
        address: where to listen (tcp://HOST:PORT or ipc://PATH).
        keys: the server's CURVE key pair and the folder of admitted robots' public keys
            (required off loopback; see ditvla.deploy.keys).
        merge: latest, ensemble, or rtc (real-time chunking: new chunks are inpainted
            towards the actions already planned).
        system1_hz: chunks per second (0: two per n_action_steps of control ticks, at the
            rate the robot's hello names, capped at max_control_hz).
        max_control_hz: the highest control rate a robot's hello may set System 1's pace
            by (a robot claiming more is served as if it ran at this rate).
        system2_hz: contexts per second (0: as fast as System 2 can).
        system1_threads / system2_threads: torch threads of each system.
        max_context_age_s: no new chunks from a context older than this (the robot holds).
        action_low / action_high: clip every action to these bounds.
        num_inference_steps: denoising steps per chunk (default: the policy's own).
        head_dtype: what System 1's action head computes in: float32, or bfloat16 (faster
            on GPUs and on CPUs with AVX512-BF16 or AMX, slower on others; measure it).
        device: where System 1 runs the policy (auto, cpu, cuda, cuda:N).
        system2_device: where System 2 runs the VLM (empty: where System 1 runs).
        Both are resolved to a device this machine has (ConfigError otherwise).
        max_robots: robots served at once, each in its own session (a fleet); a robot
            silent for SESSION_SILENCE_S frees its slot for the next robot's hello, except
            for SESSION_SETUP_S after its session opens or its episode resets (until it
            first speaks again), while it builds or resets its robot
            (ditvla.deploy.transport).
    """

    policy: str
    address: str = DEFAULT_ADDRESS
    keys: ServerKeys | None = None
    merge: MergeRule = "latest"
    system1_hz: float = 0.0
    system2_hz: float = 0.0
    max_control_hz: float = 200.0
    system1_threads: int = 1
    system2_threads: int = 1
    max_context_age_s: float = 1.0
    action_low: float | None = None
    action_high: float | None = None
    num_inference_steps: int | None = None
    head_dtype: HeadDType = "float32"
    device: str = "cpu"
    system2_device: str = ""
    max_robots: int = 1

    def __post_init__(self) -> None:
        if self.merge not in MERGE_RULES:
            raise ConfigError(f"unknown merge rule {self.merge!r}; choose {', '.join(MERGE_RULES)}")
        if not self.max_control_hz > 0:
            raise ConfigError(f"max_control_hz is {self.max_control_hz}; it must be above 0")
        if self.max_robots < 1:
            raise ConfigError(f"max_robots is {self.max_robots}; serve at least one robot")
        # a device this machine lacks is named now, not half-way through loading
        self.device = str(device_named(self.device))
        self.system2_device = str(device_named(self.system2_device or self.device))


@dataclass
class ServerStats:
    chunks: int = 0
    contexts: int = 0
    stale_skips: int = 0
    nan_chunks: int = 0
    system2_restarts: int = 0
    rejected_messages: int = 0
    dropped_sends: int = 0
    bad_observations: int = 0
    unencodable: int = 0  # a robot's frames System 2 could not encode (dropped)
    sessions: int = 0  # sessions opened (hellos answered)
    takeovers: int = 0  # sessions ended to give their slot to another peer
    robots: int = 0  # robots holding a session now
    system1_hz: float = 0.0
    system2_hz: float = 0.0
    # the weights System 1 holds, and those it released to System 2's process (the VLM)
    system1_weight_bytes: int = 0
    released_weight_bytes: int = 0
    act_ms: list[float] = field(default_factory=list)


def _rate(previous: float, interval: float) -> float:
    """Exponential moving average of a rate from one interval (seconds)."""
    current = 1.0 / max(interval, 1e-6)
    return current if previous == 0 else 0.8 * previous + 0.2 * current


# ---------------------------------------------------------------------- System 2
def _system2_main(
    policy_dir: str, address: str, session: str, threads: int, hz: float, device: str
) -> None:
    """System 2 process: observations with images in, context tokens out, one per
    observation; the observations waiting when it turns to them (one per robot of a
    fleet) go through the VLM together, in one forward."""
    os.nice(SYSTEM2_NICE - SYSTEM1_NICE)  # the server's niceness is inherited
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops us
    policy = load_policy(policy_dir, device=device)
    if isinstance(policy, SplitsBySystem):
        policy.keep_only("system2")  # the head lives in System 1
    size = (policy.spec.image_size, policy.spec.image_size, 3)
    with PairChannel(address, bind=False, accepts_from=("server",)) as channel:
        channel.codec.start_session(session)
        # warm-up: one forward, then the server hears that System 2 is ready
        blank = {f"image.{cam}": np.zeros(size, np.uint8) for cam in policy.spec.cameras}
        _encoded(policy, [Message("frames", {"instruction": ""}, blank)])
        channel.send(Message("ready"))
        batch, last = [], 0.0
        while True:
            if not batch:
                if os.getppid() == 1:  # the server died
                    return
                batch = _waiting_observations(channel)
                continue
            if hz > 0:
                time.sleep(max(0.0, last + 1.0 / hz - time.monotonic()))
            last = time.monotonic()
            for answer in system2_answers(policy, batch):
                channel.send(answer)
            batch = []


def _waiting_observations(channel: PairChannel) -> list[Message]:
    """The next observation (waiting up to a second) and all that wait behind it."""
    first = channel.receive(timeout_ms=1000)
    return [] if first is None else [first, *channel.receive_all()]


def system2_answers(policy, batch: list[Message]) -> list[Message]:
    """A ``context`` for each of ``batch``'s frames, encoded in one forward; when that
    fails, each robot's frames alone, and frames that fail alone are answered
    ``unencodable`` (dropped): one robot's frames cannot cost the fleet its contexts."""
    try:
        tokens, mask = _encoded(policy, batch)
    except Exception:  # whatever the VLM raises on some robot's frames
        if len(batch) == 1:
            return [Message("unencodable", _whose(batch[0]))]
        return [answer for frames in batch for answer in system2_answers(policy, [frames])]
    return [
        Message("context", _whose(frames), {"tokens": tokens[i : i + 1], "mask": mask[i : i + 1]})
        for i, frames in enumerate(batch)
    ]


def _whose(frames: Message) -> dict[str, int]:
    """The tick, episode and robot of ``frames``, which their answer carries back."""
    return {key: frames.meta[key] for key in ("tick", "episode", "robot_id")}


def _encoded(policy, batch: list[Message]) -> tuple[np.ndarray, np.ndarray]:
    """The VLM's tokens (B, L, width) float32 and mask (B, L) uint8 of a batch of
    observations, in one forward."""
    cameras = policy.spec.cameras
    observation = {
        "images": {cam: np.stack([m.arrays[f"image.{cam}"] for m in batch]) for cam in cameras},
        "instruction": [m.meta.get("instruction", "") for m in batch],
    }
    with torch.inference_mode():
        if isinstance(policy, SplitsBySystem):
            tokens, mask = policy.vlm_tokens(observation)
        else:
            context = policy.encode(observation)
            tokens, mask = context.tokens, context.mask
    return tokens.float().cpu().numpy(), mask.cpu().numpy().astype(np.uint8)


class System2:
    """The System 2 process and its private channel: a PAIR socket (one peer) on an ipc
    path in a folder only this user can open (mode 0700), one session per process. It is
    busy from a batch's submission until every observation of it is answered."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self._folder = tempfile.mkdtemp(prefix="ditvla-s2-")
        self._address = f"ipc://{self._folder}/context"
        self.channel = self._channel()
        self._process: mp.process.BaseProcess | None = None
        self.busy_since: float | None = None
        self.unanswered = 0
        self.ready = False
        self.restarts = -1
        self.start()

    def start(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            # a fresh process, a fresh session: nothing of the old one is taken
            self.channel.close()
            self.channel = self._channel()
        config = self.config
        self._process = mp.get_context("spawn").Process(
            target=_system2_main,
            args=(
                config.policy,
                self._address,
                self.channel.codec.session,
                config.system2_threads,
                config.system2_hz,
                config.system2_device,
            ),
            daemon=True,
            name="ditvla-system2",
        )
        self._process.start()
        self.busy_since, self.unanswered = None, 0
        self.restarts += 1

    def _channel(self) -> PairChannel:
        channel = PairChannel(self._address, bind=True, accepts_from=("system2",))
        channel.codec.start_session(secrets.token_hex(8))
        return channel

    def healthy(self) -> bool:
        if not self._process.is_alive():
            return False
        return self.busy_since is None or time.monotonic() - self.busy_since < SYSTEM2_TIMEOUT_S

    def submit(self, observations: list[Message]) -> None:
        """Hand System 2 a batch (at most one observation per robot)."""
        sent = sum(self.channel.send(observation) for observation in observations)
        if sent:
            self.busy_since = time.monotonic()
            self.unanswered += sent

    def answered(self) -> None:
        """One context came back; idle once the whole batch has."""
        self.unanswered = max(0, self.unanswered - 1)
        if not self.unanswered:
            self.busy_since = None

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
        self.channel.close()
        for path in Path(self._folder).glob("*"):
            path.unlink(missing_ok=True)
        os.rmdir(self._folder)


# ---------------------------------------------------------------------- one robot
@dataclass
class RobotSession:
    """What the server holds for one robot: its episode, its newest context, state and
    camera frames, when System 1 acts for it next, and what it was sent. Nothing here is
    shared between robots. ``robot_id``: the server's number for this session (never
    reused), which tags its observations to System 2 and the contexts that come back."""

    peer: bytes
    robot_id: int
    control_hz: float
    spoke: bool = False  # it sent something in this session (not only hellos)
    episode: int = 0
    context: tuple[Any, int] | None = None  # (the policy's context, tick of its observation)
    context_at: float = 0.0
    # tick, controller time of the observation, received at, state
    state: tuple[int, float, float, np.ndarray] | None = None
    frames: Message | None = None  # newest observation with images, not yet encoded
    last_chunk_at: float = 0.0
    next_act_at: float = 0.0
    chunks: int = 0
    system1_hz: float = 0.0
    system2_hz: float = 0.0
    sent: ActionSchedule = field(default_factory=lambda: ActionSchedule("latest"))

    def reset_episode(self, episode: int) -> None:
        self.episode = episode
        self.context = self.state = self.frames = None
        self.last_chunk_at = self.next_act_at = 0.0
        self.sent.clear()

    def due(self, now: float) -> bool:
        """System 1 has a context and a state for this robot, and its turn has come."""
        return self.state is not None and self.context is not None and self.next_act_at <= now

    def take_frames(self) -> Message:
        """Its newest camera frames, tagged with its ``robot_id`` for System 2 (then gone)."""
        observation, self.frames = self.frames, None
        meta = {k: v for k, v in observation.meta.items() if k != "time"}  # tick, episode, ...
        images = {k: v for k, v in observation.arrays.items() if k.startswith("image.")}
        return Message("frames", {**meta, "robot_id": self.robot_id}, images)

    def take_context(self, context: Any, tick: int) -> None:
        if self.context is not None:
            self.system2_hz = _rate(self.system2_hz, time.monotonic() - self.context_at)
        self.context, self.context_at = (context, tick), time.monotonic()


# ---------------------------------------------------------------------- the server
class PolicyServer:
    """Serves ``config.max_robots`` robots at once, each in its own session
    (:class:`RobotSession`): System 2 encodes the robots' fresh frames together, System 1
    acts for each robot from its own newest context and state, and each chunk goes to its
    robot's connection only."""

    def __init__(self, config: ServeConfig):
        self.config = config
        os.nice(SYSTEM1_NICE)
        torch.set_num_threads(config.system1_threads)
        self.policy = load_policy(config.policy, config.device, head_dtype=config.head_dtype)
        self.spec = self.policy.spec
        self.stats = ServerStats()
        if isinstance(self.policy, SplitsBySystem):  # the VLM lives in System 2's process
            weights = self.policy.keep_only("system1")
            self.stats.system1_weight_bytes = weights["kept"]
            self.stats.released_weight_bytes = weights["released"]
        # ZeroMQ cuts off a peer whose frame outgrows the policy's largest observation
        largest = observation_bytes(
            len(self.spec.cameras), self.spec.image_size, self.spec.state_dim
        )
        gate = SessionGate(max_sessions=config.max_robots)
        self.channel = ServerChannel(
            config.address, keys=config.keys, gate=gate, max_frame_bytes=largest
        )
        self.system2 = System2(config)
        self.robots: dict[bytes, RobotSession] = {}
        self._robot_ids = itertools.count()
        self._stop = False

    def stop(self, *_: object) -> None:
        self._stop = True

    # -------------------------------------------------------------- messages
    def _spec(self, hello: Message) -> Message:
        spec = self.spec
        meta = {
            "cameras": list(spec.cameras),
            "image_size": spec.image_size,
            "state_dim": spec.state_dim,
            "state_keys": list(spec.state_keys),
            "action_dim": spec.action_dim,
            "policy": str(self.config.policy)[-1024:],
            "nonce": hello.meta["nonce"],
        }
        return Message("spec", meta, self.action_limits())

    def action_limits(self) -> dict[str, np.ndarray]:
        """The limits a controller holds actions to unless told others (see
        :mod:`ditvla.deploy.action_limits`); none when a side is unbounded."""
        spec, config = self.spec, self.config
        low = high = None
        if spec.action_low is not None:
            low, high = widened_range(spec.action_low, spec.action_high)
        low, high = merged_limits(spec.action_dim, low, high, config.action_low, config.action_high)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            return {}
        return {"action_low": low, "action_high": high}

    def _observation_fits(self, message: Message) -> bool:
        """State of the policy's width; camera frames (S, S, 3) of the policy's cameras."""
        if message.arrays["state"].shape != (self.spec.state_dim,):
            return False
        size = (self.spec.image_size, self.spec.image_size, 3)
        images = {k: v for k, v in message.arrays.items() if k.startswith("image.")}
        return all(
            name.removeprefix("image.") in self.spec.cameras and frame.shape == size
            for name, frame in images.items()
        )

    def _open_session(self, peer: bytes, hello: Message) -> None:
        """A new session for ``peer`` (in place of its old one, or of the robot silent
        longest when every slot is taken), answered with the policy's spec."""
        ended = self.channel.accept(peer, secrets.token_hex(8))
        if ended is not None:
            self.robots.pop(ended, None)
            self.stats.takeovers += 1
        control_hz = float(hello.meta["control_hz"])
        self.robots[peer] = RobotSession(peer, next(self._robot_ids), control_hz)
        self.stats.sessions += 1
        self.channel.send(self._spec(hello), to=peer)

    def _handle(self, peer: bytes, message: Message) -> None:
        robot = self.robots.get(peer)
        if message.type == "hello":
            if robot is not None and not robot.spoke:
                # its hellos sent while it waited for our answer: the same session
                self.channel.send(self._spec(message), to=peer)
            elif self.system2.ready:  # else the controller asks again
                self._open_session(peer, message)
            return
        if robot is None:  # the channel hears only hellos from peers without a session
            return
        robot.spoke = True
        if message.type == "reset":
            robot.reset_episode(message.meta["episode"])
        elif message.type == "observation":
            if message.meta["episode"] != robot.episode:
                robot.reset_episode(message.meta["episode"])
            if not self._observation_fits(message):  # never reaches System 2
                self.stats.bad_observations += 1
                return
            meta = message.meta
            robot.state = (meta["tick"], meta["time"], time.monotonic(), message.arrays["state"])
            if all(f"image.{cam}" in message.arrays for cam in self.spec.cameras):
                robot.frames = message

    def _pump_system2(self) -> None:
        """Contexts back to their robots; System 2 restarted when it died or hangs; the
        robots' fresh frames handed over together when it is idle."""
        for message in self.system2.channel.receive_all():
            if message.type == "ready":  # warmed up
                self.system2.ready = True
            else:  # an answer to frames of ours
                if message.type == "context":
                    self._take_context(message)
                else:
                    self.stats.unencodable += 1
                self.system2.answered()
        if not self.system2.healthy():
            self.system2.start()
            self.stats.system2_restarts = self.system2.restarts
        fresh = [robot for robot in self.robots.values() if robot.frames is not None]
        if fresh and self.system2.busy_since is None:
            self.system2.submit([robot.take_frames() for robot in fresh])

    def _take_context(self, message: Message) -> None:
        """A context from System 2, for the robot (and episode) whose frames it encoded."""
        robot_id, episode = message.meta["robot_id"], message.meta["episode"]
        robot = next((r for r in self.robots.values() if r.robot_id == robot_id), None)
        if robot is None or robot.episode != episode:
            return  # its session or its episode ended meanwhile
        tokens = torch.from_numpy(message.arrays["tokens"].copy())
        mask = torch.from_numpy(message.arrays["mask"].copy())
        with torch.inference_mode():
            robot.take_context(self.policy.context_from(tokens, mask), message.meta["tick"])
        self.stats.contexts += 1

    # -------------------------------------------------------------- System 1
    def _system1_interval(self, robot: RobotSession) -> float:
        if self.config.system1_hz > 0:
            return 1.0 / self.config.system1_hz
        return self.spec.n_action_steps / min(robot.control_hz, self.config.max_control_hz) / 2

    def _inpainting(self, robot: RobotSession, tick: int, delay_s: float):
        """rtc: the planned actions and their weights a new chunk is inpainted towards."""
        planned = robot.sent.planned(tick, self.spec.horizon)
        if planned is None:
            return None
        mean_act_s = np.mean(self.stats.act_ms[-20:]) / 1e3 if self.stats.act_ms else 0.1
        delay = math.ceil((delay_s + mean_act_s) * robot.control_hz)
        return planned[0], rtc_weights(self.spec.horizon, delay, planned[1])

    def _act(self, robot: RobotSession) -> None:
        context, context_tick = robot.context
        tick, obs_time, received_at, state = robot.state
        started = time.monotonic()
        robot.next_act_at = started + self._system1_interval(robot)
        context_age_s = (tick - context_tick) / robot.control_hz
        state_age_s = started - received_at  # the robot stopped sending: no chunks for it
        if max(context_age_s, state_age_s) > self.config.max_context_age_s:
            self.stats.stale_skips += 1
            return
        inpaint = None
        if self.config.merge == "rtc":
            inpaint = self._inpainting(robot, tick, started - received_at)
        with torch.inference_mode():
            chunks = self.policy.act(
                context, state[None], num_steps=self.config.num_inference_steps, inpaint=inpaint
            )
        chunk = chunks[0].cpu().numpy()  # the copy to the host waits for the device's work
        now = time.monotonic()
        self.stats.act_ms.append((now - started) * 1e3)
        del self.stats.act_ms[:-200]
        chunk = safe_actions(chunk, self.config.action_low, self.config.action_high)
        if chunk is None:
            self.stats.nan_chunks += 1
            return
        if robot.last_chunk_at:
            robot.system1_hz = _rate(robot.system1_hz, now - robot.last_chunk_at)
        robot.last_chunk_at = now
        robot.sent.add(tick, chunk)
        robot.sent.prune(tick)
        robot.chunks += 1
        self.stats.chunks += 1
        meta = {"start_tick": tick, "obs_time": obs_time, "context_tick": context_tick}
        meta.update(episode=robot.episode, chunk=robot.chunks)
        meta.update(system1_hz=round(robot.system1_hz, 3), system2_hz=round(robot.system2_hz, 3))
        self.channel.send(Message("actions", meta, {"actions": chunk}), to=robot.peer)

    # -------------------------------------------------------------- the loop
    def _wait_ms(self) -> float:
        """How long the loop may wait for messages: until the next robot's turn, 2 ms at most."""
        ready = [r.next_act_at for r in self.robots.values() if r.due(math.inf)]
        if not ready:
            return 2
        return max(0, min(2, (min(ready) - time.monotonic()) * 1e3))

    def _update_stats(self) -> None:
        stats, robots = self.stats, self.robots.values()
        stats.rejected_messages = self.channel.rejected_total
        stats.dropped_sends = self.channel.dropped_sends
        stats.robots = len(self.robots)
        for name in ("system1_hz", "system2_hz"):
            rates = [getattr(robot, name) for robot in robots if getattr(robot, name)]
            if rates:  # the fleet's mean (one robot's own rate)
                setattr(stats, name, float(np.mean(rates)))

    def serve(self, duration_s: float | None = None, on_status=None) -> ServerStats:
        """Run until :meth:`stop` (SIGINT/SIGTERM in the CLI) or ``duration_s``."""
        end = time.monotonic() + duration_s if duration_s else math.inf
        next_status = time.monotonic() + 1.0
        # a flood cannot hold System 1: a bounded number of messages per turn, per robot
        budget = MAX_MESSAGES_PER_TICK * self.config.max_robots
        try:
            while not self._stop and time.monotonic() < end:
                received = self.channel.receive(timeout_ms=self._wait_ms())
                for _ in range(budget):
                    if received is None:
                        break
                    self._handle(*received)
                    received = self.channel.receive(0)
                self._pump_system2()
                # earliest deadline first: the robot whose turn came first is served first
                for robot in sorted(self.robots.values(), key=lambda r: r.next_act_at):
                    if robot.due(time.monotonic()):
                        self._act(robot)
                self._update_stats()
                if on_status is not None and time.monotonic() >= next_status:
                    on_status(self.stats, self.channel.last_error)
                    next_status = time.monotonic() + 1.0
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        self.system2.close()
        self.channel.close()

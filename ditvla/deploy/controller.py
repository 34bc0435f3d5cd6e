"""The robot controller process, ``ditvla robot``: a fixed-rate control loop.

Each tick: wait for the tick's deadline on the controller's clock (:mod:`ditvla.deploy.clock`:
real time under SCHED_FIFO where the OS permits; a test's own clock in tests), take in the
chunks that arrived, execute the action due at this tick — or hold the robot when none is
due, when the newest chunk is older than the watchdog allows, or when the action is not
finite — then send the tick's observation (state every tick, camera frames when the cameras
have new ones).

Per tick it records the start jitter, the work time and what was executed; per chunk
the observation-to-action latency. A live line shows control rate, p99 jitter, latency,
deadline misses and the server's System 1 / System 2 rates; the rows are saved as CSV
and a summary as JSON. SIGINT / SIGTERM end the loop cleanly with the robot held.

A session (:func:`run_session`) is the same for every robot — handshake, the robot checked
against the policy's spec, the loop, late chunks counted, metrics written — and the robots
differ only in how they are built and how their episodes run (:func:`run_sim`,
:func:`run_lerobot`). The robots live in modules of their own, imported only when used,
so that this module imports no simulator and no LeRobot.
"""

from __future__ import annotations

import csv
import json
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ditvla.contract import EVAL_SEED_START
from ditvla.deploy.action_limits import merged_limits
from ditvla.deploy.clock import Clock, MonotonicClock, control_clock
from ditvla.deploy.errors import ServerUnavailable
from ditvla.deploy.messages import Message
from ditvla.deploy.robot import Robot
from ditvla.deploy.schedule import ActionSchedule, MergeRule, safe_actions
from ditvla.deploy.transport import ClientChannel
from ditvla.errors import ConfigError

# A chunk may start at most this many ticks in the future (1 s at 50 Hz), and must still
# have an action at most this many ticks ago; outside, it is refused.
AHEAD_TICKS = 50
PAST_TICKS = 0
MAX_CHUNK = 1024  # actions per chunk
REHELLO_S = 2.0  # nothing from the server for this long: say hello again (it may have restarted)
DRAIN_S = 1.5  # longer than the server's max_context_age_s: it has stopped sending by then
DRAIN_POLL_S = 0.05


@dataclass
class ControllerConfig:
    """How ``ditvla robot`` runs its control loop.

    Args:
        hz: control rate (ticks per second).
        merge: how overlapping chunks merge: latest, ensemble (ACT's temporal ensembling)
            or rtc (real-time chunking: the server inpaints; executed as latest).
        ensemble_decay: ensemble: weight exp(-decay * i) of the i-th oldest chunk.
        watchdog_s: hold the robot when the newest chunk arrived longer ago than this.
        action_low / action_high: refuse chunks with an action beyond these bounds (when
            none is given, beyond the server's limits).
        realtime: run the loop under SCHED_FIFO where the OS permits it (root,
            CAP_SYS_NICE or an rtprio limit).
    """

    hz: float = 50.0
    merge: MergeRule = "latest"
    ensemble_decay: float = 0.01
    watchdog_s: float = 0.5
    action_low: float | None = None
    action_high: float | None = None
    realtime: bool = True


@dataclass
class TickRecord:
    tick: int
    episode: int
    jitter_ms: float
    work_ms: float
    executed: str  # "action" | "hold" | "watchdog" | "nan"
    chunk_latency_ms: float | None = None
    system1_hz: float | None = None
    system2_hz: float | None = None
    # how far the executed action moved from the last tick's (L2; None after a hold), and
    # whether it came from another chunk than the last tick's: a switch between chunks
    action_change: float | None = None
    new_chunk: bool = False


@dataclass
class ControlSummary:
    ticks: int = 0
    control_hz: float = 0.0
    jitter_p50_ms: float = 0.0
    jitter_p99_ms: float = 0.0
    jitter_max_ms: float = 0.0
    missed_deadlines: int = 0
    held_ticks: int = 0
    chunks: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    system1_hz: float = 0.0
    system2_hz: float = 0.0
    # mean action_change on ticks that switch to a new chunk vs on the others: how smooth
    # the switches are (real-time chunking's aim) against the motion within a chunk
    action_jump_at_switch: float = 0.0
    action_change_within_chunk: float = 0.0
    rejected_messages: int = 0
    chunks_received: int = 0
    # sessions this robot held: 1 unless it had to say hello again (the server restarted,
    # or its session was lost: no news for REHELLO_S)
    sessions: int = 0
    refused_chunks: dict[str, int] = field(default_factory=dict)
    episodes: list[dict] = field(default_factory=list)


def hello(channel: ClientChannel, robot_name: str, hz: float) -> str:
    """Send a hello with a fresh nonce (the spec that answers it names it); returns it."""
    nonce = secrets.token_hex(8)
    channel.send(Message("hello", {"robot": robot_name, "control_hz": hz, "nonce": nonce}))
    return nonce


def adopt_spec(channel: ClientChannel, spec: Message, nonce: str) -> bool:
    """Start the session ``spec`` names if it answers our hello of ``nonce``."""
    if spec.type != "spec" or spec.meta.get("nonce") != nonce:
        return False
    channel.codec.start_session(spec.session)
    return True


def handshake(
    channel: ClientChannel, robot_name: str, hz: float, timeout_s: float = 120.0
) -> Message:
    """Say hello until the server answers with the policy's spec; a session starts."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        nonce = hello(channel, robot_name, hz)
        reply = channel.receive(timeout_ms=500)
        if reply is not None and adopt_spec(channel, reply, nonce):
            return reply
    raise ServerUnavailable(
        f"no policy server answered at {channel.address} within {timeout_s:.0f} s "
        "(start one with `ditvla serve --policy DIR`; the same --keys folder on both sides)"
    )


def check_spec(spec: Message, robot: Robot) -> None:
    """ValueError unless the robot can serve the policy: its action width, and limits of
    that width."""
    if spec.meta["action_dim"] != robot.action_dim:
        raise ConfigError(
            f"the policy acts in {spec.meta['action_dim']} dimensions, the robot in "
            f"{robot.action_dim}"
        )
    for name in ("action_low", "action_high"):
        if name in spec.arrays and spec.arrays[name].shape != (robot.action_dim,):
            raise ConfigError(f"the server's {name} has shape {spec.arrays[name].shape}")


class Controller:
    """The fixed-rate loop. Every chunk is checked against the robot before it is
    scheduled — its width, a window of ticks around now (:data:`PAST_TICKS` behind,
    :data:`AHEAD_TICKS` ahead), the action limits (``--action-low/--action-high``, else
    the server's, from the policy's training range, else the robot's own) — and one
    that fails is dropped and counted by reason in :attr:`refused`; with nothing valid
    due, the robot holds.

    ``clock``: what the loop waits on (real time by default; a test may pass its own)."""

    def __init__(
        self,
        channel: ClientChannel,
        robot: Robot,
        config: ControllerConfig,
        spec: Message | None = None,
        name: str = "robot",
        clock: Clock | None = None,
    ):
        self.channel, self.robot, self.config = channel, robot, config
        self.name = name
        self.clock = clock or MonotonicClock()
        self.period = 1.0 / config.hz
        # the server's limits, else the robot's own (a policy may have recorded none)
        arrays = spec.arrays if spec is not None else {}
        own_low, own_high = robot.action_bounds or (None, None)
        low, high = arrays.get("action_low"), arrays.get("action_high")
        self.low, self.high = merged_limits(
            robot.action_dim,
            own_low if low is None else low,
            own_high if high is None else high,
            config.action_low,
            config.action_high,
        )
        self.refused: Counter[str] = Counter()
        self.chunks_received = 0
        self.sessions = int(spec is not None)
        self._nonce: str | None = None
        self._heard_at = self.clock.now()
        self.schedule = ActionSchedule(
            "latest" if config.merge == "rtc" else config.merge, config.ensemble_decay
        )
        self.records: list[TickRecord] = []
        self.missed = 0
        self.tick = 0
        self._stop = False

    def stop(self, *_: object) -> None:
        self._stop = True

    @property
    def stopped(self) -> bool:
        """Asked to stop (SIGINT / SIGTERM): no more ticks."""
        return self._stop

    def _chunk_problem(self, message: Message, episode: int) -> str | None:
        """Why a message from the server must not drive the robot, or None."""
        if message.type == "spec":
            if self._nonce is not None and adopt_spec(self.channel, message, self._nonce):
                self._nonce = None  # the server restarted: a new session
                self.sessions += 1
                return "new session"
            return "unasked spec"
        if message.meta["episode"] != episode:
            return "other episode"
        actions, start = message.arrays["actions"], message.meta["start_tick"]
        if actions.shape[1] != self.robot.action_dim or not 0 < len(actions) <= MAX_CHUNK:
            return "wrong width or length"
        if start + len(actions) <= self.tick - PAST_TICKS or start > self.tick + AHEAD_TICKS:
            return "outside the tick window"
        if np.any(actions < self.low) or np.any(actions > self.high):
            return "beyond the action limits"
        return None

    def _take_in(self, episode: int, now: float) -> tuple[float | None, Message | None]:
        """Schedule the valid chunks waiting (a bounded number); (latency, last chunk)."""
        latency, last = None, None
        for message in self.channel.receive_all():
            self._heard_at = now
            self.chunks_received += message.type == "actions"
            problem = self._chunk_problem(message, episode)
            if problem is not None:
                self.refused[problem] += problem != "new session"
                continue
            self.schedule.add(message.meta["start_tick"], message.arrays["actions"])
            latency = (now - message.meta["obs_time"]) * 1e3
            last = message
        if now - self._heard_at > REHELLO_S:  # the server may have restarted: ask again
            self._nonce = hello(self.channel, self.name, self.config.hz)
            self._heard_at = now
        return latency, last

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)

    def run_episode(
        self, episode: int, max_ticks: int, *, done=lambda: False, progress=None, reset=lambda: None
    ) -> int:
        """Run the loop for one episode; returns the ticks it ran. ``reset()``: the robot's
        own reset, once the server knows the episode (it keeps our session meanwhile)."""
        self.schedule.clear()
        self.channel.send(Message("reset", {"episode": episode}))
        reset()
        # the server answers observations: the silence before this episode's first one (the
        # robot being reset) is no sign that the server is gone
        self._heard_at = self.clock.now()
        last_chunk_at = -np.inf
        s1 = s2 = None
        previous_action, previous_source = None, None
        start = self.clock.now()
        first_tick = self.tick
        for n in range(max_ticks):
            if self._stop:
                break
            deadline = start + n * self.period
            self.clock.sleep_until(deadline)
            began = self.clock.now()
            latency, chunk = self._take_in(episode, began)
            if chunk is not None:
                last_chunk_at = began
                s1, s2 = chunk.meta.get("system1_hz"), chunk.meta.get("system2_hz")
            self.schedule.prune(self.tick)
            action = self.schedule.action_at(self.tick)
            if action is None:
                executed = "hold"
            elif began - last_chunk_at > self.config.watchdog_s:
                executed = "watchdog"
            elif (action := safe_actions(action)) is None:
                executed = "nan"
            else:
                executed = "action"
            change, source = None, self.schedule.newest_start(self.tick)
            if executed == "action":
                self.robot.send_action(action)
                if previous_action is not None:
                    change = float(np.linalg.norm(action - previous_action))
                previous_action = action
            else:
                self.robot.hold()
                previous_action = None
            self._send_observation(episode, began)
            finished = self.clock.now()
            if finished > deadline + self.period:
                self.missed += 1
            self.records.append(
                TickRecord(
                    self.tick,
                    episode,
                    (began - deadline) * 1e3,
                    (finished - began) * 1e3,
                    executed,
                    latency,
                    s1,
                    s2,
                    change,
                    change is not None and source != previous_source,
                )
            )
            previous_source = source
            self.tick += 1
            if progress is not None:
                progress.update(1)
                if n % 25 == 0:
                    progress.set_postfix_str(self.live_line(), refresh=False)
            if done():
                break
        self.robot.hold()
        return self.tick - first_tick

    def drain(self, seconds: float = DRAIN_S) -> None:
        """After the last tick: take in (and count, not run) what is still on its way."""
        end = self.clock.now() + seconds
        while (now := self.clock.now()) < end:
            self.clock.sleep_until(min(end, now + DRAIN_POLL_S))
            received = self.channel.receive_all()
            self.chunks_received += sum(message.type == "actions" for message in received)

    def _send_observation(self, episode: int, now: float) -> None:
        """The tick's state (and new frames); a robot reading NaN sends nothing (and holds
        next tick, when no fresh chunk follows)."""
        state, frames = self.robot.observe()
        state = np.asarray(state, np.float32)
        if not np.all(np.isfinite(state)):
            self.refused["robot state not finite"] += 1
            return
        arrays = {"state": state}
        for cam, frame in (frames or {}).items():
            arrays[f"image.{cam}"] = frame
        meta = {"tick": self.tick, "time": now, "episode": episode}
        if frames:
            meta["instruction"] = self.robot.instruction
        self.channel.send(Message("observation", meta, arrays))

    def live_line(self) -> str:
        recent = self.records[-250:]
        if len(recent) < 2:
            return ""
        jitter = np.percentile([r.jitter_ms for r in recent], 99)
        latencies = [r.chunk_latency_ms for r in recent if r.chunk_latency_ms is not None]
        s1 = next((r.system1_hz for r in reversed(recent) if r.system1_hz), 0.0)
        s2 = next((r.system2_hz for r in reversed(recent) if r.system2_hz), 0.0)
        held = sum(r.executed != "action" for r in recent)
        return (
            f"p99 jitter {jitter:.2f} ms | obs->action {np.median(latencies or [0]):.0f} ms | "
            f"missed {self.missed} | held {held}/{len(recent)} | S1 {s1:.1f} Hz | S2 {s2:.1f} Hz"
        )

    def summary(self, episodes: list[dict]) -> ControlSummary:
        records = self.records
        if not records:
            return ControlSummary(episodes=episodes)
        jitter = np.array([r.jitter_ms for r in records])
        latencies = [r.chunk_latency_ms for r in records if r.chunk_latency_ms is not None]
        duration = len(records) * self.period
        moved = [r for r in records if r.action_change is not None]
        switches = [r.action_change for r in moved if r.new_chunk]
        within = [r.action_change for r in moved if not r.new_chunk]
        return ControlSummary(
            ticks=len(records),
            control_hz=len(records) / duration if duration else 0.0,
            jitter_p50_ms=float(np.percentile(jitter, 50)),
            jitter_p99_ms=float(np.percentile(jitter, 99)),
            jitter_max_ms=float(jitter.max()),
            missed_deadlines=self.missed,
            held_ticks=sum(r.executed != "action" for r in records),
            chunks=len(latencies),
            latency_p50_ms=float(np.percentile(latencies, 50)) if latencies else 0.0,
            latency_p99_ms=float(np.percentile(latencies, 99)) if latencies else 0.0,
            system1_hz=float(next((r.system1_hz for r in reversed(records) if r.system1_hz), 0)),
            system2_hz=float(next((r.system2_hz for r in reversed(records) if r.system2_hz), 0)),
            action_jump_at_switch=float(np.mean(switches)) if switches else 0.0,
            action_change_within_chunk=float(np.mean(within)) if within else 0.0,
            rejected_messages=self.channel.rejected_total,
            chunks_received=self.chunks_received,
            sessions=self.sessions,
            refused_chunks=dict(self.refused),
            episodes=episodes,
        )

    def write(self, out: Path, summary: ControlSummary) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "ticks.csv", "w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=list(asdict(self.records[0])) if self.records else []
            )
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.records)
        (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")


@dataclass(frozen=True)
class RunConfig:
    """How long ``ditvla robot`` runs, and the simulated robot's episodes.

    Args:
        episodes: --sim: episodes to run.
        seed_start: --sim: the first episode's seed (then +1 per episode); the
            evaluator's first by default, so that no episode is one demonstrations are
            collected on.
        max_steps: ticks per episode.
        duration_s: run for this many seconds instead (--sim: new episodes as they end;
            --robot: one run of this length, 60 s when not given).
        camera_hz: --sim: the simulated cameras' frame rate.
    """

    episodes: int = 1
    seed_start: int = EVAL_SEED_START
    max_steps: int = 500
    duration_s: float | None = None
    camera_hz: float = 10.0


LEROBOT_DEFAULT_DURATION_S = 60.0
SWITCH_INTERVAL_S = 0.0005  # --sim: the control thread gets the GIL back from the cameras fast


def run_session(
    channel: ClientChannel,
    name: str,
    robot_for: Callable[[Message], Robot],
    run_episodes: Callable[[Controller], list[dict]],
    *,
    config: ControllerConfig,
    out: Path | None = None,
    install_signals: bool = True,
    clock: Clock | None = None,
) -> ControlSummary:
    """One session with a policy server, whatever the robot: the handshake, the robot the
    server's spec asks for (``robot_for(spec)``, checked against the spec), the control
    loop as ``run_episodes(controller)`` drives it (it returns the episodes' results), the
    robot closed whatever happens, the chunks still on their way counted, the metrics
    written to ``out``. ``clock``: real time (under SCHED_FIFO where permitted) by default."""
    spec = handshake(channel, name, config.hz)
    robot = robot_for(spec)
    try:
        check_spec(spec, robot)
        clock = clock or control_clock(config.realtime)
        controller = Controller(channel, robot, config, spec, name, clock=clock)
        if install_signals:
            controller.install_signal_handlers()
        episodes = run_episodes(controller)
    finally:
        robot.close()
    controller.drain()
    summary = controller.summary(episodes)
    if out is not None:
        controller.write(out, summary)
    return summary


def run_lerobot(
    channel: ClientChannel,
    robot_type: str,
    options: dict[str, str],
    instruction: str,
    *,
    config: ControllerConfig,
    run: RunConfig,
    out: Path | None = None,
) -> ControlSummary:
    """Drive a LeRobot robot for ``run.duration_s`` seconds (one run, no episodes). The
    robot is built (its type and options checked) at once and connected when the server
    has answered."""
    from ditvla.deploy.lerobot_robot import LeRobotRobot

    robot = LeRobotRobot(robot_type, options, instruction=instruction)
    ticks = int((run.duration_s or LEROBOT_DEFAULT_DURATION_S) * config.hz)

    def one_run(controller: Controller) -> list[dict]:
        controller.run_episode(0, ticks)
        return []

    return run_session(
        channel,
        f"lerobot:{robot_type}",
        lambda spec: robot.connect(),
        one_run,
        config=config,
        out=out,
    )


def run_sim(
    channel: ClientChannel,
    sim: str,
    *,
    config: ControllerConfig,
    run: RunConfig | None = None,
    out: Path | None = None,
    install_signals: bool = True,
) -> ControlSummary:
    """Drive a simulated robot for ``run.episodes`` episodes (or ``run.duration_s``
    seconds, starting new episodes as they end)."""
    from ditvla.deploy.sim_robot import sim_robot_for

    run = run or RunConfig()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    robot_for = partial(
        sim_robot_for,
        sim,
        served_at=channel.address,
        camera_hz=run.camera_hz,
        max_episode_steps=run.max_steps,
    )
    return run_session(
        channel,
        f"sim:{sim}",
        robot_for,
        partial(_sim_episodes, run=run, sim=sim),
        config=config,
        out=out,
        install_signals=install_signals,
    )


def _sim_episodes(controller: Controller, *, run: RunConfig, sim: str) -> list[dict]:
    """Episodes of the simulated robot (``controller.robot``), each from its seed, until
    ``run.episodes`` or ``run.duration_s`` is done; each one's result."""
    robot, clock, hz = controller.robot, controller.clock, controller.config.hz
    end = clock.now() + run.duration_s if run.duration_s else np.inf
    total = int(run.duration_s * hz) if run.duration_s else None
    results = []
    with tqdm(total=total, unit="tick", desc=f"robot {sim}", file=sys.stderr) as bar:
        while not controller.stopped and clock.now() < end:
            episode = len(results)
            if not run.duration_s and episode >= run.episodes:
                break
            ticks_left = int((end - clock.now()) * hz) if run.duration_s else run.max_steps
            ticks = controller.run_episode(
                episode,
                min(run.max_steps, ticks_left),
                done=lambda: robot.success or robot.truncated or clock.now() >= end,
                progress=bar,
                reset=partial(robot.reset, run.seed_start + episode),
            )
            success = bool(robot.success)
            results.append(
                {
                    "episode": episode,
                    "seed": run.seed_start + episode,
                    "success": success,
                    "steps": ticks,
                }
            )
    return results

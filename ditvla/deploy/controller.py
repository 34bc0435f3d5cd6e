"""The robot controller process, ``ditvla robot``: a fixed-rate control loop.

The loop runs under SCHED_FIFO where the OS permits (see :func:`use_realtime_priority`).
Each tick: wait for the tick's deadline (sleep, then spin the last 0.5 ms, or 2 ms without
real-time priority, when a woken process may wait for a busy core), take in the chunks that arrived,
execute the action due at this tick — or hold the robot when none is due, when the
newest chunk is older than the watchdog allows, or when the action is not finite — then
send the tick's observation (state every tick, camera frames when the cameras have new
ones).

Per tick it records the start jitter, the work time and what was executed; per chunk
the observation-to-action latency. A live line shows control rate, p99 jitter, latency,
deadline misses and the server's System 1 / System 2 rates; the rows are saved as CSV
and a summary as JSON. SIGINT / SIGTERM end the loop cleanly with the robot held.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ditvla.deploy.errors import ServerUnavailable
from ditvla.deploy.messages import Message
from ditvla.deploy.robots import Robot
from ditvla.deploy.schedule import ActionSchedule, MergeRule, safe_actions
from ditvla.deploy.transport import Channel
from ditvla.envs.registry import parse_env
from ditvla.envs.schema import EVAL_SEED_START

SPIN_S = 0.002  # without real-time priority a woken process may wait for a busy core
REALTIME_SPIN_S = 0.0005


@dataclass
class ControllerConfig:
    """How ``ditvla robot`` runs its control loop.

    Args:
        hz: control rate (ticks per second).
        merge: how overlapping chunks merge: latest, ensemble (ACT's temporal ensembling)
            or rtc (real-time chunking: the server inpaints; executed as latest).
        ensemble_decay: ensemble: weight exp(-decay * i) of the i-th oldest chunk.
        watchdog_s: hold the robot when the newest chunk arrived longer ago than this.
        action_low / action_high: clip every action to these bounds.
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


REALTIME_PRIORITY = 50


def use_realtime_priority() -> bool:
    """Put this process under SCHED_FIFO (as robot control loops run); False if not allowed.

    On a loaded machine a normal-priority process that wakes for its tick can wait for a
    core for several milliseconds; a real-time one preempts the others at once. Needs root
    or CAP_SYS_NICE (or an rtprio limit in /etc/security/limits.conf)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
        return True
    except (PermissionError, AttributeError, OSError):
        return False


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
    rejected_messages: int = 0
    episodes: list[dict] = field(default_factory=list)


def handshake(channel: Channel, robot_name: str, hz: float, timeout_s: float = 120.0) -> Message:
    """Say hello until the server answers with the policy's spec."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        channel.send(Message("hello", {"robot": robot_name, "control_hz": hz}))
        reply = channel.receive(timeout_ms=500)
        if reply is not None and reply.type == "spec":
            return reply
    raise ServerUnavailable(
        f"no policy server answered at {channel.address} within {timeout_s:.0f} s "
        "(start one with `ditvla serve --policy DIR`; same --key-file on both sides)"
    )


class Controller:
    def __init__(self, channel: Channel, robot: Robot, config: ControllerConfig):
        self.channel, self.robot, self.config = channel, robot, config
        self.period = 1.0 / config.hz
        self.schedule = ActionSchedule(
            "latest" if config.merge == "rtc" else config.merge, config.ensemble_decay
        )
        self.records: list[TickRecord] = []
        self.missed = 0
        self.tick = 0
        self._stop = False
        self.spin_s = SPIN_S

    def stop(self, *_: object) -> None:
        self._stop = True

    def prepare_clock(self) -> None:
        """Real-time priority for this process if configured and permitted."""
        if self.config.realtime and use_realtime_priority():
            self.spin_s = REALTIME_SPIN_S
        elif self.config.realtime:
            print(
                "note: real-time priority not permitted (needs root, CAP_SYS_NICE or an rtprio "
                "limit); tick jitter will be higher on a loaded machine",
                file=sys.stderr,
            )

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)

    def run_episode(
        self, episode: int, max_ticks: int, *, done=lambda: False, progress: tqdm | None = None
    ) -> int:
        """Run the loop for one episode; returns the ticks it ran."""
        self.schedule.clear()
        self.channel.send(Message("reset", {"episode": episode}))
        last_chunk_at = -np.inf
        s1 = s2 = None
        start = time.monotonic()
        first_tick = self.tick
        for n in range(max_ticks):
            if self._stop:
                break
            deadline = start + n * self.period
            while (remaining := deadline - time.monotonic()) > self.spin_s:
                time.sleep(remaining - self.spin_s)
            while time.monotonic() < deadline:
                pass
            began = time.monotonic()
            latency = None
            for message in self.channel.receive_all():
                if message.type != "actions" or message.meta["episode"] != episode:
                    continue
                self.schedule.add(message.meta["start_tick"], message.arrays["actions"])
                latency = (began - message.meta["obs_time"]) * 1e3
                last_chunk_at = began
                s1, s2 = message.meta.get("system1_hz"), message.meta.get("system2_hz")
            self.schedule.prune(self.tick)
            action = self.schedule.action_at(self.tick)
            if action is None:
                executed = "hold"
            elif began - last_chunk_at > self.config.watchdog_s:
                executed = "watchdog"
            elif (
                action := safe_actions(action, self.config.action_low, self.config.action_high)
            ) is None:
                executed = "nan"
            else:
                executed = "action"
            if executed == "action":
                self.robot.send_action(action)
            else:
                self.robot.hold()
            state, frames = self.robot.observe()
            arrays = {"state": np.asarray(state, np.float32)}
            for cam, frame in (frames or {}).items():
                arrays[f"image.{cam}"] = frame
            meta = {"tick": self.tick, "time": began, "episode": episode}
            if frames:
                meta["instruction"] = self.robot.instruction
            self.channel.send(Message("observation", meta, arrays))
            finished = time.monotonic()
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
                )
            )
            self.tick += 1
            if progress is not None:
                progress.update(1)
                if n % 25 == 0:
                    progress.set_postfix_str(self.live_line(), refresh=False)
            if done():
                break
        self.robot.hold()
        return self.tick - first_tick

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
            rejected_messages=self.channel.rejected,
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
        seed_start: --sim: the first episode's seed (then +1 per episode).
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


def run_lerobot(
    channel: Channel,
    robot_type: str,
    options: dict[str, str],
    instruction: str,
    *,
    config: ControllerConfig,
    run: RunConfig,
    out: Path | None = None,
) -> ControlSummary:
    """Drive a LeRobot robot for ``run.duration_s`` seconds (one run, no episodes)."""
    from ditvla.deploy.robots import LeRobotRobot

    robot = LeRobotRobot(robot_type, options, instruction=instruction)
    try:
        handshake(channel, f"lerobot:{robot_type}", config.hz)
        controller = Controller(channel, robot, config)
        controller.install_signal_handlers()
        controller.prepare_clock()
        duration = run.duration_s or LEROBOT_DEFAULT_DURATION_S
        controller.run_episode(0, int(duration * config.hz))
    finally:
        robot.close()
    summary = controller.summary([])
    if out is not None:
        controller.write(out, summary)
    return summary


def run_sim(
    channel: Channel,
    sim: str,
    *,
    config: ControllerConfig,
    run: RunConfig | None = None,
    out: Path | None = None,
    install_signals: bool = True,
) -> ControlSummary:
    """Drive a simulated robot for ``run.episodes`` episodes (or ``run.duration_s``
    seconds, starting new episodes as they end)."""
    from ditvla.deploy.robots import SimRobot

    run = run or RunConfig()
    episodes, seed_start, max_steps = run.episodes, run.seed_start, run.max_steps
    duration_s, camera_hz = run.duration_s, run.camera_hz

    sys.setswitchinterval(0.0005)  # the control thread gets the GIL back from the cameras fast
    spec = handshake(channel, f"sim:{sim}", config.hz)
    state_keys = spec.meta.get("state_keys", ["state"]) if spec.meta["state_dim"] else None
    try:
        parse_env(sim)[0].env_class.check_state_keys(state_keys or ())
    except ValueError as exc:
        raise ValueError(
            f"the policy served at {channel.address} reads state {' + '.join(state_keys)}: {exc}"
        ) from None
    robot = SimRobot(
        sim,
        cameras=spec.meta["cameras"],
        image_size=spec.meta["image_size"],
        camera_hz=camera_hz,
        max_episode_steps=max_steps,
        state_keys=state_keys,
    )
    state_dim = robot.env.observation_space["state"].shape[0]
    if spec.meta["state_dim"] not in (0, state_dim):
        raise ValueError(
            f"the policy reads a {spec.meta['state_dim']}-D state, {sim} gives {state_dim}"
        )
    controller = Controller(channel, robot, config)
    if install_signals:
        controller.install_signal_handlers()
    controller.prepare_clock()
    results = []
    end = time.monotonic() + duration_s if duration_s else np.inf
    total = int(duration_s * config.hz) if duration_s else None
    try:
        with tqdm(total=total, unit="tick", desc=f"robot {sim}", file=sys.stderr) as bar:
            episode = 0
            while not controller._stop and time.monotonic() < end:
                if not duration_s and episode >= episodes:
                    break
                robot.reset(seed_start + episode)
                ticks_left = int((end - time.monotonic()) * config.hz) if duration_s else max_steps
                ticks = controller.run_episode(
                    episode,
                    min(max_steps, ticks_left),
                    done=lambda: robot.success or robot.truncated,
                    progress=bar,
                )
                results.append(
                    {
                        "episode": episode,
                        "seed": seed_start + episode,
                        "success": bool(robot.success),
                        "steps": ticks,
                    }
                )
                episode += 1
    finally:
        robot.hold()
        robot.close()
    summary = controller.summary(results)
    if out is not None:
        controller.write(out, summary)
    return summary

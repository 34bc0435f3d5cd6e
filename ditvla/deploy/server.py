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
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditvla.contract import HeadDType, load_policy
from ditvla.deploy.action_limits import merged_limits, widened_range
from ditvla.deploy.keys import ServerKeys
from ditvla.deploy.messages import Message, observation_bytes
from ditvla.deploy.schedule import (
    MERGE_RULES,
    ActionSchedule,
    MergeRule,
    rtc_weights,
    safe_actions,
)
from ditvla.deploy.transport import DEFAULT_ADDRESS, PairChannel, ServerChannel
from ditvla.devices import device_named
from ditvla.errors import ConfigError

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
        system1_hz: chunks per second (0: two per n_action_steps of control ticks).
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
    """

    policy: str
    address: str = DEFAULT_ADDRESS
    keys: ServerKeys | None = None
    merge: MergeRule = "latest"
    system1_hz: float = 0.0
    system2_hz: float = 0.0
    system1_threads: int = 1
    system2_threads: int = 1
    max_context_age_s: float = 1.0
    action_low: float | None = None
    action_high: float | None = None
    num_inference_steps: int | None = None
    head_dtype: HeadDType = "float32"
    device: str = "cpu"
    system2_device: str = ""

    def __post_init__(self) -> None:
        if self.merge not in MERGE_RULES:
            raise ConfigError(f"unknown merge rule {self.merge!r}; choose {', '.join(MERGE_RULES)}")
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
    system1_hz: float = 0.0
    system2_hz: float = 0.0
    act_ms: list[float] = field(default_factory=list)


def _rate(previous: float, interval: float) -> float:
    """Exponential moving average of a rate from one interval (seconds)."""
    current = 1.0 / max(interval, 1e-6)
    return current if previous == 0 else 0.8 * previous + 0.2 * current


# ---------------------------------------------------------------------- System 2
def _system2_main(
    policy_dir: str, address: str, session: str, threads: int, hz: float, device: str
) -> None:
    """System 2 process: observations with images in, context tokens out."""
    os.nice(SYSTEM2_NICE - SYSTEM1_NICE)  # the server's niceness is inherited
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops us
    policy = load_policy(policy_dir, device=device)
    cameras = policy.spec.cameras
    size = (policy.spec.image_size, policy.spec.image_size, 3)
    with PairChannel(address, bind=False, accepts_from=("controller",)) as channel:
        channel.codec.start_session(session)
        # warm-up: the first context (tick -1) tells the server that System 2 is ready
        warmup = Message(
            "observation",
            {"tick": -1, "time": 0.0, "episode": -1, "instruction": ""},
            {f"image.{cam}": np.zeros(size, np.uint8) for cam in cameras},
        )
        pending: Message | None = warmup
        last = 0.0
        while True:
            message, pending = pending or channel.receive(timeout_ms=1000), None
            if message is None:
                if os.getppid() == 1:  # the server died
                    return
                continue
            if hz > 0:
                time.sleep(max(0.0, last + 1.0 / hz - time.monotonic()))
            last = time.monotonic()
            observation = {
                "images": {cam: message.arrays[f"image.{cam}"] for cam in cameras},
                "instruction": message.meta.get("instruction", ""),
            }
            with torch.inference_mode():
                context = policy.encode(observation)
            channel.send(
                Message(
                    "context",
                    {"tick": message.meta["tick"], "episode": message.meta["episode"]},
                    {
                        "tokens": context.tokens.float().cpu().numpy(),
                        "mask": context.mask.cpu().numpy().astype(np.uint8),
                    },
                )
            )


class System2:
    """The System 2 process and its private channel: a PAIR socket (one peer) on an ipc
    path in a folder only this user can open (mode 0700), one session per process."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self._folder = tempfile.mkdtemp(prefix="ditvla-s2-")
        self._address = f"ipc://{self._folder}/context"
        self.channel = self._channel()
        self._process: mp.process.BaseProcess | None = None
        self.busy_since: float | None = None
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
        self.busy_since = None
        self.restarts += 1

    def _channel(self) -> PairChannel:
        channel = PairChannel(self._address, bind=True, accepts_from=("system2",))
        channel.codec.start_session(secrets.token_hex(8))
        return channel

    def healthy(self) -> bool:
        if not self._process.is_alive():
            return False
        return self.busy_since is None or time.monotonic() - self.busy_since < SYSTEM2_TIMEOUT_S

    def submit(self, observation: Message) -> None:
        if self.channel.send(observation):
            self.busy_since = time.monotonic()

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
        self.channel.close()
        for path in Path(self._folder).glob("*"):
            path.unlink(missing_ok=True)
        os.rmdir(self._folder)


# ---------------------------------------------------------------------- the server
class PolicyServer:
    def __init__(self, config: ServeConfig):
        self.config = config
        os.nice(SYSTEM1_NICE)
        torch.set_num_threads(config.system1_threads)
        self.policy = load_policy(config.policy, config.device, head_dtype=config.head_dtype)
        self.spec = self.policy.spec
        self.stats = ServerStats()
        # ZeroMQ cuts off a peer whose frame outgrows the policy's largest observation
        largest = observation_bytes(
            len(self.spec.cameras), self.spec.image_size, self.spec.state_dim
        )
        self.channel = ServerChannel(config.address, keys=config.keys, max_frame_bytes=largest)
        self.system2 = System2(config)
        self._stop = False
        self._sent = ActionSchedule("latest")
        self._reset_episode(0)
        self.control_hz = 50.0

    def _reset_episode(self, episode: int) -> None:
        self.episode = episode
        self.context = None  # (Context, tick)
        # tick, controller time of the observation, received at, state
        self.state: tuple[int, float, float, np.ndarray] | None = None
        self.frames: Message | None = None  # newest observation with images, not yet encoded
        self.last_chunk_at = 0.0
        self.next_act_at = 0.0
        self._sent.clear()

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

    def _handle(self, peer: bytes, message: Message) -> None:
        if message.type == "hello":
            if self.system2.ready:  # else the controller asks again
                self.control_hz = float(message.meta["control_hz"])
                self.channel.accept(peer, secrets.token_hex(8))  # a new session
                self._reset_episode(0)
                self.channel.send(self._spec(message))
        elif message.type == "reset":
            self._reset_episode(message.meta["episode"])
        elif message.type == "observation":
            if message.meta["episode"] != self.episode:
                self._reset_episode(message.meta["episode"])
            if not self._observation_fits(message):  # never reaches System 2
                self.stats.bad_observations += 1
                return
            meta = message.meta
            self.state = (meta["tick"], meta["time"], time.monotonic(), message.arrays["state"])
            cameras = self.spec.cameras
            if all(f"image.{cam}" in message.arrays for cam in cameras):
                self.frames = message

    def _pump_system2(self) -> None:
        for message in self.system2.channel.receive_all():
            if message.meta["tick"] == -1:  # warm-up done
                self.system2.ready = True
            elif message.meta["episode"] == self.episode:
                tokens = torch.from_numpy(message.arrays["tokens"].copy())
                mask = torch.from_numpy(message.arrays["mask"].copy())
                with torch.inference_mode():
                    context = self.policy.context_from(tokens, mask)
                if self.context is not None:
                    self.stats.system2_hz = _rate(
                        self.stats.system2_hz, time.monotonic() - self._context_at
                    )
                self.context, self._context_at = (context, message.meta["tick"]), time.monotonic()
                self.stats.contexts += 1
            self.system2.busy_since = None
        if not self.system2.healthy():
            self.system2.start()
            self.stats.system2_restarts = self.system2.restarts
        if self.frames is not None and self.system2.busy_since is None:
            self.system2.submit(self.frames)
            self.frames = None

    # -------------------------------------------------------------- System 1
    def _system1_interval(self) -> float:
        if self.config.system1_hz > 0:
            return 1.0 / self.config.system1_hz
        return self.spec.n_action_steps / self.control_hz / 2

    def _act(self) -> None:
        context, context_tick = self.context
        tick, obs_time, received_at, state = self.state
        started = time.monotonic()
        self.next_act_at = started + self._system1_interval()
        context_age_s = (tick - context_tick) / self.control_hz
        state_age_s = started - received_at  # the robot stopped sending: no chunks for it
        if max(context_age_s, state_age_s) > self.config.max_context_age_s:
            self.stats.stale_skips += 1
            return
        horizon = self.spec.horizon
        inpaint = None
        if self.config.merge == "rtc":
            planned = self._sent.planned(tick, horizon)
            if planned is not None:
                mean_act_s = np.mean(self.stats.act_ms[-20:]) / 1e3 if self.stats.act_ms else 0.1
                delay = math.ceil((started - received_at + mean_act_s) * self.control_hz)
                inpaint = (planned[0], rtc_weights(horizon, delay, planned[1]))
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
        if self.last_chunk_at:
            self.stats.system1_hz = _rate(self.stats.system1_hz, now - self.last_chunk_at)
        self.last_chunk_at = now
        self._sent.add(tick, chunk)
        self._sent.prune(tick)
        self.stats.chunks += 1
        self.channel.send(
            Message(
                "actions",
                {
                    "start_tick": tick,
                    "obs_time": obs_time,
                    "context_tick": context_tick,
                    "episode": self.episode,
                    "system1_hz": round(self.stats.system1_hz, 3),
                    "system2_hz": round(self.stats.system2_hz, 3),
                    "chunk": self.stats.chunks,
                },
                {"actions": chunk},
            )
        )

    def serve(self, duration_s: float | None = None, on_status=None) -> ServerStats:
        """Run until :meth:`stop` (SIGINT/SIGTERM in the CLI) or ``duration_s``."""
        end = time.monotonic() + duration_s if duration_s else math.inf
        next_status = time.monotonic() + 1.0
        try:
            while not self._stop and time.monotonic() < end:
                wait_ms = 2
                if self.state is not None and self.context is not None:
                    wait_ms = max(0, min(wait_ms, (self.next_act_at - time.monotonic()) * 1e3))
                received = self.channel.receive(timeout_ms=wait_ms)
                for _ in range(MAX_MESSAGES_PER_TICK):  # a flood cannot hold System 1
                    if received is None:
                        break
                    self._handle(*received)
                    received = self.channel.receive(0)
                self._pump_system2()
                due = self.next_act_at <= time.monotonic()
                if self.state is not None and self.context is not None and due:
                    self._act()
                self.stats.rejected_messages = self.channel.rejected_total
                self.stats.dropped_sends = self.channel.dropped_sends
                if on_status is not None and time.monotonic() >= next_status:
                    on_status(self.stats, self.channel.last_error)
                    next_status = time.monotonic() + 1.0
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        self.system2.close()
        self.channel.close()

"""The rollout evaluator: ``ditvla eval``.

Episodes run in parallel worker processes, one simulator each, stepped in lockstep; the
policy runs in this process and is called once per step for all the episodes that need a
new action chunk (a batch). Cameras are rendered only for the steps whose observation the
policy will read (one in ``n_action_steps``), and for recorded videos.

Episodes are fixed by (task, seed): seeds ``seed_start .. seed_start + episodes - 1`` for
each task (100000 up by default, apart from the demonstration seeds), so two runs of one
policy see the same episodes. A diffusion policy's initial noise is fixed the same way:
each episode draws its chunks' noise from its own generator, seeded with the episode's
seed (for policies whose spec has a ``noise_shape``). Two runs of one policy then give the same
rollouts whatever the worker count, and two policies (a float one and its quantized
copy) are compared on the same noise as well as the same episodes.

Faults stay local: a policy output with NaN or the wrong shape, or an error raised by the
simulator, fails that episode with the reason recorded; a worker process that dies is
replaced and its episode retried once (then marked failed); results are appended to
``episodes.jsonl`` as they come.

Why not gymnasium's vector envs: they batch observations into fixed spaces (our
observations carry images only on the steps that need them), reset every sub-env to one
task set at construction, and lose the whole vector when one worker dies.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ditvla.contract import ChunkPolicy
from ditvla.envs.registry import SUITES, parse_env
from ditvla.envs.schema import EVAL_SEED_START

Probe = Literal["none", "blank_images", "shuffled_instructions"]
WORKER_TIMEOUT_S = 120.0
VIDEO_SIZE_PX = 64  # rollout videos of policies that read no camera


@dataclass(frozen=True)
class EvalConfig:
    """How many episodes of which seeds ``ditvla eval`` runs, and what it writes.

    Args:
        episodes_per_task: episodes per task, on seeds seed_start, seed_start + 1, ...
        workers: simulator processes stepped in lockstep.
        seed_start: first episode seed (evaluation seeds start apart from the
            demonstration seeds 0, 1, ...).
        max_steps: episode step limit (default: the task's own).
        videos_per_task: mp4 rollouts recorded per task (with out).
        out: folder for results.json, results.md, episodes.jsonl and videos/ (None: none).
        probe: none, or what to take from the policy to see whether it uses it:
            blank_images (every camera frame black), shuffled_instructions (each episode
            gets the instruction of another of the evaluated tasks, fixed by its seed).
        progress: show a progress bar.
    """

    episodes_per_task: int = 50
    workers: int = 2
    seed_start: int = EVAL_SEED_START
    max_steps: int | None = None
    videos_per_task: int = 1
    out: str | None = None
    probe: Probe = "none"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.episodes_per_task < 1 or self.workers < 1:
            raise ValueError(
                f"episodes_per_task and workers must be >= 1, got {self.episodes_per_task} "
                f"and {self.workers}"
            )


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int
    error: str | None = None


@dataclass
class EvaluationReport:
    """Episodes, and what the policy read: ``observation`` = {"cameras", "state_keys",
    "privileged_state", "probe"} (every report says which state the policy read)."""

    episodes: list[EpisodeResult] = field(default_factory=list)
    seconds: float = 0.0
    observation: dict[str, Any] = field(default_factory=dict)

    def per_task(self) -> dict[str, dict[str, Any]]:
        tasks: dict[str, list[EpisodeResult]] = {}
        for e in self.episodes:
            tasks.setdefault(e.task, []).append(e)
        out = {}
        for task, eps in tasks.items():
            wins = sum(e.success for e in eps)
            lo, hi = wilson_interval(wins, len(eps))
            out[task] = {
                "success_rate": wins / len(eps),
                "episodes": len(eps),
                "ci95": [round(lo, 4), round(hi, 4)],
                "mean_length": float(np.mean([e.steps for e in eps])),
                "errors": sum(e.error is not None for e in eps),
            }
        return out

    def summary(self) -> dict[str, Any]:
        tasks = self.per_task()
        mean = float(np.mean([t["success_rate"] for t in tasks.values()])) if tasks else 0.0
        return {
            "tasks": tasks,
            "mean_success": mean,
            "observation": self.observation,
            "seconds": round(self.seconds, 1),
        }

    def markdown(self) -> str:
        rows = [
            "| task | success | 95% interval | episodes | mean length |",
            "|---|---|---|---|---|",
        ]
        for task, t in self.per_task().items():
            rows.append(
                f"| {task} | {t['success_rate']:.0%} | {t['ci95'][0]:.0%}-{t['ci95'][1]:.0%} | "
                f"{t['episodes']} | {t['mean_length']:.0f} |"
            )
        rows.append(f"| **mean** | **{self.summary()['mean_success']:.1%}** | | | |")
        return "\n".join([*rows, "", f"The policy read: {describe_observation(self.observation)}."])


def describe_observation(observation: dict[str, Any]) -> str:
    """``cameras corner (64 px), state proprio (proprioception only), instruction``."""
    if not observation:
        return "unknown"
    cameras = ", ".join(observation["cameras"]) or "no camera"
    state = " + ".join(observation["state_keys"]) or "no state"
    kind = (
        "with privileged simulator state"
        if observation["privileged_state"]
        else ("proprioception only")
    )
    probe = observation.get("probe", "none")
    return f"cameras {cameras}, state {state} ({kind}), instruction" + (
        f"; probe: {probe.replace('_', ' ')}" if probe != "none" else ""
    )


# ---------------------------------------------------------------------- workers
class SimulatorError(RuntimeError):
    """The simulator raised during an episode (sent back by the worker, which lives on)."""


def _worker_main(
    conn,
    suite: str,
    cameras: tuple[str, ...],
    image_size: int,
    max_steps: int | None,
    with_expert: bool,
    state_keys: tuple[str, ...] | None,
) -> None:
    """One simulator process: answers reset/step/close commands over a pipe."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    envs: dict[str, Any] = {}
    env: Any = None

    def reply(obs: dict[str, Any], success: bool, truncated: bool) -> None:
        if with_expert and not (success or truncated):
            obs["expert_action"] = env.expert_action()
        conn.send((obs, success, truncated))

    try:
        while True:
            command, args = conn.recv()
            if command == "close":
                break
            try:
                if command == "reset":
                    task, seed, render = args
                    if task not in envs:
                        envs[task] = SUITES[suite].make(
                            task,
                            cameras=cameras,
                            image_size=image_size,
                            max_episode_steps=max_steps,
                            state_keys=state_keys,
                        )
                    env = envs[task]
                    obs, _ = env.reset(seed=seed, options={"skip_images": not render})
                    reply(obs, False, False)
                elif command == "step":
                    action, render = args
                    obs, _, success, truncated, _ = env.step(action, render=render)
                    reply(obs, success, truncated)
            except Exception as exc:  # the episode fails with the reason; the worker lives on
                conn.send(SimulatorError(f"{type(exc).__name__}: {exc}"))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        for e in envs.values():
            e.close()


class _Worker:
    def __init__(self, context, *args: Any):
        self._args = args
        self._context = context
        self.start()

    def start(self) -> None:
        self.conn, child = self._context.Pipe()
        self.process = self._context.Process(
            target=_worker_main, args=(child, *self._args), daemon=True
        )
        self.process.start()
        child.close()

    def restart(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.start()

    def request(self, command: str, *args: Any) -> None:
        self.conn.send((command, args))

    def response(self) -> tuple[dict, bool, bool]:
        if not self.conn.poll(WORKER_TIMEOUT_S):
            raise TimeoutError(f"simulator worker {self.process.pid} did not answer")
        answer = self.conn.recv()
        if isinstance(answer, SimulatorError):
            raise answer
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):  # BrokenPipeError is an OSError
            self.conn.send(("close", ()))
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


@dataclass
class _Slot:
    """An episode in flight on one worker."""

    worker: _Worker
    job: tuple[str, int] | None = None
    steps: int = 0
    queue: deque = field(default_factory=deque)
    obs: dict | None = None
    frames: list | None = None
    noise: torch.Generator | None = None  # the episode's own, for a policy's initial noise

    def clear(self) -> None:
        """Free the slot for the next episode."""
        self.job, self.frames, self.queue, self.noise = None, None, deque(), None


def _batch(
    observations: list[dict],
    jobs: list[tuple[str, int]],
    cameras: Sequence[str],
    probe: Probe,
    instructions: dict[str, str],
) -> dict[str, Any]:
    """The policy's batch; ``task`` and ``seed`` name each row's episode (for policies
    that keep per-episode history). ``probe`` blanks the frames or swaps each episode's
    instruction for another of ``instructions`` (by task), chosen by the episode's seed."""
    images = {cam: np.stack([o["images"][cam] for o in observations]) for cam in cameras}
    said = [o["instruction"] for o in observations]
    if probe == "blank_images":
        images = {cam: np.zeros_like(frames) for cam, frames in images.items()}
    elif probe == "shuffled_instructions":
        others = [sorted(set(instructions.values()) - {text}) for text in said]
        said = [
            choices[seed % len(choices)] if choices else text
            for choices, text, (_, seed) in zip(others, said, jobs, strict=True)
        ]
    batch = {
        "images": images,
        "state": np.stack([o["state"] for o in observations]),
        "instruction": said,
        "task": [task for task, _ in jobs],
        "seed": [seed for _, seed in jobs],
    }
    if "expert_action" in observations[0]:
        batch["expert_action"] = np.stack([o["expert_action"] for o in observations])
    return batch


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 30) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def evaluate(
    policy: ChunkPolicy, env_spec: str, config: EvalConfig | None = None, **settings: Any
) -> EvaluationReport:
    """Run every task of ``env_spec`` with ``policy``; ``settings`` are
    :class:`EvalConfig` fields set over ``config`` (e.g. ``episodes_per_task=20``)."""
    config = replace(config or EvalConfig(), **settings)
    suite, tasks = parse_env(env_spec)
    action_dim = suite.action_dim
    spec = policy.spec
    cameras, n_action_steps, noise_shape = spec.cameras, spec.n_action_steps, spec.noise_shape
    state_keys = tuple(spec.state_keys) if spec.state_dim else None
    if state_keys is not None:
        try:
            suite.env_class.check_state_keys(state_keys)
        except ValueError as exc:
            raise ValueError(f"the policy reads state {' + '.join(state_keys)}: {exc}") from None
    report = EvaluationReport(
        observation={
            "cameras": list(cameras),
            "state_keys": list(state_keys or ()),
            "privileged_state": spec.reads_expert_action
            or suite.env_class.reads_privileged_state(state_keys or ()),
            "probe": config.probe,
        }
    )
    instructions = {task: suite.instruction(task) for task in tasks}
    policy.reset()
    video_cameras = cameras or suite.default_cameras[:1]
    out = Path(config.out) if config.out is not None else None
    record_videos = out is not None and config.videos_per_task > 0
    render_cameras = (
        cameras if not record_videos else tuple(dict.fromkeys((*cameras, *video_cameras)))
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "episodes.jsonl").write_text("")
    jobs = deque(
        (task, config.seed_start + i) for task in tasks for i in range(config.episodes_per_task)
    )
    videos_left = {task: config.videos_per_task if record_videos else 0 for task in tasks}
    context = mp.get_context("spawn")
    slots = [
        _Slot(
            _Worker(
                context,
                suite.name,
                render_cameras,
                spec.image_size or VIDEO_SIZE_PX,
                config.max_steps,
                spec.reads_expert_action,
                state_keys,
            )
        )
        for _ in range(min(config.workers, len(jobs)))
    ]
    tries: dict[tuple[str, int], int] = {}
    bar = tqdm(total=len(jobs), desc="eval", unit="ep", disable=not config.progress)
    start = time.perf_counter()

    def finish(slot: _Slot, success: bool, error: str | None = None) -> None:
        task, seed = slot.job
        result = EpisodeResult(task, seed, bool(success), slot.steps, error)
        report.episodes.append(result)
        if out is not None:
            with (out / "episodes.jsonl").open("a") as f:
                f.write(json.dumps(asdict(result)) + "\n")
            if slot.frames:
                name = task.replace("/", "_")  # LIBERO tasks are "suite/index"
                _write_video(out / "videos" / f"{name}_seed{seed}.mp4", slot.frames)
        slot.clear()
        wins = sum(e.success for e in report.episodes)
        bar.update()
        bar.set_postfix_str(f"success {wins}/{len(report.episodes)}")

    def crashed(slot: _Slot, exc: Exception) -> None:
        slot.worker.restart()
        if tries[slot.job] < 2:
            jobs.appendleft(slot.job)  # retried once, on the fresh worker
            slot.clear()
        else:
            finish(slot, False, f"simulator worker failed twice: {type(exc).__name__}: {exc}")

    def receive(slot: _Slot) -> tuple[dict, bool, bool] | None:
        """The worker's answer, or None when the episode ended (failed or queued again)."""
        try:
            return slot.worker.response()
        except SimulatorError as exc:
            finish(slot, False, f"simulator raised {exc}")
        except (EOFError, OSError, TimeoutError) as exc:
            crashed(slot, exc)
        return None

    try:
        while jobs or any(s.job for s in slots):
            # Start episodes on idle workers.
            started = []
            for slot in slots:
                if slot.job is None and jobs:
                    slot.job = jobs.popleft()
                    tries[slot.job] = tries.get(slot.job, 0) + 1
                    slot.steps, slot.queue = 0, deque()
                    if noise_shape is not None:
                        slot.noise = torch.Generator().manual_seed(slot.job[1])
                    task = slot.job[0]
                    slot.frames = [] if videos_left[task] > 0 else None
                    if slot.frames is not None:
                        videos_left[task] -= 1
                    try:
                        slot.worker.request("reset", slot.job[0], slot.job[1], True)
                        started.append(slot)
                    except (BrokenPipeError, OSError) as exc:
                        crashed(slot, exc)
            for slot in started:
                if (answer := receive(slot)) is None:
                    continue
                slot.obs = answer[0]
                if slot.frames is not None:
                    slot.frames.append(slot.obs["images"][video_cameras[0]])
            active = [s for s in slots if s.job is not None and s.obs is not None]
            # One batched policy call for the episodes that need a new chunk.
            needing = [s for s in active if not s.queue]
            if needing:
                observations = [s.obs for s in needing]
                if spec.state_dim and observations[0]["state"].shape != (spec.state_dim,):
                    raise ValueError(
                        f"the policy reads a {spec.state_dim}-D state ({' + '.join(state_keys)}), "
                        f"{suite.name} gives {observations[0]['state'].shape[0]}-D"
                    )
                batch = _batch(
                    observations, [s.job for s in needing], cameras, config.probe, instructions
                )
                options = {}  # the episodes' own initial noise, for a diffusion policy
                if noise_shape is not None:
                    rows = [torch.randn(noise_shape, generator=s.noise) for s in needing]
                    options["noise"] = torch.stack(rows)
                try:
                    with torch.inference_mode():
                        chunks = policy.predict_action_chunk(batch, **options)
                    chunks = torch.as_tensor(chunks).float().cpu().numpy()
                except Exception as exc:  # a policy bug fails these episodes, not the run
                    for s in needing:
                        finish(s, False, f"policy raised {type(exc).__name__}: {exc}")
                    continue
                for i, s in enumerate(needing):
                    chunk = chunks[i] if chunks.ndim == 3 and len(chunks) == len(needing) else None
                    if chunk is None or chunk.ndim != 2 or chunk.shape[1] != action_dim:
                        finish(
                            s,
                            False,
                            f"policy returned shape {chunks.shape}, expected "
                            f"({len(needing)}, H, {action_dim})",
                        )
                    elif not np.all(np.isfinite(chunk)):
                        finish(s, False, "policy returned NaN or infinite actions")
                    else:
                        s.queue.extend(chunk[:n_action_steps])
            stepping = [s for s in slots if s.job is not None and s.queue]
            for s in stepping:
                action = s.queue.popleft()
                render = not s.queue or s.frames is not None
                try:
                    s.worker.request("step", action, render)
                except (BrokenPipeError, OSError) as exc:
                    crashed(s, exc)
            for s in stepping:
                if s.job is None or (answer := receive(s)) is None:
                    continue
                s.obs, success, truncated = answer
                s.steps += 1
                if s.frames is not None:
                    s.frames.append(s.obs["images"][video_cameras[0]])
                if success or truncated:
                    finish(s, success)
    finally:
        bar.close()
        for slot in slots:
            slot.worker.close()
    report.seconds = time.perf_counter() - start
    if out is not None:
        (out / "results.json").write_text(json.dumps(report.summary(), indent=2) + "\n")
        (out / "results.md").write_text(report.markdown() + "\n")
    return report

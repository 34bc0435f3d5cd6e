"""Scripted demonstrations into a zarr replay buffer: ``ditvla collect``.

Each task's episodes use seeds ``seed_start, seed_start + 1, ...``; the seed of every
stored episode is recorded in the store, so any episode can be replayed. By default only
successful episodes are kept, and failed seeds are replaced by the next ones (at most
twice as many attempts as episodes asked for).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.store_layout import padded_to_widths
from ditvla.envs.perturbations import RECEIVED_AXES, SCENE_AXES, Perturbation
from ditvla.envs.registry import SUITES, parse_env
from ditvla.errors import ConfigError


@dataclass
class CollectionReport:
    """What a collection run did, per task: episodes kept and attempts made."""

    kept: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    frames: int = 0

    def success_rate(self, task: str) -> float:
        return self.kept[task] / max(self.attempts[task], 1)


def recorded_state_keys(env: Any) -> tuple[str, ...]:
    """The state parts a store records, each as its own array: proprioception, the
    privileged parts, then the other parts the environment records."""
    return (*env.proprio_keys, *env.privileged_keys, *env.recorded_keys)


def detour(seed: int, max_steps: int) -> tuple[int, np.ndarray]:
    """The detour of episode ``seed``: its length (uniform in 0..max_steps) and the
    end-effector translation it pushes: a random unit direction (3,) for the first three
    action dimensions, which every suite's action space gives to translation."""
    rng = np.random.default_rng([seed, 0xDE7])
    direction = rng.normal(size=3)
    return int(rng.integers(0, max_steps + 1)), (direction / np.linalg.norm(direction))


PUSH_STEPS = (2, 6)  # a push during the episode lasts this many steps (uniform, inclusive)


@dataclass(frozen=True)
class EpisodeOptions:
    """How an expert episode is run and driven off its path (the expert's own action
    recorded at every frame, so that the store shows how to get back): what
    :class:`CollectConfig`'s ``detour_steps``, ``push_rate`` and ``multimodal`` say."""

    detour_steps: int
    push_rate: float
    multimodal: bool

    def __post_init__(self) -> None:
        if self.detour_steps < 0:
            raise ConfigError(f"detour_steps must be >= 0, got {self.detour_steps}")
        if not 0.0 <= self.push_rate < 1.0:
            raise ConfigError(f"push_rate must be in [0, 1), got {self.push_rate}")


class _Pushes:
    """The pushes of one episode: the detour at its start, then, at each step no push is
    under way, with chance ``push_rate``, a push of :data:`PUSH_STEPS` steps in a random
    direction (drawn from the episode's seed, so an episode is the same for any number of
    workers)."""

    def __init__(self, seed: int, options: EpisodeOptions):
        self.rate = options.push_rate
        self.left, self.direction = detour(seed, options.detour_steps)
        self.rng = np.random.default_rng([seed, 0x9054])

    def executed(self, action: np.ndarray) -> np.ndarray:
        """What the hand does when the expert asks for ``action``: the action, or a push
        for the translation with the expert's gripper (and turn)."""
        if self.rate and self.left == 0 and self.rng.random() < self.rate:
            self.left = int(self.rng.integers(PUSH_STEPS[0], PUSH_STEPS[1] + 1))
            direction = self.rng.normal(size=3)
            self.direction = direction / np.linalg.norm(direction)
        if self.left == 0:
            return action
        self.left -= 1
        return np.concatenate([self.direction, np.asarray(action)[3:]]).astype(np.float32)


def run_expert_episode(
    env: Any, seed: int, options: EpisodeOptions
) -> tuple[dict[str, np.ndarray], bool]:
    """One episode of the scripted expert from ``seed``: (arrays by data key, success).

    ``options.detour_steps``: the episode first drifts for up to that many steps in a
    random direction (:func:`detour`) while the expert's own action is recorded at every
    frame, then the expert takes over from wherever the hand is: the recorded actions
    recover (as in DART's noise injection), and the hand's path no longer gives away the
    goal. ``options.push_rate``: pushes of the same kind during the episode (near the
    object, a grasp pushed off its mark), each recovered from by the expert.
    ``options.multimodal``: the expert takes the way of doing the task that the seed
    chooses (``env.vary_expert``), and that is what is recorded.
    """
    obs, _ = env.reset(seed=seed)
    if options.multimodal:
        env.vary_expert(seed)
    frames: dict[str, list[np.ndarray]] = {cam: [] for cam in env.cameras}
    parts: dict[str, list[np.ndarray]] = {key: [] for key in recorded_state_keys(env)}
    actions = []
    success = False
    pushes = _Pushes(seed, options)
    while True:
        action = env.expert_action()
        for cam in env.cameras:
            frames[cam].append(obs["images"][cam])
        state = env.state_parts()
        for key, values in parts.items():
            values.append(state[key])
        actions.append(action)
        obs, _, success, truncated, _ = env.step(pushes.executed(action))
        if success or truncated:
            break
    episode = {cam: np.stack(f) for cam, f in frames.items()}
    episode.update({key: np.stack(values) for key, values in parts.items()})
    episode["action"] = np.stack(actions)
    return episode, success


# Each worker process keeps the simulator of the task it is collecting (building one
# takes seconds); tasks are collected one after another, so the one before is closed when
# the next begins (a LIBERO scene holds about a gigabyte: kept for every task, seven of
# LIBERO-Object's grew each worker to 7.9 GB).
_worker_envs: dict[tuple, Any] = {}


def _expert_episode_in_worker(
    suite_name: str,
    task: str,
    cameras: tuple[str, ...],
    image_size: int,
    options: EpisodeOptions,
    randomize: str,
    seed: int,
) -> tuple[dict[str, np.ndarray], bool]:
    key = (suite_name, task, cameras, image_size, randomize)
    if key not in _worker_envs:
        while _worker_envs:
            _worker_envs.popitem()[1].close()
        env = SUITES[suite_name].make(task, cameras=cameras, image_size=image_size)
        env.perturb(Perturbation.parse(randomize))
        _worker_envs[key] = env
    return run_expert_episode(_worker_envs[key], seed, options)


def _run_here(env: Any, options: EpisodeOptions, seed: int) -> Future:
    """One episode in this process, as a finished future (the serial path)."""
    future: Future = Future()
    future.set_result(run_expert_episode(env, seed, options))
    return future


@dataclass(frozen=True)
class CollectConfig:
    """What ``ditvla collect`` records.

    Args:
        episodes_per_task: successful episodes to keep per task.
        cameras: camera names to record, comma-separated; empty for none (default: the
            suite's: metaworld corner, robosuite agentview + robot0_eye_in_hand).
        image_size: square camera side in pixels.
        seed_start: first episode seed (each task uses seed_start, seed_start + 1, ...).
        workers: simulator processes; the store is the same for any number.
        keep_failures: keep failed episodes too.
        detour_steps: each episode first drifts in a random direction for up to this many
            steps (the expert's actions recorded throughout), then the expert recovers:
            demonstrations in which the hand's path does not give the goal away, so that
            a policy has to read it from the camera and the instruction. 0: none.
        push_rate: in [0, 1): at each step no push is under way, the chance that the hand
            is pushed off the expert's path for 2-6 steps in a random direction (the
            expert's actions recorded throughout; DART-style noise injection in mid-task),
            so that the store shows the expert bringing the hand back: to a grasp pushed
            off its mark, to an object missed and grasped again. 0: none.
        multimodal: each episode's expert takes one of several ways of doing its task,
            chosen by the episode's seed (metaworld: reach-wall goes around the wall's
            left or right end; other tasks approach from the left or the right), so that
            one observation has several valid action chunks.
        overwrite: replace an existing store.
        resume: finish an interrupted collection into the same store: the episodes it
            holds are kept and each task goes on from the seed after its last one (the
            store must be of the same suite, tasks, cameras, image size and options).
        randomize: domain randomisation, AXIS=LEVEL[,AXIS=LEVEL...] of camera,
            lighting, table, background, layout and robot (the scene axes of ditvla
            eval --perturb), drawn anew for every episode from its seed, so that a
            policy meets more than one camera pose, light, colour and placement in
            training.
        progress: show a progress bar.
    """

    episodes_per_task: int = 50
    cameras: tuple[str, ...] | None = None
    image_size: int = 64
    seed_start: int = 0
    workers: int = 2
    keep_failures: bool = False
    detour_steps: int = 0
    push_rate: float = 0.0
    multimodal: bool = False
    overwrite: bool = False
    resume: bool = False
    randomize: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        received = [a for a, _ in Perturbation.parse(self.randomize).levels if a in RECEIVED_AXES]
        if received:
            raise ConfigError(
                f"randomize: {', '.join(received)} perturb what a policy receives, not the "
                f"scene; the collection randomises {', '.join(SCENE_AXES)} (augment at "
                "training time instead)"
            )
        if self.episodes_per_task < 1:
            raise ConfigError(f"episodes_per_task must be >= 1, got {self.episodes_per_task}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        _ = self.episode_options  # which checks detour_steps and push_rate
        if self.resume and self.overwrite:
            raise ConfigError("resume keeps a store's episodes, overwrite replaces them: pick one")

    @property
    def episode_options(self) -> EpisodeOptions:
        """How each expert episode is run and driven off its path."""
        return EpisodeOptions(self.detour_steps, self.push_rate, self.multimodal)


def collect_demonstrations(
    env_spec: str, out: str | Path, config: CollectConfig | None = None, **settings: Any
) -> CollectionReport:
    """Run the scripted experts of ``env_spec`` and append their episodes to ``out``;
    ``settings`` are :class:`CollectConfig` fields set over ``config``.

    Episodes run in ``workers`` simulator processes and are written in seed order, so
    the store is the same for any number of workers.
    """
    config = replace(config or CollectConfig(), **settings)
    suite, tasks = parse_env(env_spec)
    cameras = suite.default_cameras if config.cameras is None else tuple(config.cameras)
    report = CollectionReport()
    buffer: ReplayBuffer | None = None
    if config.resume and Path(out).exists():
        buffer = _resumed_store(out, _source(env_spec, suite, config), cameras, config)
    bar = tqdm(
        total=config.episodes_per_task * len(tasks),
        desc="collect",
        unit="ep",
        disable=not config.progress,
    )
    widths = _privileged_widths(suite, tasks)
    workers = config.workers
    spawn = mp.get_context("spawn")
    pool = (
        ProcessPoolExecutor(workers, mp_context=spawn, initializer=end_with_parent)
        if workers > 1
        else None
    )
    try:
        for task in tasks:
            env = suite.make(task, cameras=cameras, image_size=config.image_size)
            env.perturb(Perturbation.parse(config.randomize))
            try:
                _check_expert(env, config)
                if buffer is None:
                    buffer = _create_store(out, env_spec, suite, env, cameras, config)
                submit = _episode_submitter(pool, env, suite.name, task, cameras, config)
                _collect_task(buffer, task, env.instruction, submit, widths, config, report, bar)
            finally:
                env.close()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    return report


def end_with_parent(poll_s: float = 1.0) -> None:
    """Make this process exit once the process that started it is gone: the initializer of
    the collection's simulator workers. A ProcessPoolExecutor worker waits on a queue whose
    pipe it holds both ends of, so it never sees its parent die: a collection killed by a
    signal left its workers running, a gigabyte or more each, until someone found them."""
    started_by = mp.parent_process()  # a pool's worker knows its parent's pid
    parent = started_by.pid if started_by is not None else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _privileged_widths(suite: Any, tasks: list[str]) -> dict[str, int]:
    """The privileged state parts whose width differs between ``tasks``, each with the
    widest task's width: their arrays are stored padded to it, with a mask (see
    :func:`~ditvla.datasets.store_layout.padded_to_widths`). Empty for one task, or when
    every task gives each part one width."""
    if len(tasks) < 2 or not suite.env_class.privileged_keys:
        return {}
    seen: dict[str, set[int]] = {}
    for task in tasks:
        env = suite.make(task, cameras=())
        try:
            for key in env.privileged_keys:
                seen.setdefault(key, set()).add(env.state_dims[key])
        finally:
            env.close()
    return {key: max(widths) for key, widths in seen.items() if len(widths) > 1}


def _check_expert(env: Any, config: CollectConfig) -> None:
    """Ask ``env`` for what collecting needs, so that a task without a scripted expert
    (or a suite without varied experts) fails before anything is written."""
    env.reset(seed=config.seed_start, options={"skip_images": True})
    env.expert_action()
    if config.multimodal:
        env.vary_expert(config.seed_start)


def _source(env_spec: str, suite: Any, config: CollectConfig) -> str:
    """What a store's ``source`` attribute says about the collection that wrote it."""
    source = f"{suite.name} scripted experts ({env_spec})"
    if config.detour_steps:
        source += f", detours of up to {config.detour_steps} steps"
    if config.push_rate:
        source += f", pushes at a rate of {config.push_rate:g} per step"
    if config.multimodal:
        source += ", multimodal (a way per episode)"
    if config.randomize:
        source += f", randomized {Perturbation.parse(config.randomize).name()}"
    return source


def _create_store(
    out: str | Path,
    env_spec: str,
    suite: Any,
    env: Any,
    cameras: tuple[str, ...],
    config: CollectConfig,
) -> ReplayBuffer:
    """The empty store the episodes go into, described by the suite and the first task's
    simulator."""
    if Path(out).exists() and not config.overwrite:
        raise ConfigError(
            f"{out}: already exists; --resume finishes the collection that wrote it, "
            "--overwrite replaces it"
        )
    return ReplayBuffer.create(
        out,
        fps=round(env.fps, 3),
        cameras=list(cameras),
        state_keys=list(env.proprio_keys),
        privileged_keys=list(env.privileged_keys),
        action_space=suite.action_space,
        source=_source(env_spec, suite, config),
        overwrite=config.overwrite,
    )


def _resumed_store(
    out: str | Path, source: str, cameras: tuple[str, ...], config: CollectConfig
) -> ReplayBuffer:
    """The store of an interrupted collection, opened to append, after checking it was
    written by this one (an append cut short leaves it as it was before that episode)."""
    buffer = ReplayBuffer.open(out, mode="a")
    checks = (
        ("source", buffer.attrs.get("source"), source),
        ("cameras", list(buffer.cameras), list(cameras)),
    )
    if cameras and buffer.cameras and buffer.n_frames:
        size = buffer.shape(buffer.cameras[0])[0]
        checks += (("image size", size, config.image_size),)
    differs = [
        f"{name}: the store's {held!r}, asked {asked!r}"
        for name, held, asked in checks
        if held != asked
    ]
    seeds, last = buffer.episode_seed, config.seed_start + 2 * config.episodes_per_task - 1
    if buffer.n_episodes and not config.seed_start <= seeds.min() <= seeds.max() <= last:
        differs.append(
            f"seeds: the store's {seeds.min()}..{seeds.max()}, this collection's "
            f"{config.seed_start}..{last}"
        )
    if differs:
        raise ConfigError(f"{out}: written by another collection; " + "; ".join(differs))
    return buffer


def _episode_submitter(
    pool: ProcessPoolExecutor | None,
    env: Any,
    suite_name: str,
    task: str,
    cameras: tuple[str, ...],
    config: CollectConfig,
) -> Callable[[int], Future]:
    """``submit(seed)``: starts the expert episode of ``seed`` in the pool, or runs it here
    on ``env`` when there is no pool; either way a future of (arrays, success)."""
    if pool is None:
        return partial(_run_here, env, config.episode_options)
    return partial(
        pool.submit,
        _expert_episode_in_worker,
        suite_name,
        task,
        cameras,
        config.image_size,
        config.episode_options,
        config.randomize,
    )


def _collect_task(
    buffer: ReplayBuffer,
    task: str,
    instruction: str,
    submit: Callable[[int], Future],
    widths: dict[str, int],
    config: CollectConfig,
    report: CollectionReport,
    bar: tqdm,
) -> None:
    """Run ``task``'s episodes from ``config.seed_start`` on and append the ones kept
    (the privileged parts named in ``widths`` padded to them), until
    ``episodes_per_task`` are kept or twice as many were tried; counted in ``report``.

    Episodes run ahead in seed order (at most ``workers`` of them, never more than the
    successes still missing) and are written in seed order."""
    wanted = config.episodes_per_task
    # Seeds run in order, so a resumed task has tried every seed up to its last stored one.
    stored = [
        int(seed)
        for episode, seed in enumerate(buffer.episode_seed)
        if buffer.episode_task(episode).name == task
    ]
    report.kept[task] = len(stored)
    report.attempts[task] = max(stored) + 1 - config.seed_start if stored else 0
    bar.update(min(len(stored), wanted))
    pending: deque[tuple[int, Future]] = deque()
    next_seed = config.seed_start + report.attempts[task]
    limit = config.seed_start + 2 * wanted
    while report.kept[task] < wanted and report.attempts[task] < 2 * wanted:
        while (
            len(pending) < config.workers
            and report.kept[task] + len(pending) < wanted
            and next_seed < limit
        ):
            pending.append((next_seed, submit(next_seed)))
            next_seed += 1
        seed, future = pending.popleft()
        episode, success = future.result()
        report.attempts[task] += 1
        if success or config.keep_failures:
            if widths:
                episode = padded_to_widths(episode, widths)
            buffer.append_episode(episode, task=task, instruction=instruction, seed=seed)
            report.kept[task] += 1
            report.frames += len(episode["action"])
            bar.update()
        bar.set_postfix_str(f"{task} ok {report.kept[task]}/{report.attempts[task]}")
    for _, future in pending:
        future.cancel()

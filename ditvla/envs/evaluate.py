"""The rollout evaluator: ``ditvla eval``.

Episodes run in parallel worker processes, one simulator each, stepped in lockstep; the
policy runs in this process and is called once per step for all the episodes that need a
new action chunk (a batch; new episodes start when the others need a chunk too, so that
every call holds all the episodes in flight). Cameras are rendered only for the steps
whose observation the policy will read (one in ``n_action_steps``), and for recorded
videos.

Episodes are fixed by (task, seed): seeds ``seed_start .. seed_start + episodes - 1`` for
each task (100000 up by default, apart from the demonstration seeds), so two runs of one
policy see the same episodes. A diffusion policy's initial noise is fixed the same way:
each episode draws its chunks' noise from its own generator, seeded with the episode's
seed (for policies whose spec has a ``noise_shape``). Two runs of one policy with the same
workers then give the same rollouts, and two policies (a float one and its quantized copy)
are compared on the same noise as well as the same episodes. With other workers the
policy's batches hold other episodes, and the rounding of batched matrix products can
move an episode by a step or more (2-4 of 70 of the demo's episodes, none in success:
docs/benchmarks.md, "Evaluation in one batch").

Faults stay local: a policy output with NaN or the wrong shape, or an error raised by the
simulator, fails that episode with the reason recorded; a worker process that dies is
replaced and its episode retried once (then marked failed); results are appended to
``episodes.jsonl`` as they come. An evaluation can be split across machines (``shard``),
resumed after an interruption (``resume``) and its shards merged: see
:mod:`ditvla.envs.evaluation_runs`.

Why not gymnasium's vector envs: they batch observations into fixed spaces (our
observations carry images only on the steps that need them), reset every sub-env to one
task set at construction, and lose the whole vector when one worker dies.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from ditvla.contract import (
    EVAL_SEED_START,
    ChunkPolicy,
    DualSystemPolicy,
    HeadDType,
    PolicySpec,
)
from ditvla.envs.baselines import policy_from_argument
from ditvla.envs.evaluation_report import (
    EpisodeResult,
    EvaluationReport,
    describe_observation,
    wilson_interval,
)
from ditvla.envs.evaluation_runs import (
    EPISODES_FILE,
    VIDEOS_DIR,
    claim_folder,
    episode_jobs,
    parse_shard,
    start_run,
    write_report,
)
from ditvla.envs.perturbations import Perturbation, ReceivedPerturbation, check_policy_reads
from ditvla.envs.registry import Suite, parse_env, suite_of
from ditvla.envs.rewordings import read_rewordings
from ditvla.envs.rollout_workers import SimulatorError, SimulatorWorker
from ditvla.envs.videos import write_video
from ditvla.errors import ConfigError
from ditvla.real_time_chunking import rtc_weights

__all__ = [
    "EvalConfig",
    "EvaluationReport",
    "describe_observation",
    "evaluate",
    "evaluate_named_policy",
    "wilson_interval",
]

Probe = Literal["none", "blank_images", "shuffled_instructions"]
Merge = Literal["latest", "rtc"]
VIDEO_SIZE_PX = 64  # rollout videos of policies that read no camera


@dataclass(frozen=True)
class EvalConfig:
    """How many episodes of which seeds ``ditvla eval`` runs, and what it records.

    Args:
        episodes_per_task: episodes per task, on seeds seed_start, seed_start + 1, ...
        workers: simulator processes stepped in lockstep.
        seed_start: first episode seed (evaluation seeds start apart from the
            demonstration seeds 0, 1, ...).
        max_steps: episode step limit (default: the task's own).
        videos_per_task: mp4 rollouts recorded per task (when results are written): its
            first seeds, in whichever shard runs them.
        probe: none, or what to take from the policy to see whether it uses it:
            blank_images (every camera frame black), shuffled_instructions (each episode
            gets the instruction of another of the evaluated tasks, fixed by its seed).
        progress: show a progress bar.
        shard: I/N: every N-th episode from the I-th, one machine's share (ditvla eval
            merge joins the shards); empty: every episode.
        resume: keep the episodes the output folder holds from the same evaluation and
            run only the others; with more --episodes-per-task, a whole (unsharded)
            evaluation grows to them, keeping the seeds it ran.
        overwrite: replace the evaluation the output folder holds. Without it or
            --resume, a folder holding an earlier evaluation's episodes is refused.
        perturb: AXIS=LEVEL[,AXIS=LEVEL...]: what the policy meets beyond its training
            inputs, drawn from each episode's seed (same episodes and initial noise as
            unperturbed): camera, lighting, table, background, layout and robot in the
            simulator, pixels, state and instruction in what the policy receives; levels
            small, medium, large (instruction also file). See ditvla.envs.perturbations.
        rewordings: a file of TASK<TAB>REWORDING lines, for --perturb instruction=file.
        action_steps: how many of each chunk's actions run before the policy is asked
            again, 1..its horizon (0: the policy's own n_action_steps). Fewer replan
            more often, at more policy calls per episode.
        merge: what a new chunk makes of the rest of the last one: latest (replaces it)
            or rtc (real-time chunking: the new chunk is denoised with the last one's
            unexecuted actions inpainted into it, their weights decaying over the
            overlap, so that successive chunks agree; the deploy server's --merge rtc,
            with no inference delay as the simulator waits). rtc needs a policy that
            takes inpaint (ditvla's).
    """

    episodes_per_task: int = 50
    workers: int = 2
    seed_start: int = EVAL_SEED_START
    max_steps: int | None = None
    videos_per_task: int = 1
    probe: Probe = "none"
    progress: bool = True
    shard: str = ""
    resume: bool = False
    overwrite: bool = False
    perturb: str = ""
    rewordings: str = ""
    action_steps: int = 0
    merge: Merge = "latest"

    def __post_init__(self) -> None:
        parse_shard(self.shard)
        perturbation = Perturbation.parse(self.perturb)
        if (perturbation.level("instruction") == "file") != bool(self.rewordings):
            raise ConfigError(
                "--perturb instruction=file reads its rewordings from --rewordings FILE, "
                "and --rewordings is for instruction=file only"
            )
        if self.action_steps < 0:
            raise ConfigError(f"action_steps must be >= 0, got {self.action_steps}")
        if self.resume and self.overwrite:
            raise ConfigError("resume keeps a folder's episodes, overwrite replaces them: pick one")
        if self.merge not in get_args(Merge):
            raise ConfigError(
                f"unknown merge {self.merge!r}; choose one of {', '.join(get_args(Merge))}"
            )
        if self.episodes_per_task < 1 or self.workers < 1:
            raise ConfigError(
                f"episodes_per_task and workers must be >= 1, got {self.episodes_per_task} "
                f"and {self.workers}"
            )


@dataclass
class _Slot:
    """An episode in flight on one worker."""

    worker: SimulatorWorker
    job: tuple[str, int] | None = None
    steps: int = 0
    queue: deque = field(default_factory=deque)
    obs: dict | None = None
    frames: list | None = None
    noise: torch.Generator | None = None  # the episode's own, for a policy's initial noise
    received: ReceivedPerturbation | None = None  # what the policy receives, perturbed
    plan: np.ndarray | None = None  # the last chunk's actions not executed (merge rtc)

    def clear(self) -> None:
        """Free the slot for the next episode."""
        self.job, self.frames, self.queue, self.noise = None, None, deque(), None
        self.received, self.plan = None, None


def policy_batch(
    observations: list[dict],
    jobs: list[tuple[str, int]],
    cameras: tuple[str, ...],
    probe: Probe,
    instructions: dict[str, str],
    received: list[ReceivedPerturbation] | None = None,
) -> dict[str, Any]:
    """The policy's batch; ``task`` and ``seed`` name each row's episode (for policies
    that keep per-episode history). ``probe`` blanks the frames or swaps each episode's
    instruction for another of ``instructions`` (by task), chosen by the episode's seed.
    ``received``: each row's perturbation of its frames, state and instruction."""
    if received is not None:
        observations = [
            {
                **o,
                "images": {cam: r.frame(o["images"][cam]) for cam in cameras},
                "state": r.state_of(o["state"]),
                "instruction": r.instruction,
            }
            for o, r in zip(observations, received, strict=True)
        ]
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


class _Rollouts:
    """The episodes in flight: a slot per worker, the jobs waiting, retries of episodes
    whose worker died, videos, and the report the finished episodes go into."""

    def __init__(
        self,
        suite: Suite,
        tasks: list[str],
        spec: PolicySpec,
        config: EvalConfig,
        report: EvaluationReport,
        out: Path | None,
        jobs: list[tuple[str, int]],
    ):
        self.suite, self.spec, self.config, self.report, self.out = suite, spec, config, report, out
        self.instructions = {task: suite.instruction(task) for task in tasks}
        self.perturbation = Perturbation.parse(config.perturb)
        self.rewordings = read_rewordings(config.rewordings, tasks) if config.rewordings else None
        self.video_cameras = spec.cameras or suite.default_cameras[:1]
        record_videos = out is not None and config.videos_per_task > 0
        # the first seeds of each task, wherever they run (fresh, resumed, grown, sharded)
        self.video_seeds_end = config.seed_start + (config.videos_per_task if record_videos else 0)
        render_cameras = (
            tuple(dict.fromkeys((*spec.cameras, *self.video_cameras)))
            if record_videos
            else spec.cameras
        )
        self.jobs = deque(jobs)
        self.tries: dict[tuple[str, int], int] = {}
        context = mp.get_context("spawn")
        worker_args = (
            suite.name,
            render_cameras,
            spec.image_size or VIDEO_SIZE_PX,
            config.max_steps,
            spec.reads_expert_action,
            tuple(spec.state_keys) if spec.state_dim else None,
            self.perturbation.name(),
        )
        self.slots = [
            _Slot(SimulatorWorker(context, *worker_args))
            for _ in range(min(config.workers, len(self.jobs)))
        ]
        self.bar = tqdm(total=len(self.jobs), desc="eval", unit="ep", disable=not config.progress)

    @property
    def busy(self) -> bool:
        return bool(self.jobs) or any(s.job for s in self.slots)

    def close(self) -> None:
        self.bar.close()
        for slot in self.slots:
            slot.worker.close()

    # -------------------------------------------------------------- episodes end
    def finish(self, slot: _Slot, success: bool, error: str | None = None) -> None:
        task, seed = slot.job
        result = EpisodeResult(task, seed, bool(success), slot.steps, error)
        self.report.episodes.append(result)
        if self.out is not None:
            with (self.out / EPISODES_FILE).open("a") as f:
                f.write(json.dumps(asdict(result)) + "\n")
            if slot.frames:
                name = task.replace("/", "_")  # LIBERO tasks are "suite/index"
                write_video(self.out / VIDEOS_DIR / f"{name}_seed{seed}.mp4", slot.frames)
        slot.clear()
        wins = sum(e.success for e in self.report.episodes)
        self.bar.update()
        self.bar.set_postfix_str(f"success {wins}/{len(self.report.episodes)}")

    def crashed(self, slot: _Slot, exc: Exception) -> None:
        slot.worker.restart()
        if self.tries[slot.job] < 2:
            self.jobs.appendleft(slot.job)  # retried once, on the fresh worker
            slot.clear()
        else:
            self.finish(slot, False, f"simulator worker failed twice: {type(exc).__name__}: {exc}")

    def receive(self, slot: _Slot) -> tuple[dict, bool, bool] | None:
        """The worker's answer, or None when the episode ended (failed or queued again)."""
        try:
            return slot.worker.response()
        except SimulatorError as exc:
            self.finish(slot, False, f"simulator raised {exc}")
        except (EOFError, OSError, TimeoutError) as exc:
            self.crashed(slot, exc)
        return None

    def _record_frame(self, slot: _Slot) -> None:
        if slot.frames is not None:
            slot.frames.append(slot.obs["images"][self.video_cameras[0]])

    # -------------------------------------------------------------- the three phases
    def start_idle(self) -> None:
        """Start the next episodes on idle workers and take in their first observations,
        once no episode is partway through a chunk: new episodes then ask for their first
        chunk in the same policy call as the others, and every call stays one batch of all
        the episodes in flight (a worker waits fewer steps than a chunk executes; an
        episode's rollout does not depend on when it starts)."""
        if any(s.queue for s in self.slots if s.job is not None):
            return
        started = []
        for slot in self.slots:
            if slot.job is not None or not self.jobs:
                continue
            slot.job = self.jobs.popleft()
            task, seed = slot.job
            self.tries[slot.job] = self.tries.get(slot.job, 0) + 1
            slot.steps, slot.queue = 0, deque()
            if self.spec.noise_shape is not None:
                slot.noise = torch.Generator().manual_seed(seed)
            if self.perturbation:
                slot.received = ReceivedPerturbation(
                    self.perturbation, task, seed, self.instructions[task], self.rewordings
                )
            slot.frames = [] if seed < self.video_seeds_end else None
            try:
                slot.worker.request("reset", task, seed, True)
                started.append(slot)
            except (BrokenPipeError, OSError) as exc:
                self.crashed(slot, exc)
        for slot in started:
            if (answer := self.receive(slot)) is not None:
                slot.obs = answer[0]
                self._record_frame(slot)

    def query_policy(self, policy: ChunkPolicy) -> None:
        """One batched policy call for the episodes whose action queue is empty."""
        needing = [s for s in self.slots if s.job is not None and s.obs is not None and not s.queue]
        if not needing:
            return
        spec = self.spec
        observations = [s.obs for s in needing]
        if spec.state_dim and observations[0]["state"].shape != (spec.state_dim,):
            raise ConfigError(
                f"the policy reads a {spec.state_dim}-D state ({' + '.join(spec.state_keys)}), "
                f"{self.suite.name} gives {observations[0]['state'].shape[0]}-D"
            )
        jobs = [s.job for s in needing]
        received = [s.received for s in needing] if self.perturbation else None
        batch = policy_batch(
            observations, jobs, spec.cameras, self.config.probe, self.instructions, received
        )
        options = {}  # the episodes' own initial noise, for a diffusion policy
        if spec.noise_shape is not None:
            rows = [torch.randn(spec.noise_shape, generator=s.noise) for s in needing]
            options["noise"] = torch.stack(rows)
        if self.config.merge == "rtc":
            options["inpaint"] = self._planned(needing)
        try:
            with torch.inference_mode():
                chunks = policy.predict_action_chunk(batch, **options)
            chunks = torch.as_tensor(chunks).float().cpu().numpy()
        except Exception as exc:  # a policy bug fails these episodes, not the run
            for s in needing:
                self.finish(s, False, f"policy raised {type(exc).__name__}: {exc}")
            return
        for i, s in enumerate(needing):
            self._take_chunk(s, chunks, i, len(needing))

    def _take_chunk(self, slot: _Slot, chunks: np.ndarray, row: int, rows: int) -> None:
        """Queue the first n_action_steps of the slot's chunk, or fail its episode."""
        action_dim = self.suite.action_dim
        chunk = chunks[row] if chunks.ndim == 3 and len(chunks) == rows else None
        if chunk is None or chunk.ndim != 2 or chunk.shape[1] != action_dim:
            error = f"policy returned shape {chunks.shape}, expected ({rows}, H, {action_dim})"
            self.finish(slot, False, error)
        elif not np.all(np.isfinite(chunk)):
            self.finish(slot, False, "policy returned NaN or infinite actions")
        else:
            slot.queue.extend(chunk[: self.spec.n_action_steps])
            slot.plan = chunk[self.spec.n_action_steps :]

    def _planned(self, slots: list[_Slot]) -> tuple[np.ndarray, np.ndarray]:
        """merge rtc: for each slot, the actions its last chunk planned from the new
        chunk's first tick on, and their inpainting weights (none is frozen: nothing
        executes while the policy computes); zero weights on an episode's first chunk."""
        horizon, dim = self.spec.horizon, self.suite.action_dim
        actions = np.zeros((len(slots), horizon, dim), np.float32)
        weights = np.zeros((len(slots), horizon), np.float32)
        for row, slot in enumerate(slots):
            planned = 0 if slot.plan is None else min(len(slot.plan), horizon)
            if planned:
                actions[row, :planned] = slot.plan[:planned]
                weights[row] = rtc_weights(horizon, 0, np.arange(horizon) < planned)
        return actions, weights

    def step(self) -> None:
        """One simulator step of every episode with a queued action (rendered when the
        policy reads the next observation, or for a video)."""
        stepping = [s for s in self.slots if s.job is not None and s.queue]
        for s in stepping:
            action = s.queue.popleft()
            render = not s.queue or s.frames is not None
            try:
                s.worker.request("step", action, render)
            except (BrokenPipeError, OSError) as exc:
                self.crashed(s, exc)
        for s in stepping:
            if s.job is None or (answer := self.receive(s)) is None:
                continue
            s.obs, success, truncated = answer
            s.steps += 1
            self._record_frame(s)
            if success or truncated:
                self.finish(s, success)


def _checked_state_keys(suite: Suite, spec: PolicySpec) -> tuple[str, ...] | None:
    """The state arrays the policy reads, refused up front if the suite has no such parts."""
    if not spec.state_dim:
        return None
    state_keys = tuple(spec.state_keys)
    try:
        suite.env_class.check_state_keys(state_keys)
    except ValueError as exc:
        raise ConfigError(f"the policy reads state {' + '.join(state_keys)}: {exc}") from None
    return state_keys


def evaluate(
    policy: ChunkPolicy,
    env_spec: str,
    config: EvalConfig | None = None,
    *,
    out: str | Path | None = None,
    **settings: Any,
) -> EvaluationReport:
    """Run every task of ``env_spec`` with ``policy``; ``settings`` are
    :class:`EvalConfig` fields set over ``config`` (e.g. ``episodes_per_task=20``).
    ``out``: a folder for results.json, results.md, episodes.jsonl and videos/ (None:
    nothing is written)."""
    config = replace(config or EvalConfig(), **settings)
    suite, tasks = parse_env(env_spec)
    spec = _acting_spec(policy.spec, config.action_steps)
    if config.merge == "rtc" and not isinstance(policy, DualSystemPolicy):
        raise ConfigError(
            f"--merge rtc inpaints the last chunk's actions into the next while the policy "
            f"computes it; {type(policy).__name__} cannot (ditvla's policies can)"
        )
    state_keys = _checked_state_keys(suite, spec)
    perturbation = Perturbation.parse(config.perturb)
    check_policy_reads(perturbation, spec.cameras, spec.state_dim)
    if config.rewordings:  # a bad file fails here, naming its line, before anything runs
        read_rewordings(config.rewordings, tasks)
    privileged = spec.reads_expert_action or suite.env_class.reads_privileged_state(
        state_keys or ()
    )
    observation = {
        "cameras": list(spec.cameras),
        "state_keys": list(state_keys or ()),
        "privileged_state": privileged,
        "probe": config.probe,
    }
    if perturbation:  # (absent unperturbed: runs written before perturbations still resume)
        observation["perturb"] = perturbation.name()
    if config.action_steps:  # (absent at the policy's own, likewise)
        observation["action_steps"] = spec.n_action_steps
    if config.merge != "latest":  # (likewise)
        observation["merge"] = config.merge
    report = EvaluationReport(observation=observation)
    policy.reset()
    jobs = episode_jobs(tasks, config.episodes_per_task, config.seed_start, config.shard)
    out = Path(out) if out is not None else None
    if out is not None:
        run = {
            "suite": suite.name,
            "tasks": tasks,
            **{k: getattr(config, k) for k in _RUN_SETTINGS},
            **_perturbation_settings(perturbation, config.rewordings),
            "observation": report.observation,
            "policy": asdict(spec),  # a resumed run must be of the same policy
        }
        run = json.loads(json.dumps(run))
        report.episodes.extend(
            start_run(out, run, resume=config.resume, overwrite=config.overwrite)
        )
    elif config.resume:
        raise ConfigError("resume reads the output folder of an earlier run: give it --out")
    done = {(e.task, e.seed) for e in report.episodes}
    jobs = [job for job in jobs if job not in done]
    start = time.perf_counter()
    rollouts = _Rollouts(suite, tasks, spec, config, report, out, jobs)
    try:
        while rollouts.busy:
            rollouts.start_idle()
            rollouts.query_policy(policy)
            rollouts.step()
    finally:
        rollouts.close()
    report.seconds = time.perf_counter() - start
    if out is not None:
        write_report(out, report)
    return report


def _acting_spec(spec: PolicySpec, action_steps: int) -> PolicySpec:
    """The policy's spec, executing ``action_steps`` of each chunk where that is set."""
    if not action_steps:
        return spec
    if action_steps > spec.horizon:
        raise ConfigError(
            f"action_steps {action_steps}: the policy returns chunks of {spec.horizon} "
            f"actions (its horizon), so at most {spec.horizon}"
        )
    return replace(spec, n_action_steps=action_steps)


def evaluate_named_policy(
    policy: str,
    env_spec: str,
    config: EvalConfig,
    out: str | Path,
    *,
    device: str,
    head_dtype: HeadDType,
) -> EvaluationReport:
    """:func:`evaluate` of the policy named as ``ditvla eval --policy`` names it (a saved
    policy folder, or the baselines random / expert), loaded on ``device`` with its action
    head in ``head_dtype``; what ``ditvla eval`` runs, here or as a shard's Ray task. The
    output folder is checked before the policy loads (:func:`claim_folder`)."""
    claim_folder(Path(out), resume=config.resume, overwrite=config.overwrite)
    loaded = policy_from_argument(
        policy, action_dim=suite_of(env_spec).action_dim, device=device, head_dtype=head_dtype
    )
    return evaluate(loaded, env_spec, config, out=out)


# what makes two evaluations the same run (with the tasks, the observation and the policy)
_RUN_SETTINGS = ("episodes_per_task", "seed_start", "max_steps", "probe", "shard")


def _perturbation_settings(perturbation: Perturbation, rewordings: str) -> dict[str, str]:
    """A perturbed run's perturbation (in the axes' order) and its rewordings file's
    digest (the same words wherever the file sits); nothing for an unperturbed run."""
    settings = {"perturb": perturbation.name()} if perturbation else {}
    if rewordings:
        digest = hashlib.sha256(Path(rewordings).read_bytes()).hexdigest()
        settings["rewordings_sha256"] = digest
    return settings

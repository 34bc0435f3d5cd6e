"""``ditvla calibrate-steps``: the fewest denoising steps that keep a policy's quality.

On held-out frames of a store (the last 20% of its episodes), each candidate step count
samples the same initial noise from the same context; its error is the mean squared
difference between the policy's chunk and the demonstrated one (normalized action units,
padded steps left out). The reference is the policy's current step count; the fewest
steps whose error stays within ``tolerance`` (relative) of the reference's are written
into the policy (``config.json``: ``num_inference_steps``, and the measurement under
``step_calibration``), which ``eval`` and ``serve`` then use.

Action error on frames is a proxy. Closed loop, a policy whose one-step chunks are as
close to the demonstrations as its ten-step ones can still fail more episodes
(docs/benchmarks.md has such a policy). :func:`calibrate_steps_by_success` measures what
matters instead: success in a simulator over the same episodes and initial noise, the
reference's step count first, then each candidate from the fewest up until one is within
``points`` of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ditvla.datasets.observations import observations_from_store
from ditvla.errors import ConfigError
from ditvla.policies.checkpoint import edit_config_file

CANDIDATE_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 50, 64, 100)
# the measurements keyed by step count (JSON keys are strings)
PER_STEP_FIELDS = ("errors", "deviation", "success", "intervals")


@dataclass(frozen=True)
class CalibrateConfig:
    """What ``ditvla calibrate-steps`` measures and allows.

    Args:
        frames: with a dataset: held-out frames measured.
        tolerance: with a dataset: the relative action-error increase allowed.
        episodes: with an environment: episodes per task and step count.
        points: with an environment: success percentage points allowed below the
            policy's own.
        seed: the random seed of the frames and the initial noise.
    """

    frames: int = 256
    tolerance: float = 0.05
    episodes: int = 20
    points: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tolerance", "points"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.frames < 1 or self.episodes < 1:
            raise ConfigError(
                f"frames and episodes must be >= 1, got {self.frames} and {self.episodes}"
            )


@dataclass
class StepCalibration:
    """What ``calibrate-steps`` measured and chose.

    Args:
        errors: per step count, the mean squared action error against the demonstrations.
        deviation: per step count, the mean squared difference from the reference chunk.
        reference_steps: the policy's step count before calibration.
        chosen_steps: the fewest steps within ``tolerance`` of the reference's error.
        tolerance: the relative error increase allowed.
        frames: held-out frames measured.
        dataset: the store they came from.
    """

    errors: dict[int, float]
    deviation: dict[int, float]
    reference_steps: int
    chosen_steps: int
    tolerance: float
    frames: int
    dataset: str

    def markdown(self) -> str:
        limit = self.errors[self.reference_steps] * (1 + self.tolerance)
        rows = [
            "| steps | action error | vs the reference chunk | within tolerance |",
            "|---|---|---|---|",
        ]
        for steps, error in self.errors.items():
            mark = "chosen" if steps == self.chosen_steps else ("yes" if error <= limit else "no")
            rows.append(f"| {steps} | {error:.4f} | {self.deviation[steps]:.4f} | {mark} |")
        return "\n".join(rows)


def fewer_steps(config) -> list[int]:
    """The candidate step counts below a policy config's own, fewest first (DDIM: no more
    than its training noise levels)."""
    reference = config.num_inference_steps
    limit = config.num_train_timesteps if config.objective == "ddpm" else reference
    return [s for s in CANDIDATE_STEPS if s < reference and s <= limit]


def evaluate_with(policy, env: str, config=None, **fields: Any) -> dict[str, Any]:
    """The evaluator's summary of ``policy`` on ``env`` with these PolicyConfig ``fields``
    (e.g. ``num_inference_steps``) in place for the run; the config is restored after."""
    from ditvla.envs.evaluate import evaluate

    base = policy.config
    policy.config = replace(base, **fields)
    try:
        return evaluate(policy, env, config).summary()
    finally:
        policy.config = base


def calibrate_steps(
    policy,
    dataset: str | Path,
    config: CalibrateConfig | None = None,
    *,
    progress: bool = True,
    **settings: Any,
) -> StepCalibration:
    """Measure every candidate step count up to the policy's own on held-out frames;
    ``settings`` are :class:`CalibrateConfig` fields set over ``config``."""
    config = replace(config or CalibrateConfig(), **settings)
    frames, tolerance, seed = config.frames, config.tolerance, config.seed
    reference = policy.config.num_inference_steps
    candidates = [*fewer_steps(policy.config), reference]
    batches = observations_from_store(
        dataset, policy.spec, frames, held_out=True, seed=seed, with_actions=True
    )
    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(candidates, 0.0)
    deviation = dict.fromkeys(candidates, 0.0)
    count, n_frames = 0.0, 0
    with torch.inference_mode():
        for batch in tqdm(batches, desc="calibrate-steps", unit="batch", disable=not progress):
            context = policy.encode(batch)
            target = policy.normalizer.normalize(
                "action", torch.as_tensor(batch["action"]).float().to(policy.device)
            )
            valid = ~torch.as_tensor(batch["action_is_pad"]).to(policy.device)
            noise = torch.randn(target.shape, generator=generator).to(policy.device)
            chunks = {
                s: policy.normalizer.normalize(
                    "action", policy.act(context, batch["state"], noise=noise, num_steps=s)
                )
                for s in candidates
            }
            for s, chunk in chunks.items():
                sums[s] += float((((chunk - target) ** 2).mean(-1) * valid).sum())
                deviation[s] += float((((chunk - chunks[reference]) ** 2).mean(-1) * valid).sum())
            count += float(valid.sum())
            n_frames += len(batch["instruction"])
    errors = {s: sums[s] / max(count, 1.0) for s in candidates}
    deviation = {s: deviation[s] / max(count, 1.0) for s in candidates}
    chosen = min(s for s in candidates if errors[s] <= errors[reference] * (1 + tolerance))
    return StepCalibration(errors, deviation, reference, chosen, tolerance, n_frames, str(dataset))


@dataclass
class SuccessCalibration:
    """What ``calibrate-steps --env`` measured and chose.

    Args:
        success: per step count measured, the mean success rate over the tasks.
        intervals: per step count, each task's 95% Wilson interval.
        reference_steps: the policy's step count before calibration.
        chosen_steps: the fewest steps within ``points`` of the reference's success.
        points: the success (percentage points) allowed below the reference's.
        episodes_per_task: episodes per task and step count (the same seeds and noise).
        env: the suite and tasks evaluated.
        observation: what the policy read (cameras, state) in those episodes.
    """

    success: dict[int, float]
    intervals: dict[int, dict[str, list[float]]]
    reference_steps: int
    chosen_steps: int
    points: float
    episodes_per_task: int
    env: str
    observation: dict[str, Any]

    def markdown(self) -> str:
        rows = ["| steps | success | 95% interval per task | within points |", "|---|---|---|---|"]
        floor = self.success[self.reference_steps] - self.points / 100
        for steps in sorted(self.success):
            mark = (
                "chosen"
                if steps == self.chosen_steps
                else ("yes" if self.success[steps] >= floor else "no")
            )
            spans = ", ".join(f"{lo:.0%}-{hi:.0%}" for lo, hi in self.intervals[steps].values())
            rows.append(f"| {steps} | {self.success[steps]:.1%} | {spans} | {mark} |")
        return "\n".join(rows)


def calibrate_steps_by_success(
    policy, env: str, config: CalibrateConfig | None = None, **settings: Any
) -> SuccessCalibration:
    """Evaluate the policy's own step count, then candidates from the fewest up, each over
    the same episodes and initial noise, until one is within ``config.points`` of the
    first. ``settings``: :class:`CalibrateConfig` fields set over ``config``, and the
    evaluator's (:class:`~ditvla.envs.evaluate.EvalConfig` fields, e.g. ``max_steps``;
    ``episodes_per_task`` defaults to ``config.episodes``)."""
    from ditvla.envs.evaluate import EvalConfig

    own = {f.name for f in fields(CalibrateConfig)}
    config = replace(config or CalibrateConfig(), **{k: v for k, v in settings.items() if k in own})
    evaluator = {k: v for k, v in settings.items() if k not in own}
    evaluation = EvalConfig(**{"episodes_per_task": config.episodes, **evaluator})
    points = config.points
    reference = policy.config.num_inference_steps
    success, intervals, observation = {}, {}, {}

    def measure(steps: int) -> float:
        nonlocal observation
        summary = evaluate_with(policy, env, evaluation, num_inference_steps=steps)
        print(f"{steps} steps: success {summary['mean_success']:.1%}", flush=True)
        success[steps] = summary["mean_success"]
        intervals[steps] = {task: list(t["ci95"]) for task, t in summary["tasks"].items()}
        observation = summary["observation"]
        return summary["mean_success"]

    floor = measure(reference) - points / 100
    chosen = reference
    for steps in fewer_steps(policy.config):
        if measure(steps) >= floor:
            chosen = steps
            break
    return SuccessCalibration(
        success,
        intervals,
        reference,
        chosen,
        points,
        evaluation.episodes_per_task,
        env,
        observation,
    )


def write_steps(folder: str | Path, calibration: StepCalibration | SuccessCalibration) -> None:
    """Set the policy folder's ``num_inference_steps`` to the chosen count and record the
    measurement; config.json is replaced atomically."""
    record = {
        key: {str(k): v for k, v in value.items()} if key in PER_STEP_FIELDS else value
        for key, value in asdict(calibration).items()
    }

    def edit(meta: dict[str, Any]) -> None:
        meta["policy"]["num_inference_steps"] = calibration.chosen_steps
        meta["step_calibration"] = record

    edit_config_file(folder, edit)

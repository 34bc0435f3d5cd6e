"""``ditvla distill``: a few-step student of a many-step policy.

The student starts as a copy of the teacher; its action head alone is trained (the VLM
and everything else stay the teacher's). Each step draws frames of the store (the first
80% of its episodes), one initial noise per frame, and the teacher's chunk from that noise
with its own step count; the student samples from the same noise in ``student_steps``
Euler/DDIM steps, and the loss is the mean squared difference of the two chunks in
normalized action units (knowledge distillation of the sampler's noise-to-action map, as
in Luhman & Luhman 2021 and InstaFlow's distillation stage): the student learns to send
each noise to the mode the teacher's full sampler reaches from it. ``flow_weight`` adds
the ordinary flow-matching loss on the frames' demonstrated chunks, which keeps the
student's velocity field anchored to the data (FACM; SnapFlow mixes the two the same way).

A student can be the teacher of a student with fewer steps (progressive distillation,
Salimans & Ho 2022): 10 -> 2 steps, then 2 -> 1. docs/benchmarks.md has what each
student kept of its teacher's success.

The result is an ordinary policy folder (``num_inference_steps`` and ``distilled_steps``
set to the student's count, the distillation recorded under ``distillation`` in
config.json) that ``eval``, ``serve``, ``quantize`` and ``calibrate-steps`` take.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ditvla.contract import load_policy
from ditvla.datasets.observations import observations_from_store
from ditvla.errors import ConfigError
from ditvla.policies.checkpoint import edit_config_file
from ditvla.policies.forecasting import ForecastConfig
from ditvla.policies.policy import DiTVLAPolicy, dit_policy
from ditvla.training.optimization import optimizer_step, scheduled_adamw

NO_FORECAST = ForecastConfig()


@dataclass(frozen=True)
class DistillConfig:
    """What ``ditvla distill`` does.

    Args:
        student_steps: the student's denoising steps (2 kept its teacher's success on
            multimodal reach-wall where 1 did not; a student can teach a 1-step one).
        teacher_steps: the teacher's steps for its targets (0: the teacher's own count).
        steps: optimizer steps.
        batch_size: frames per step.
        lr: peak learning rate (AdamW; linear warm-up over a twentieth of the steps,
            then cosine decay).
        frames: frames drawn from the training part of the store (cycled over).
        grad_clip: gradient-norm clipping.
        flow_weight: weight of the flow-matching loss on the demonstrated chunks of the
            same frames, added to the distillation loss (0: off); it anchors the student's
            velocity field to the data while its few-step map is trained (as FACM and
            SnapFlow mix the two).
        seed: the random seed of frames and noise.
        progress: show a progress bar.
    """

    student_steps: int = 2
    teacher_steps: int = 0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    frames: int = 4096
    grad_clip: float = 1.0
    flow_weight: float = 0.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("student_steps", "steps", "batch_size", "frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.flow_weight < 0:
            raise ConfigError(f"flow_weight must be >= 0, got {self.flow_weight}")
        if self.teacher_steps < 0:
            raise ConfigError(f"teacher_steps must be >= 0, got {self.teacher_steps}")


def distill(
    policy: str | Path, dataset: str | Path, out: str | Path, config: DistillConfig
) -> dict:
    """Train a ``config.student_steps``-step student of the policy in ``policy`` on frames
    of ``dataset`` and save it to ``out``; returns the record stored in its config.json."""
    teacher = dit_policy(load_policy(policy), policy, "distill")
    teacher_steps = _teacher_steps(teacher, policy, config)
    # Every input problem (cameras, state) surfaces here, before any training step.
    batches = observations_from_store(
        dataset,
        teacher.spec,
        config.frames,
        batch=config.batch_size,
        seed=config.seed,
        with_actions=config.flow_weight > 0,
    )
    if config.flow_weight and batches[0]["action"].shape[-1] != teacher.config.action_dim:
        raise ConfigError(
            f"{dataset}: its actions have {batches[0]['action'].shape[-1]} dimensions, the "
            f"policy's {teacher.config.action_dim}: the flow-matching anchor (--flow-weight) "
            "needs the policy's own action space (or set --flow-weight 0)"
        )
    torch.manual_seed(config.seed)
    student = load_policy(policy)
    losses = _train_student(teacher, student, batches, teacher_steps, config)
    record = {
        "teacher": str(policy),
        "teacher_steps": teacher_steps,
        "student_steps": config.student_steps,
        "dataset": str(dataset),
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "settings": asdict(config),
    }
    student.config = replace(
        student.config,
        num_inference_steps=config.student_steps,
        distilled_steps=config.student_steps,
        forecast=NO_FORECAST,
    )
    student.requires_grad_(False)
    student.save_pretrained(out)
    edit_config_file(out, lambda meta: meta.update(distillation=record))
    return record


def _teacher_steps(teacher: DiTVLAPolicy, folder: str | Path, config: DistillConfig) -> int:
    """The teacher's step count for its targets, checked against what it can do and the
    student's."""
    teacher_steps = config.teacher_steps or teacher.config.num_inference_steps
    refusal = teacher.config.steps_refusal(teacher_steps)  # a student as the teacher
    if refusal:
        raise ConfigError(f"{folder}: --teacher-steps {teacher_steps}: {refusal}")
    if teacher_steps <= config.student_steps:
        raise ConfigError(
            f"the teacher samples with {teacher_steps} steps, the student with "
            f"{config.student_steps}: a student needs fewer steps than its teacher (set "
            "--teacher-steps, e.g. 10, for a policy calibrated to few steps)"
        )
    return teacher_steps


def _train_student(
    teacher: DiTVLAPolicy,
    student: DiTVLAPolicy,
    batches: list[dict],
    teacher_steps: int,
    config: DistillConfig,
) -> list[float]:
    """Train the student's action head (nothing else) to send each noise where the
    teacher's sampler does; returns the distillation loss of every step."""
    student.requires_grad_(False)
    student.head.requires_grad_(True)
    trainable = [p for p in student.head.parameters() if p.requires_grad]
    optimizer, schedule = scheduled_adamw(
        trainable,
        lr=config.lr,
        weight_decay=0.0,
        warmup_steps=max(1, config.steps // 20),
        total_steps=config.steps,
    )
    order = np.random.default_rng(config.seed)
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="distill", unit="step", disable=not config.progress)
    for step in bar:
        if step % len(batches) == 0:
            order.shuffle(batches)
        batch = batches[step % len(batches)]
        context = teacher.encode(batch)
        noise = torch.randn(len(batch["instruction"]), *teacher.noise_shape)
        with torch.no_grad():
            target = teacher.denoise(
                context, batch["state"], noise=noise, num_steps=teacher_steps, forecast=NO_FORECAST
            )
        mine = student.context_from(context.tokens, context.mask)  # the student head's cache
        chunk = student.denoise(
            mine, batch["state"], noise=noise, num_steps=config.student_steps, forecast=NO_FORECAST
        )
        distillation_loss = ((chunk - target) ** 2).mean()
        loss = distillation_loss
        if config.flow_weight:
            flow = student.action_loss(
                mine, batch["state"], batch["action"], batch["action_is_pad"]
            )
            loss = loss + config.flow_weight * flow
        loss.backward()
        optimizer_step(optimizer, schedule, trainable, config.grad_clip)
        losses.append(distillation_loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    bar.close()
    return losses

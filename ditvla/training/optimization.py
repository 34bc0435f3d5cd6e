"""The optimizer, its learning-rate schedule and the weights' EMA, shared by ``ditvla
train`` and ``ditvla distill``.

AdamW with linear warm-up and cosine decay to 0 (as SmolVLA and Diffusion Policy train),
gradient-norm clipping at each step, and an EMA whose decay grows with the updates made
(Diffusion Policy's warm-up), so a short run's average is not weighed down by its first
weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def adamw(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float):
    """AdamW, on PyTorch's fused kernel where it has one for the parameters' device (CPU
    and CUDA): one pass over every parameter instead of a loop of small operations per
    parameter, which is what AdamW runs on the CPU otherwise (docs/benchmarks.md, "Fused
    AdamW")."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def scheduled_adamw(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    start_step: int = 0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule (:func:`lr_factor`), positioned at ``start_step``: the
    learning rate of step s is ``lr * lr_factor(s)``. Restore the optimizer's state before
    building the schedule when resuming."""
    optimizer = adamw(params, lr=lr, weight_decay=weight_decay)
    return optimizer, schedule_of(optimizer, warmup_steps, total_steps, start_step)


def schedule_of(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule of an optimizer, positioned at ``start_step`` (an
    optimizer resumed from a checkpoint carries its groups' ``initial_lr``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup_steps, total_steps),
        last_epoch=start_step - 1,
    )


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    grad_clip: float,
) -> float:
    """Clip the gradients' norm, step the optimizer and the schedule, clear the
    gradients; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def warmed_up_ema(decay: float, power: float):
    """An EMA update for ``AveragedModel`` whose decay at update t is ``min(decay, 1 -
    (1 + t) ** -power)`` (0 power: a constant decay)."""

    def update(averaged: list, current: list, num_averaged) -> None:
        step = float(num_averaged)
        rate = decay if power == 0 else min(decay, 1 - (1 + step) ** -power)
        torch.optim.swa_utils.get_ema_multi_avg_fn(rate)(averaged, current, num_averaged)

    return update

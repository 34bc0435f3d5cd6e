"""Training a LeRobot policy as ``lerobot-train`` would, for a wall-clock budget.

The learning benches give a LeRobot peer the same wall-clock our policy took (or a step
count): the peer trains with its own optimizer and scheduler presets and gradient
clipping, the scheduler fitted to the steps the budget allows, so the comparison is
against LeRobot's recipe, not ours.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


def train_for(
    policy,
    preprocessor,
    batches,
    budget_s: float | None,
    *,
    name: str,
    seed: int = 0,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``policy`` on ``batches`` (an endless iterator of LeRobot batches) for
    ``budget_s`` seconds with its optimizer and scheduler presets; the scheduler spans the
    steps the budget allows (measured over the first 5 steps). With ``max_steps`` (and no
    budget) it trains that many steps instead, whatever else runs on the machine."""
    if (budget_s is None) == (max_steps is None):
        raise ValueError("train_for takes a wall-clock budget or a step count, one of them")
    torch.manual_seed(seed)
    config = policy.config
    optimizer = config.get_optimizer_preset().build(policy.parameters())
    clip = getattr(config, "optimizer_grad_clip_norm", 10.0)
    policy.train()
    start, steps, losses, scheduler = time.perf_counter(), 0, [], None
    preset = config.get_scheduler_preset()  # LeRobot fits its schedule to the total steps
    if preset is not None and max_steps is not None:
        scheduler = preset.build(optimizer, max_steps)
    progress = tqdm(total=max_steps, desc=name, unit="step", mininterval=10)
    while time.perf_counter() - start < budget_s if max_steps is None else steps < max_steps:
        loss, _ = policy.forward(preprocessor(next(batches)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
        optimizer.step()
        steps += 1
        losses.append(loss.item())
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if steps == 5 and preset is not None and max_steps is None:  # a time budget:
            per_step = (time.perf_counter() - start) / steps  # its steps, estimated
            scheduler = preset.build(optimizer, max(10, int(budget_s / per_step)))
        if scheduler is not None:
            scheduler.step()
    seconds = time.perf_counter() - start
    progress.close()
    print(
        f"{name}: {steps} steps in {seconds / 60:.1f} min, loss {losses[0]:.3f} -> "
        f"{np.mean(losses[-20:]):.3f}",
        flush=True,
    )
    return {"steps": steps, "seconds": seconds, "loss_last": float(np.mean(losses[-20:]))}

"""The sampler: an action chunk from noise, in the head's denoising steps.

Each step runs the action head once on the chunk so far, conditioned on the context's
per-layer cache (computed once per chunk), the step's time and the state; the noise
schedule (:mod:`ditvla.policies.noise_schedules`) turns the prediction into the next
chunk (Euler for flow matching, DDIM for DDPM). Two options change the steps:

- **forecasting** (TaylorSeer, :mod:`ditvla.policies.forecasting`): some steps forecast
  the head's block features from earlier steps instead of computing them;
- **inpainting** (real-time chunking): each step moves its clean-action estimate towards
  actions that must be kept, by a weight per action (1: keep it, 0: free).

Everything here is in normalized action units; the policy normalizes and unnormalizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ditvla.contract import PolicyInputError
from ditvla.policies.dit_head import ContextCache, DiTActionHead
from ditvla.policies.forecasting import ForecastConfig, Forecaster
from ditvla.policies.noise_schedules import NoiseSchedule

Guide = Callable[[torch.Tensor], torch.Tensor]


def inpainting_guide(
    inpaint: tuple[Any, Any],
    shape: tuple[int, int, int],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> Guide:
    """The per-step guide of ``inpaint=(actions, weights)``: actions (B, H, A) or (H, A) in
    the robot's units (``normalize`` maps them to the head's), weights (B, H) or (H,) in
    [0, 1]; checked against the chunk ``shape`` (B, H, A)."""
    actions, weights = (torch.as_tensor(np.asarray(v, np.float32)) for v in inpaint)
    if actions.ndim == 2 and tuple(actions.shape) == shape[1:]:
        actions = actions.expand(shape)
    if weights.ndim == 1 and weights.shape[0] == shape[1]:
        weights = weights.expand(shape[:2])
    if tuple(actions.shape) != shape or tuple(weights.shape) != shape[:2]:
        raise PolicyInputError(
            f"inpaint actions {tuple(actions.shape)} / weights {tuple(weights.shape)} do not "
            f"fit chunks of shape {shape}"
        )
    if not (torch.isfinite(actions).all() and ((weights >= 0) & (weights <= 1)).all()):
        raise PolicyInputError("inpaint actions must be finite and weights in [0, 1]")
    target = normalize(actions.to(device))
    weights = weights.to(device)[..., None]
    return lambda x0: x0 + weights * (target - x0)


def forecaster_for(
    forecast: ForecastConfig, times: torch.Tensor, steps: int, blocks: int
) -> Forecaster | None:
    """The forecaster of one chunk's steps (None when forecasting is off); a step count
    too small to forecast anything is refused."""
    if forecast.mode == "off":
        return None
    if steps <= forecast.warmup:
        raise PolicyInputError(
            f"forecast {forecast.mode!r} runs every block for its first "
            f"{forecast.warmup} steps: with {steps} steps it forecasts nothing; use "
            f"more than {forecast.warmup} steps or forecast mode 'off'"
        )
    return Forecaster(forecast, times, blocks)


def sample_chunk(
    head: DiTActionHead,
    schedule: NoiseSchedule,
    cache: ContextCache,
    state: torch.Tensor | None,
    noise: torch.Tensor,
    steps: int,
    *,
    forecast: ForecastConfig,
    guide: Guide | None = None,
) -> tuple[torch.Tensor, Forecaster | None]:
    """Denoise ``noise`` (B, H, A) in ``steps`` steps from a context's ``cache`` and the
    normalized ``state`` (B, D) or None; returns the chunk (B, H, A), normalized, and the
    forecaster that ran (its step counts), if any. Differentiable (distillation trains a
    student through it)."""
    times = schedule.step_times(steps)
    conditions = head.condition_steps(times, state, noise.shape[0], cache.summary)
    forecaster = forecaster_for(forecast, times, steps, len(head.blocks))
    chunk = schedule.sample(
        lambda x, i: head(x, conditions[i], cache, forecaster=forecaster),
        noise,
        steps,
        guide=guide,
    )
    return chunk, forecaster

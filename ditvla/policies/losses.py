"""The training losses of a policy: what ``forward(batch)`` adds up.

- the **action loss**: the action head's denoising loss on demonstrated chunks (the noise
  schedule's training example: a noisy chunk at a random time and its target), padded
  steps left out;
- the **foresight loss** (when a foresight head is on): its flow-matching loss on the
  future motion image or the future frame's latents;
- the **auxiliary loss** (when auxiliary targets are set): mean squared error of the
  privileged arrays read out of the context.

Inputs are in the robot's units; the policy's normalizer maps them to the heads'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ditvla.contract import PolicyInputError
from ditvla.policies.inputs import image_batch

if TYPE_CHECKING:
    from ditvla.policies.policy import Context, DiTVLAPolicy


def action_loss(
    policy: DiTVLAPolicy, context: Context, state: Any, actions: Any, action_is_pad: Any
) -> torch.Tensor:
    """The denoising loss of chunks ``actions`` (B, H, A) from an encoded ``context``;
    ``state`` (B, D) (None for a policy without state), ``action_is_pad`` (B, H) marks
    padded steps."""
    config, device = policy.config, policy.device
    actions = torch.as_tensor(actions).to(device).float()
    if actions.shape[1:] != (config.horizon, config.action_dim):
        raise PolicyInputError(
            f"batch action has shape {tuple(actions.shape)}, expected "
            f"(B, {config.horizon}, {config.action_dim})"
        )
    state = policy.head_state(context, state)
    target_actions = policy.normalizer.normalize("action", actions)
    valid = ~torch.as_tensor(action_is_pad).to(device).bool()
    cache, n = context.cache, config.noise_samples
    if n > 1:  # several (noise, time) draws per observation: the backbone ran once
        target_actions, valid = (x.repeat_interleave(n, 0) for x in (target_actions, valid))
        state = None if state is None else state.repeat_interleave(n, 0)
        cache = cache.repeat_interleave(n)
    noise = torch.randn_like(target_actions)
    noisy, t, target = policy.schedule.training_example(target_actions, noise)
    prediction = policy.head(noisy, policy.head.condition(t, state, cache.summary), cache)
    error = (prediction - target) ** 2
    return (error.mean(-1) * valid).sum() / valid.sum().clamp(min=1)


def foresight_loss(
    policy: DiTVLAPolicy, targets: dict[str, Any], context: Context, pixels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """The foresight head's loss on ``targets``' ``motion`` (motion images) or
    ``future_image`` and ``future_is_pad`` (the camera's frame t + k)."""
    config, device = policy.config.foresight, policy.device
    frame = pixels[:, policy.config.cameras.index(config.camera)]
    needed = "motion" if config.kind == "motion" else "future_image"
    if needed not in targets:
        raise PolicyInputError(
            f"foresight is {config.kind!r} but the batch has no {needed!r} "
            "(a training batch carries it: 'motion', the optical flow from frame t to "
            "t + k as a motion image; 'future_image', the camera's frame t + k)"
        )
    if config.kind == "motion":
        target = targets["motion"].to(device).float()
        return policy.foresight.loss(context.tokens, context.mask, frame, target)
    future = image_batch({config.camera: targets["future_image"]}, [config.camera], None)
    valid = ~torch.as_tensor(targets["future_is_pad"], device=device).bool()
    return policy.foresight.loss(
        context.tokens, context.mask, frame, future[:, 0].to(device), valid, policy.backbone
    )


def auxiliary_loss(
    policy: DiTVLAPolicy, targets: dict[str, Any] | None, context: Context
) -> torch.Tensor:
    """Mean squared error of the auxiliary head's prediction of ``targets["auxiliary"]``
    (the privileged arrays, standardized)."""
    if not targets or "auxiliary" not in targets:
        raise PolicyInputError(
            f"the policy learns to predict {', '.join(policy.config.auxiliary_keys)} but "
            "the batch has no 'auxiliary' targets"
        )
    predicted = context.estimate
    if predicted is None:
        predicted = policy.auxiliary(context.tokens, context.mask)
    target = torch.as_tensor(targets["auxiliary"]).to(policy.device).float()
    return ((predicted - target) ** 2).mean()


def training_loss(
    policy: DiTVLAPolicy,
    pixels: torch.Tensor,
    instructions: list[str],
    state: torch.Tensor | None,
    actions: torch.Tensor,
    action_is_pad: torch.Tensor,
    targets: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the policy's losses, and each part as a metric."""
    pixels = pixels.to(policy.device).float()
    context = policy.encode_pixels(pixels, instructions)
    loss = action_loss(policy, context, state, actions, action_is_pad)
    metrics = {"action_loss": loss.item()}
    if policy.foresight is not None:
        part, foresight_metrics = foresight_loss(policy, targets or {}, context, pixels)
        loss = loss + policy.config.foresight.weight * part
        metrics.update(foresight_metrics)
    if policy.auxiliary is not None:
        part = auxiliary_loss(policy, targets, context)
        loss = loss + policy.config.auxiliary_weight * part
        metrics["auxiliary_loss"] = part.item()
    return loss, metrics

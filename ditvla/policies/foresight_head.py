"""The motion-foresight head: a DiT that predicts the coming motion, trained jointly.

It denoises a small motion image (the optical flow of one camera from frame t to t+k,
see :mod:`ditvla.datasets.motion_targets`) cut into patches — one token per patch —
cross-attending to the same backbone context as the action head, with a residual path
from the current frame: the frame's own patches are embedded and added to the tokens.
Trained by flow matching; its loss reaches the backbone, which so learns what moves
next. The policy never runs it in ``encode`` / ``act``: it costs nothing at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditvla.policies.dit_head import HEAD_PRESETS, ActionHeadConfig, DiTActionHead
from ditvla.policies.noise_schedules import FlowMatching


@dataclass
class ForesightConfig:
    """``kind``: off | motion. ``size``/``patch``: the motion image and its patches;
    ``k``/``method``/``camera``: which flow is the target; ``scale``: the targets'
    root-mean-square (filled in from the dataset) that the head normalizes by."""

    kind: str = "off"
    weight: float = 0.1
    k: int = 4
    method: str = "dis"
    camera: str = ""
    size: int = 16
    patch: int = 4
    head_size: str = "tiny"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("off", "motion"):
            raise ValueError(
                f"foresight must be 'off' or 'motion', got {self.kind!r} "
                "(future visual latents are not implemented yet)"
            )
        if self.size % self.patch:
            raise ValueError(f"foresight size {self.size} is not a multiple of patch {self.patch}")

    @property
    def enabled(self) -> bool:
        return self.kind != "off"


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, (S/p)^2, C*p*p)."""
    b, c, s, _ = images.shape
    n = s // patch
    x = images.reshape(b, c, n, patch, n, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, n * n, c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, (S/p)^2, C*p*p) -> (B, C, S, S)."""
    b, count, _ = tokens.shape
    n = math.isqrt(count)
    x = tokens.reshape(b, n, n, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, n * patch, n * patch)


class MotionForesightHead(nn.Module):
    def __init__(self, config: ForesightConfig, context_dim: int):
        super().__init__()
        self.config = config
        tokens = (config.size // config.patch) ** 2
        head = ActionHeadConfig(
            **HEAD_PRESETS[config.head_size],
            context_dim=context_dim,
            action_dim=2 * config.patch**2,
            horizon=tokens,
        )
        self.dit = DiTActionHead(head)
        self.frame_in = nn.Linear(3 * config.patch**2, head.width)
        self.schedule = FlowMatching()

    def _frame_tokens(self, frame: torch.Tensor) -> torch.Tensor:
        """Current camera frame (B, 3, H, W) in [0, 1] -> embedded patches (B, P, width)."""
        small = F.interpolate(frame, size=(self.config.size,) * 2, mode="area")
        return self.frame_in(patchify(small * 2 - 1, self.config.patch))

    def loss(
        self,
        context: torch.Tensor,
        mask: torch.Tensor,
        frame: torch.Tensor,
        target: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching loss for target motion images (B, S, S, 2) — rows with NaN (no
        future frame) left out; also the end-point error (motion-image pixels) of the
        one-step clean estimate, a cheap progress gauge."""
        valid = torch.isfinite(target).flatten(1).all(1)
        target = torch.nan_to_num(target)
        cache = self.dit.prepare_context(context, mask)
        clean = patchify(target.permute(0, 3, 1, 2), self.config.patch) / self.config.scale
        noise = torch.randn_like(clean)
        noisy, t, velocity = self.schedule.training_example(clean, noise)
        predicted = self.dit(noisy, self.dit.condition(t), cache, self._frame_tokens(frame))
        per_row = ((predicted - velocity) ** 2).flatten(1).mean(1)
        count = valid.sum()
        loss = (per_row * valid).sum() / count.clamp(min=1)
        with torch.no_grad():
            estimate = (noisy - t[:, None, None] * predicted) * self.config.scale
            estimate = unpatchify(estimate, self.config.patch, 2).permute(0, 2, 3, 1)
            epe = ((estimate - target).norm(dim=-1).flatten(1).mean(1) * valid).sum()
            epe = epe / count.clamp(min=1)
        return loss, {"foresight_loss": loss.item(), "foresight_epe_1step": epe.item()}

    @torch.no_grad()
    def predict(
        self, context: torch.Tensor, mask: torch.Tensor, frame: torch.Tensor, num_steps: int = 10
    ) -> torch.Tensor:
        """Sampled motion images (B, S, S, 2) in motion-image pixels."""
        cache = self.dit.prepare_context(context, mask)
        frame_tokens = self._frame_tokens(frame)
        b = context.shape[0]
        shape = (b, self.dit.config.horizon, self.dit.config.action_dim)
        conditions = self.dit.condition_steps(self.schedule.step_times(num_steps), None, b)
        tokens = self.schedule.sample(
            lambda x, i: self.dit(x, conditions[i], cache, frame_tokens),
            torch.randn(shape, device=context.device),
            num_steps,
        )
        return unpatchify(tokens * self.config.scale, self.config.patch, 2).permute(0, 2, 3, 1)

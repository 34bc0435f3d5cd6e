"""Foresight heads: DiTs that predict what comes next, trained jointly, never run at inference.

Both denoise a set of target tokens with the action head's DiT class, cross-attending to
the same backbone context as the action head, with a residual path from the current
frame (its own tokens embedded and added to the noisy ones), trained by flow matching.
Their loss reaches the backbone, which so learns dynamics. The policy never runs them in
``encode`` / ``act``: they cost nothing at inference.

- ``motion`` (joint motion-image diffusion): the target is a small motion image — the
  optical flow of one camera from frame t to t+k (computed on the data side)
  — cut into patches, one token per patch; the residual path embeds the current frame's
  pixel patches. Metric: end-point error of the one-step estimate.
- ``latent`` (Mantis-style future visual state): the target is the frozen vision
  encoder's features of frame t+k, average-pooled to a ``grid`` x ``grid`` token map and
  layer-normalized per token; the residual path embeds the current frame's features from
  the same frozen encoder. The frozen encoder is a copy of the backbone's vision encoder
  taken when the policy is built (the pretrained one for a real checkpoint), kept in the
  head's weights so that resumed runs and saved policies see the same targets. Metric:
  cosine similarity of the one-step estimate to the target.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ditvla.errors import ConfigError
from ditvla.policies.dit_head import HEAD_PRESETS, ActionHeadConfig, DiTActionHead
from ditvla.policies.noise_schedules import FlowMatching

ForesightKind = Literal["off", "motion", "latent"]
KINDS = get_args(ForesightKind)


@dataclass
class ForesightConfig:
    """The foresight head, trained jointly with the action head and skipped at inference.

    Args:
        kind: off, motion (optical flow t -> t+k as a small motion image) or latent (the
            frozen vision encoder's pooled features of frame t+k, Mantis-style).
        weight: its loss weight beside the action loss.
        k: frames ahead.
        method: motion: the optical flow, dis or farneback.
        camera: the camera it predicts (default: the policy's first).
        size / patch: motion: the motion image's side and its patches' side.
        grid: latent: the side of the pooled feature map.
        head_size: its DiT's size preset (tiny, small, base, large).
    """

    filled_in: ClassVar[tuple[str, ...]] = ("scale",)

    kind: ForesightKind = "off"
    weight: float = 0.1
    k: int = 4
    method: str = "dis"
    camera: str = ""
    size: int = 16
    patch: int = 4
    grid: int = 4
    head_size: str = "tiny"
    scale: float = 1.0  # motion: the targets' root-mean-square, from the data

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"foresight must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.size % self.patch:
            raise ConfigError(f"foresight size {self.size} is not a multiple of patch {self.patch}")

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


class _ForesightDiT(nn.Module):
    """A DiT over ``tokens`` target tokens of ``dim`` channels, with a residual input of
    ``residual_dim`` channels per token, trained by flow matching."""

    def __init__(
        self, config: ForesightConfig, context_dim: int, tokens: int, dim: int, residual_dim: int
    ):
        super().__init__()
        self.config = config
        head = ActionHeadConfig(
            **HEAD_PRESETS[config.head_size],
            context_dim=context_dim,
            action_dim=dim,
            horizon=tokens,
        )
        self.dit = DiTActionHead(head)
        self.frame_in = nn.Linear(residual_dim, head.width)
        self.schedule = FlowMatching()

    def _flow_loss(
        self,
        context: torch.Tensor,
        mask: torch.Tensor,
        residual: torch.Tensor,
        clean: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-matching loss over the valid rows, and the one-step clean estimate."""
        cache = self.dit.prepare_context(context, mask)
        noise = torch.randn_like(clean)
        noisy, t, velocity = self.schedule.training_example(clean, noise)
        predicted = self.dit(noisy, self.dit.condition(t), cache, self.frame_in(residual))
        per_row = ((predicted - velocity) ** 2).flatten(1).mean(1)
        loss = (per_row * valid).sum() / valid.sum().clamp(min=1)
        with torch.no_grad():
            estimate = noisy - t[:, None, None] * predicted
        return loss, estimate

    @torch.no_grad()
    def _sample(
        self, context: torch.Tensor, mask: torch.Tensor, residual: torch.Tensor, num_steps: int
    ) -> torch.Tensor:
        cache = self.dit.prepare_context(context, mask)
        residual_tokens = self.frame_in(residual)
        b = context.shape[0]
        shape = (b, self.dit.config.horizon, self.dit.config.action_dim)
        conditions = self.dit.condition_steps(self.schedule.step_times(num_steps), None, b)
        return self.schedule.sample(
            lambda x, i: self.dit(x, conditions[i], cache, residual_tokens),
            torch.randn(shape, device=context.device),
            num_steps,
        )


class MotionForesightHead(_ForesightDiT):
    """Predicts the motion image (optical flow t -> t+k) of one camera."""

    def __init__(self, config: ForesightConfig, context_dim: int):
        p = config.patch
        super().__init__(config, context_dim, (config.size // p) ** 2, 2 * p * p, 3 * p * p)

    def _frame_patches(self, frame: torch.Tensor) -> torch.Tensor:
        """Current camera frame (B, 3, H, W) in [0, 1] -> patches (B, P, 3 * patch^2)."""
        small = F.interpolate(frame, size=(self.config.size,) * 2, mode="area")
        return patchify(small * 2 - 1, self.config.patch)

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
        clean = patchify(target.permute(0, 3, 1, 2), self.config.patch) / self.config.scale
        loss, estimate = self._flow_loss(context, mask, self._frame_patches(frame), clean, valid)
        estimate = unpatchify(estimate * self.config.scale, self.config.patch, 2)
        epe = (estimate.permute(0, 2, 3, 1) - target).norm(dim=-1).flatten(1).mean(1)
        epe = (epe * valid).sum() / valid.sum().clamp(min=1)
        return loss, {"foresight_loss": loss.item(), "foresight_epe_1step": epe.item()}

    @torch.no_grad()
    def predict(
        self, context: torch.Tensor, mask: torch.Tensor, frame: torch.Tensor, num_steps: int = 10
    ) -> torch.Tensor:
        """Sampled motion images (B, S, S, 2) in motion-image pixels."""
        tokens = self._sample(context, mask, self._frame_patches(frame), num_steps)
        return unpatchify(tokens * self.config.scale, self.config.patch, 2).permute(0, 2, 3, 1)


class LatentForesightHead(_ForesightDiT):
    """Predicts the frozen vision encoder's pooled features of frame t+k of one camera.

    Args:
        backbone: the policy's backbone; its vision encoder is copied and frozen here
            (a pretrained encoder that is frozen already is read as it is, not copied).
    """

    def __init__(self, config: ForesightConfig, context_dim: int, backbone: Any):
        vision_width = backbone.vision_feature_width
        super().__init__(config, context_dim, config.grid**2, vision_width, vision_width)
        self.target_encoder: nn.Module | None = None
        if not backbone.config.vision_encoder:
            self.target_encoder = copy.deepcopy(backbone.vision).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LatentForesightHead:
        super().train(mode)
        if self.target_encoder is not None:
            self.target_encoder.eval()  # frozen: no dropout, fixed statistics
        return self

    @torch.no_grad()
    def latents(self, frames: torch.Tensor, backbone: Any) -> torch.Tensor:
        """Frames (B, 3, H, W) in [0, 1] -> target tokens (B, grid^2, vision width), through
        the backbone's preprocessing and the frozen encoder."""
        hidden = backbone.vision_features(frames, vision=self.target_encoder).float()
        b, n, d = hidden.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"the vision encoder gives {n} patches, not a square grid")
        grid = hidden.transpose(1, 2).reshape(b, d, side, side)
        pooled = F.adaptive_avg_pool2d(grid, self.config.grid).flatten(2).transpose(1, 2)
        return F.layer_norm(pooled, (d,))

    def loss(
        self,
        context: torch.Tensor,
        mask: torch.Tensor,
        frame: torch.Tensor,
        future: torch.Tensor,
        future_valid: torch.Tensor,
        backbone: Any,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching loss for the latents of ``future`` frames (B, 3, H, W); rows whose
        frame t+k lies beyond the episode (``future_valid`` False) are left out. Also the
        cosine similarity of the one-step clean estimate to the target."""
        target = self.latents(future, backbone)
        loss, estimate = self._flow_loss(
            context, mask, self.latents(frame, backbone), target, future_valid.float()
        )
        cosine = F.cosine_similarity(estimate, target, dim=-1).mean(1)
        cosine = (cosine * future_valid).sum() / future_valid.sum().clamp(min=1)
        return loss, {"foresight_loss": loss.item(), "foresight_cosine_1step": cosine.item()}

    @torch.no_grad()
    def predict(
        self,
        context: torch.Tensor,
        mask: torch.Tensor,
        frame: torch.Tensor,
        backbone: Any,
        num_steps: int = 10,
    ) -> torch.Tensor:
        """Sampled future latents (B, grid^2, vision width)."""
        return self._sample(context, mask, self.latents(frame, backbone), num_steps)

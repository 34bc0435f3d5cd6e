"""The composed policy: VLM backbone (System 2) + DiT action head (System 1).

The two halves run at different rates in deployment::

    context = policy.encode(observation)      # slow: VLM over cameras + instruction
    chunk = policy.act(context, state)        # fast: DiT denoises (B, H, A) actions

and the LeRobot-shaped API sits on top: ``reset``, ``select_action`` (served from a queue
of chunks), ``predict_action_chunk``, ``forward(batch) -> (loss, metrics)``,
``save_pretrained`` / ``from_pretrained``.

This class is thin: it owns the modules (backbone, heads, normalizer) and the API. Its
jobs live in rooms named for them: the configuration and presets in
:mod:`~ditvla.policies.config`, checking and batching observations in
:mod:`~ditvla.policies.inputs`, the sampler (forecasting, inpainting) in
:mod:`~ditvla.policies.sampler`, the training losses in :mod:`~ditvla.policies.losses`,
the folder format in :mod:`~ditvla.policies.checkpoint`.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditvla.contract import (
    STAT_NAMES,
    CheckpointError,
    HeadDType,
    PolicyInputError,
    PolicySpec,
    Stats,
)
from ditvla.errors import ConfigError
from ditvla.policies import checkpoint, losses, system_split
from ditvla.policies.auxiliary_head import AuxiliaryHead
from ditvla.policies.backbone import VLMBackbone
from ditvla.policies.config import PolicyConfig
from ditvla.policies.dit_head import ActionHeadConfig, ContextCache, DiTActionHead
from ditvla.policies.forecasting import ForecastConfig, Forecaster
from ditvla.policies.foresight_head import LatentForesightHead, MotionForesightHead
from ditvla.policies.inputs import as_batch, image_batch, pixels_fit, state_batch
from ditvla.policies.noise_schedules import make_schedule
from ditvla.policies.normalizer import CONSTANT_SPREAD, Normalizer
from ditvla.policies.quantization import head_dtype
from ditvla.policies.sampler import inpainting_guide, sample_chunk


@dataclass
class Context:
    """What ``encode`` returns: VLM tokens and mask, and the head's per-layer cache."""

    tokens: torch.Tensor  # (B, L, width)
    mask: torch.Tensor  # (B, L)
    cache: ContextCache
    # the auxiliary head's prediction (B, auxiliary_dim) when it conditions the action head
    estimate: torch.Tensor | None = None


class DiTVLAPolicy(nn.Module):
    """VLM backbone + DiT action head (+ foresight and auxiliary heads in training), with
    normalization inside."""

    def __init__(self, config: PolicyConfig, stats: Stats | None = None, **saved: Any):
        """``saved``: a saved policy's ``vlm_config``, ``tokenizer`` and ``reader_files``
        (see :class:`VLMBackbone`)."""
        super().__init__()
        if config.action_dim <= 0:
            raise ValueError("config.action_dim must be set (PolicyConfig.for_data does it)")
        self.config = config
        self.backbone = VLMBackbone(config.backbone, **saved)
        self.head = DiTActionHead(_head_config(config, self.backbone.width))
        self.schedule = make_schedule(config.objective, config.num_train_timesteps)
        modes = {"action": config.action_norm}
        if config.state_dim:
            modes["state"] = config.state_norm
        self.normalizer = Normalizer(stats or _identity_stats(config), modes)
        # an action dimension the demonstrations never moved comes out at its one value
        fixed, values = fixed_actions(config)
        self.register_buffer("fixed_actions", fixed, persistent=False)
        self.register_buffer("fixed_action_values", values, persistent=False)
        # trained jointly, never run by encode / act / select_action
        self.foresight: MotionForesightHead | LatentForesightHead | None = None
        if config.foresight.kind == "motion":
            self.foresight = MotionForesightHead(config.foresight, self.backbone.width)
        elif config.foresight.kind == "latent":
            self.foresight = LatentForesightHead(
                config.foresight, self.backbone.width, self.backbone
            )
        self.auxiliary: AuxiliaryHead | None = None
        if config.auxiliary_keys:
            self.auxiliary = AuxiliaryHead(
                self.backbone.width, config.auxiliary_dim, config.auxiliary_pooling
            )
        self._queue: deque[torch.Tensor] = deque()
        self.last_forecaster: Forecaster | None = None  # the last chunk's (its step counts)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def noise_shape(self) -> tuple[int, int]:
        """One row of ``act``'s initial noise: (horizon, action_dim). The evaluator draws
        it from a generator per episode, so rollouts do not depend on batching."""
        return self.config.horizon, self.config.action_dim

    @property
    def spec(self) -> PolicySpec:
        """What this policy reads and returns (the contract the evaluator and runtime use)."""
        c = self.config
        return PolicySpec(
            cameras=tuple(c.cameras),
            image_size=c.image_size,
            state_dim=c.state_dim,
            action_dim=c.action_dim,
            horizon=c.horizon,
            n_action_steps=c.n_action_steps,
            state_keys=tuple(c.state_keys),
            noise_shape=self.noise_shape,
            action_low=tuple(c.action_range[0]) if c.action_range else None,
            action_high=tuple(c.action_range[1]) if c.action_range else None,
        )

    def set_head_dtype(self, name: HeadDType) -> None:
        """Run the action head (``act``'s every denoising step) in ``name``, one of
        ``HeadDType``, for inference. bfloat16 halves the weights a step reads: on CPUs
        with AVX512-BF16 or AMX, and on GPUs, ``act`` gets faster (measure it:
        ``bench/head_acceleration.py``); on CPUs without them it gets slower. The sampler
        still integrates in float32, the normalizer and the backbone are untouched, and
        ``save_pretrained`` writes float32."""
        self.head.to(head_dtype(self.head, name))

    # ------------------------------------------------------------------ two halves
    @torch.no_grad()
    def encode(self, observation: dict[str, Any]) -> Context:
        """The slow half: cameras + instruction through the VLM -> context (and its cache)."""
        return self.context_from(*self.vlm_tokens(observation))

    @torch.no_grad()
    def vlm_tokens(self, observation: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """System 2's share of ``encode``: the VLM's tokens (B, L, width) and mask (B, L),
        without the head's cache (``context_from`` builds it where the head runs)."""
        self.eval()
        batch, _ = as_batch(observation, needs_state=False)
        images = image_batch(batch["images"], self.config.cameras, self.config.image_size)
        return self.pixel_tokens(images, batch["instruction"])

    def encode_pixels(self, pixels: torch.Tensor, instructions: list[str]) -> Context:
        """``encode`` from frames already in the model's layout: ``pixels`` float (B,
        cameras, 3, S, S) in [0, 1], cameras in ``config.cameras`` order (what adapters
        such as the LeRobot plugin hand over)."""
        return self.context_from(*self.pixel_tokens(pixels, instructions))

    def pixel_tokens(self, pixels: torch.Tensor, instructions: list[str]) -> tuple[Any, Any]:
        """``vlm_tokens`` from frames in the model's layout (as for ``encode_pixels``)."""
        pixels_fit(pixels, instructions, len(self.config.cameras), self.config.image_size)
        ids, text_mask = self.backbone.tokenize(list(instructions), self.device)
        return self.backbone(pixels.to(self.device).float(), ids, text_mask)

    def keep_only(self, system: system_split.System) -> dict[str, int]:
        """Release the parts the other runtime system runs, in place (serving only: see
        :mod:`~ditvla.policies.system_split`); the bytes of weights kept and released."""
        return system_split.keep_only(self, system)

    def context_from(self, tokens: torch.Tensor, mask: torch.Tensor) -> Context:
        """A context from VLM tokens (B, L, width) and mask (B, L) computed elsewhere (the
        runtime's System 2 process): the head's per-layer cache is built here."""
        tokens, mask = tokens.to(self.device), mask.to(self.device).bool()
        cache = self.head.prepare_context(tokens, mask, trim_padding=True)
        estimate = self.auxiliary(tokens, mask) if self.config.auxiliary_input else None
        return Context(tokens, mask, cache, estimate)

    @torch.no_grad()
    def act(self, context: Context, state: Any = None, **options: Any) -> torch.Tensor:
        """The fast half: denoise an action chunk (B, H, A), in the robot's units:
        :meth:`denoise` (whose keyword options it takes), unnormalized, without gradients.
        Dimensions whose training actions were one value throughout are that value."""
        actions = self.normalizer.unnormalize("action", self.denoise(context, state, **options))
        return torch.where(self.fixed_actions, self.fixed_action_values, actions)

    def denoise(
        self,
        context: Context,
        state: Any = None,
        *,
        noise: torch.Tensor | None = None,
        num_steps: int | None = None,
        inpaint: tuple[Any, Any] | None = None,
        forecast: ForecastConfig | None = None,
    ) -> torch.Tensor:
        """Denoise an action chunk (B, H, A) in normalized action units, differentiably
        (distillation trains a student through it); ``state`` (B, D) or (D,) in the
        robot's units. Options, as :mod:`ditvla.policies.sampler` describes them:
        ``noise`` (B, H, A), ``num_steps`` (default: the config's), ``inpaint=(actions,
        weights)`` (real-time chunking), ``forecast`` (default: the config's)."""
        self.eval()
        shape = (context.tokens.shape[0], *self.noise_shape)
        if noise is None:
            noise = torch.randn(shape, device=self.device)
        elif tuple(noise.shape) != shape:
            raise PolicyInputError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        steps = num_steps or self.config.num_inference_steps
        refusal = self.config.steps_refusal(steps)
        if refusal:
            raise PolicyInputError(refusal)
        guide = None
        if inpaint is not None:
            normalize = functools.partial(self.normalizer.normalize, "action")
            guide = inpainting_guide(inpaint, shape, normalize, self.device)
        chunk, self.last_forecaster = sample_chunk(
            self.head,
            self.schedule,
            context.cache,
            self.head_state(context, state),
            noise.to(self.device),
            steps,
            forecast=forecast or self.config.forecast,
            guide=guide,
        )
        return chunk

    def head_state(self, context: Context, state: Any) -> torch.Tensor | None:
        """What the action head reads beside the context: the normalized state, and the
        auxiliary head's prediction when it conditions the head; None for neither."""
        parts = [self.normalized_state(state), context.estimate]
        parts = [part for part in parts if part is not None]
        return torch.cat(parts, dim=-1) if parts else None

    def normalized_state(self, state: Any) -> torch.Tensor | None:
        """``state`` (B, D) or (D,) in the robot's units, checked and normalized; None for
        a policy that reads no state."""
        if not self.config.state_dim:
            return None
        raw = state_batch(state, self.config.state_dim).to(self.device)
        return self.normalizer.normalize("state", raw)

    # ------------------------------------------------------------------ LeRobot API
    def reset(self) -> None:
        """Forget queued actions (call at the start of an episode)."""
        self._queue.clear()

    def predict_action_chunk(self, observation: dict[str, Any], **kwargs: Any) -> torch.Tensor:
        """encode + act: (B, H, A), or (H, A) for a single observation."""
        batch, single = as_batch(observation, needs_state=bool(self.config.state_dim))
        context = self.encode(batch)
        chunk = self.act(context, batch.get("state"), **kwargs)
        return chunk[0] if single else chunk

    def select_action(self, observation: dict[str, Any]) -> torch.Tensor:
        """The next action (A,) for one observation; a new chunk every n_action_steps."""
        if not self._queue:
            chunk = self.predict_action_chunk(observation)
            self._queue.extend(chunk[: self.config.n_action_steps])
        return self._queue.popleft()

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss of a dataset batch (ReplayBufferDataset samples, collated): the
        last observation step; padded action steps are left out of the loss."""
        images = {cam: v[:, -1] for cam, v in batch["images"].items()}
        pixels = image_batch(images, self.config.cameras, self.config.image_size)
        state = batch["state"][:, -1] if self.config.state_dim else None
        return self.compute_loss(
            pixels, batch["instruction"], state, batch["action"], batch["action_is_pad"], batch
        )

    def compute_loss(
        self,
        pixels: torch.Tensor,
        instructions: list[str],
        state: torch.Tensor | None,
        actions: torch.Tensor,
        action_is_pad: torch.Tensor,
        targets: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss from tensors in the robot's units (:mod:`ditvla.policies.losses`):
        ``pixels`` as for :meth:`encode_pixels`, ``state`` (B, D), ``actions`` (B, H, A),
        ``action_is_pad`` (B, H); ``targets`` carries the foresight head's and the
        auxiliary head's."""
        return losses.training_loss(
            self, pixels, instructions, state, actions, action_is_pad, targets
        )

    def action_loss(
        self, context: Context, state: Any, actions: Any, action_is_pad: Any
    ) -> torch.Tensor:
        """The action head's denoising loss of demonstrated chunks (see
        :func:`ditvla.policies.losses.action_loss`)."""
        return losses.action_loss(self, context, state, actions, action_is_pad)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | Path, **options: Any) -> None:
        """Write the policy folder (:mod:`ditvla.policies.checkpoint`) atomically;
        ``options``: ``drop_foresight``, ``quantization``, ``state``."""
        checkpoint.save_policy(self, folder, **options)

    def write_files(self, folder: Path, **options: Any) -> None:
        """The folder's files written into an existing ``folder`` in place (for a caller
        that owns the folder, such as LeRobot's checkpointing)."""
        checkpoint.write_policy_files(self, folder, **options)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, map_location: str | torch.device = "cpu"
    ) -> DiTVLAPolicy:
        """Load a folder written by :meth:`save_pretrained` (no network access)."""
        return checkpoint.load_policy_folder(cls, folder, map_location)


def _head_config(config: PolicyConfig, context_width: int) -> ActionHeadConfig:
    """The action head's config, completed from the policy's: the context's width, what it
    reads beside the context (the state, and the auxiliary prediction when asked), the
    actions' width and the chunk's length."""
    if config.auxiliary_input and not config.auxiliary_keys:
        raise ConfigError(
            "auxiliary_input: the action head reads the auxiliary head's "
            "prediction, so auxiliary targets are needed (--auxiliary ...)"
        )
    head = config.head
    head.context_dim, head.state_dim = context_width, config.state_dim
    head.state_dim += config.auxiliary_dim if config.auxiliary_input else 0
    head.action_dim, head.horizon = config.action_dim, config.horizon
    return head


def fixed_actions(config: PolicyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Which action dimensions the demonstrations never moved (a gripper left alone), and
    their one value: no normalizer can scale a zero spread, so the model's error on them
    would pass through unscaled (and beyond the limits a controller enforces)."""
    fixed = torch.zeros(config.action_dim, dtype=torch.bool)
    values = torch.zeros(config.action_dim)
    if config.action_range:
        low, high = (torch.tensor(v, dtype=torch.float32) for v in config.action_range)
        fixed, values = high - low < CONSTANT_SPREAD, low
    return fixed, values


def _identity_stats(config: PolicyConfig) -> Stats:
    """Statistics that normalize nothing: centre 0, scale 1 in every mode."""
    unit = dict(zip(STAT_NAMES, (0.0, 1.0, -1.0, 1.0, -1.0, 1.0), strict=True))

    def stats(dim: int) -> dict[str, list[float]]:
        return {name: [value] * dim for name, value in unit.items()}

    return {"action": stats(config.action_dim), "state": stats(config.state_dim)}


def dit_policy(policy: Any, folder: str | Path, command: str) -> DiTVLAPolicy:
    """``policy`` (loaded from ``folder``) if it is a DiT diffusion policy, what
    ``command`` works on (its sampler, normalizer and head); else CheckpointError."""
    if not isinstance(policy, DiTVLAPolicy):
        raise CheckpointError(
            f"{folder}: {command} needs a ditvla diffusion policy folder, not a "
            f"{type(policy).__name__}"
        )
    return policy

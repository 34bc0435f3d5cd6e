"""The composed policy: VLM backbone (System 2) + DiT action head (System 1).

The two halves run at different rates in deployment::

    context = policy.encode(observation)      # slow: VLM over cameras + instruction
    chunk = policy.act(context, state)        # fast: DiT denoises (B, H, A) actions

and the LeRobot-shaped API sits on top: ``reset``, ``select_action`` (served from a queue
of chunks), ``predict_action_chunk``, ``forward(batch) -> (loss, metrics)``,
``save_pretrained`` / ``from_pretrained`` (config JSON + safetensors with the
normalization statistics: one folder is a complete policy).

Observations are ``{"images": {camera: uint8 (H, W, 3)}, "state": float32 (D,),
"instruction": str}``, or batched with a leading B on arrays and a list of instructions.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_args

import numpy as np
import torch
from torch import nn

from ditvla.contract import (
    STAT_NAMES,
    CheckpointError,
    DataSpec,
    HeadDType,
    PolicyInputError,
    PolicySpec,
    Stats,
)
from ditvla.policies import lerobot_layout
from ditvla.policies.backbone import BackboneConfig, VLMBackbone
from ditvla.policies.dit_head import HEAD_PRESETS, ActionHeadConfig, ContextCache, DiTActionHead
from ditvla.policies.forecasting import ForecastConfig, Forecaster
from ditvla.policies.foresight_head import (
    ForesightConfig,
    LatentForesightHead,
    MotionForesightHead,
)
from ditvla.policies.noise_schedules import Objective, make_schedule
from ditvla.policies.normalizer import CONSTANT_SPREAD, Normalizer, NormMode
from ditvla.policies.pooling import masked_mean

# tiny presets of the other VLM families: preset name -> family
TINY_VLM_PRESETS = {"tiny-paligemma": "paligemma", "tiny-qwen": "qwen2_5_vl"}
POLICY_FORMAT = "ditvla.policy"
POLICY_FORMAT_VERSION = 1
# A quantized policy: float weights (corrections folded in) + the recipe that re-quantizes
# them at load. Format 1 readers refuse it with "upgrade ditvla".
QUANTIZED_FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The torch dtype of each name an action head can compute in (``set_head_dtype``).
HEAD_DTYPES = {name: getattr(torch, name) for name in get_args(HeadDType)}
VLM_FOLDER = "vlm"


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a policy (saved as config.json).

    The inputs (``filled_in``) come from the data: :func:`PolicyConfig.for_data` sets them
    from a :class:`~ditvla.contract.DataSpec`.

    Args:
        cameras: camera names the policy reads.
        image_size: square side of the camera frames.
        state_dim / action_dim: widths of the state and the actions.
        state_keys: the data arrays that make up the state, in order.
        action_range: the training actions' per-dimension minimum and maximum.
        horizon: actions per chunk.
        n_action_steps: actions executed per chunk before the next (0: half the horizon).
        objective: flow_matching (Euler sampling) or ddpm (DDIM sampling).
        num_inference_steps: denoising steps per chunk at inference.
        num_train_timesteps: ddpm: the training noise levels.
        noise_samples: (noise, time) draws per training observation: the backbone runs
            once per observation, the action head once per draw.
        state_norm / action_norm: mean_std, min_max, quantile or identity.
        auxiliary_keys: privileged arrays (e.g. goal) that an auxiliary head predicts from
            the VLM's context in training only, so that the backbone learns to encode them
            (asymmetric supervision); the policy never reads them. Set by ``ditvla train
            --auxiliary``.
        auxiliary_dim: their total width.
        auxiliary_weight: the auxiliary loss's weight.
        forecast: feature forecasting in the sampler (TaylorSeer; off by default).
        distilled_steps: a few-step student's step count (``ditvla distill``): its head
            was trained to sample in that many steps, and more are refused; 0 for a
            policy trained on demonstrations, which samples with any count.
    """

    filled_in: ClassVar[tuple[str, ...]] = (
        "cameras",
        "image_size",
        "state_dim",
        "action_dim",
        "state_keys",
        "action_range",
        "auxiliary_keys",
        "auxiliary_dim",
        "distilled_steps",
    )

    cameras: list[str] = field(default_factory=list)
    image_size: int = 64
    state_dim: int = 0
    action_dim: int = 0
    state_keys: list[str] = field(default_factory=lambda: ["state"])
    action_range: list[list[float]] = field(default_factory=list)
    horizon: int = 16
    n_action_steps: int = 0
    objective: Objective = "flow_matching"
    num_inference_steps: int = 10
    num_train_timesteps: int = 100
    noise_samples: int = 1
    state_norm: NormMode = "mean_std"
    action_norm: NormMode = "mean_std"
    auxiliary_keys: list[str] = field(default_factory=list)
    auxiliary_dim: int = 0
    auxiliary_weight: float = 1.0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: ActionHeadConfig = field(default_factory=ActionHeadConfig)
    foresight: ForesightConfig = field(default_factory=ForesightConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    distilled_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        if isinstance(self.head, dict):
            self.head = ActionHeadConfig(**self.head)
        if isinstance(self.foresight, dict):
            self.foresight = ForesightConfig(**self.foresight)
        if isinstance(self.forecast, dict):
            self.forecast = ForecastConfig(**self.forecast)
        if self.foresight.enabled and self.cameras:
            self.foresight.camera = self.foresight.camera or self.cameras[0]
            if self.foresight.camera not in self.cameras:
                raise ValueError(
                    f"foresight camera {self.foresight.camera!r} is not one of {self.cameras}"
                )
        make_schedule(self.objective)  # validates the name
        if self.n_action_steps == 0:
            self.n_action_steps = max(1, self.horizon // 2)
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(
                f"n_action_steps must be in 1..horizon ({self.horizon}), got {self.n_action_steps}"
            )
        if self.noise_samples < 1:
            raise ValueError(f"noise_samples must be >= 1, got {self.noise_samples}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.distilled_steps < 0:
            raise ValueError(f"distilled_steps must be >= 0, got {self.distilled_steps}")
        refusal = self.steps_refusal(self.num_inference_steps)
        if refusal:
            raise ValueError(f"num_inference_steps: {refusal}")

    def steps_refusal(self, steps: int) -> str | None:
        """Why this policy cannot sample with ``steps`` denoising steps (a few-step student
        asked for more than it learned), or None."""
        if self.distilled_steps and steps > self.distilled_steps:
            return (
                f"this policy is a {self.distilled_steps}-step student (ditvla distill): it "
                f"samples with at most {self.distilled_steps} steps, not {steps}; for more "
                "steps use its teacher"
            )
        return None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PolicyConfig:
        """``tiny`` (tiny Idefics3 VLM + tiny head: the CPU default), ``tiny-paligemma``,
        ``tiny-qwen`` (tiny Qwen2.5-VL), or a head size (``small``, ``base``, ``large``)
        over the tiny Idefics3 VLM."""
        family = TINY_VLM_PRESETS.get(name, "idefics3")
        head_size = "tiny" if name in ("tiny", *TINY_VLM_PRESETS) else name
        if head_size not in HEAD_PRESETS:
            raise ValueError(
                f"unknown policy preset {name!r}; choose tiny, "
                + ", ".join([*TINY_VLM_PRESETS, *(k for k in HEAD_PRESETS if k != "tiny")])
            )
        backbone = BackboneConfig(family=family, **overrides.pop("backbone", {}))
        head = ActionHeadConfig(**{**HEAD_PRESETS[head_size], **overrides.pop("head", {})})
        foresight = ForesightConfig(**overrides.pop("foresight", {}))
        return cls(backbone=backbone, head=head, foresight=foresight, **overrides)

    @classmethod
    def for_data(cls, data: DataSpec, preset: str = "tiny", **overrides: Any) -> PolicyConfig:
        """A preset sized to the data: its cameras, image size and state/action widths."""
        return cls.preset(
            preset,
            cameras=list(data.cameras),
            image_size=data.image_size,
            state_dim=data.state_dim,
            action_dim=data.action_dim,
            state_keys=list(data.state_keys),
            action_range=[data.stats["action"]["min"], data.stats["action"]["max"]]
            if "action" in data.stats
            else [],
            **overrides,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _image_batch(images: dict[str, Any], cameras: list[str], size: int | None) -> torch.Tensor:
    """{camera: uint8 (B, H, W, 3)} -> float (B, cameras, 3, H, W) in [0, 1], validated."""
    frames = []
    for cam in cameras:
        if cam not in images:
            raise PolicyInputError(
                f"observation is missing camera {cam!r} (expected cameras: {', '.join(cameras)})"
            )
        x = torch.as_tensor(
            np.asarray(images[cam]) if not torch.is_tensor(images[cam]) else images[cam]
        )
        if x.ndim != 4 or x.shape[-1] != 3 or (size and tuple(x.shape[1:3]) != (size, size)):
            expected = f"(B, {size}, {size}, 3)" if size else "(B, H, W, 3)"
            raise PolicyInputError(
                f"images[{cam!r}] has shape {tuple(x.shape)}, expected {expected} uint8"
            )
        if x.dtype != torch.uint8:
            raise PolicyInputError(f"images[{cam!r}] has dtype {x.dtype}, expected uint8")
        frames.append(x.permute(0, 3, 1, 2))
    return torch.stack(frames, dim=1).float() / 255.0


def _float_batch(value: Any, name: str, dim: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value).float()
    if x.ndim != 2 or x.shape[1] != dim:
        raise PolicyInputError(f"{name} has shape {tuple(x.shape)}, expected (B, {dim})")
    if not torch.isfinite(x).all():
        raise PolicyInputError(f"{name} holds NaN or infinite values")
    return x


@dataclass
class Context:
    """What ``encode`` returns: VLM tokens and mask, and the head's per-layer cache."""

    tokens: torch.Tensor  # (B, L, width)
    mask: torch.Tensor  # (B, L)
    cache: ContextCache


class DiTVLAPolicy(nn.Module):
    """VLM backbone + DiT action head, with normalization inside."""

    def __init__(
        self, config: PolicyConfig, stats: Stats | None = None, *, vlm_config=None, tokenizer=None
    ):
        super().__init__()
        if config.action_dim <= 0:
            raise ValueError("config.action_dim must be set (PolicyConfig.for_dataset does it)")
        self.config = config
        self.backbone = VLMBackbone(config.backbone, vlm_config=vlm_config, tokenizer=tokenizer)
        head = config.head
        head.context_dim, head.state_dim = self.backbone.width, config.state_dim
        head.action_dim, head.horizon = config.action_dim, config.horizon
        self.head = DiTActionHead(head)
        self.schedule = make_schedule(config.objective, config.num_train_timesteps)
        stats = stats or _identity_stats(config)
        modes = {"action": config.action_norm}
        if config.state_dim:
            modes["state"] = config.state_norm
        self.normalizer = Normalizer(stats, modes)
        # an action dimension the demonstrations never moved (a gripper left alone) comes
        # out at its one value: no normalizer can scale a zero spread, so the model's error
        # on it would pass through unscaled (and beyond the limits a controller enforces)
        fixed = torch.zeros(config.action_dim, dtype=torch.bool)
        values = torch.zeros(config.action_dim)
        if config.action_range:
            low, high = (torch.tensor(v, dtype=torch.float32) for v in config.action_range)
            fixed, values = high - low < CONSTANT_SPREAD, low
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
        # trained jointly, never run by encode / act: privileged targets from the context
        self.auxiliary: AuxiliaryHead | None = None
        if config.auxiliary_keys:
            self.auxiliary = AuxiliaryHead(self.backbone.width, config.auxiliary_dim)
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
        :data:`HEAD_DTYPES`, for inference. bfloat16 halves the weights a step reads: on
        CPUs with AVX512-BF16 or AMX, and on GPUs, ``act`` gets faster (measure it:
        ``bench/head_acceleration.py``); on CPUs without them it gets slower. The sampler
        still integrates in float32, the normalizer and the backbone are untouched, and
        ``save_pretrained`` writes float32."""
        if name not in HEAD_DTYPES:
            raise PolicyInputError(f"head dtype {name!r} is not one of {', '.join(HEAD_DTYPES)}")
        from ditvla.policies.quantization import integer_layers

        integer = integer_layers(self.head)
        if integer and name != "float32":
            raise PolicyInputError(
                f"head dtype {name!r}: this policy's head is quantized ({len(integer)} int8 "
                f"layers, e.g. {integer[0]}); use the float policy with --head-dtype {name}, "
                "or the quantized one as it is"
            )
        self.head.to(HEAD_DTYPES[name])

    # ------------------------------------------------------------------ two halves
    def _as_batch(
        self, observation: dict[str, Any], need_state: bool = True
    ) -> tuple[dict[str, Any], bool]:
        needs_state = need_state and self.config.state_dim
        for key in ("images", "instruction") + (("state",) if needs_state else ()):
            if key not in observation:
                raise PolicyInputError(f"observation is missing {key!r}")
        single = isinstance(observation["instruction"], str)
        if not single:
            return observation, False
        images = {cam: np.asarray(v)[None] for cam, v in observation["images"].items()}
        batched = {"images": images, "instruction": [observation["instruction"]]}
        if "state" in observation:
            batched["state"] = np.asarray(observation["state"])[None]
        return batched, True

    @torch.no_grad()
    def encode(self, observation: dict[str, Any]) -> Context:
        """The slow half: cameras + instruction through the VLM -> context (and its cache)."""
        self.eval()
        batch, _ = self._as_batch(observation, need_state=False)
        images = _image_batch(batch["images"], self.config.cameras, self.config.image_size)
        return self.encode_pixels(images, batch["instruction"])

    def encode_pixels(self, pixels: torch.Tensor, instructions: list[str]) -> Context:
        """``encode`` from frames already in the model's layout: ``pixels`` float (B,
        cameras, 3, S, S) in [0, 1], cameras in ``config.cameras`` order (what adapters
        such as the LeRobot plugin hand over)."""
        expected = (len(self.config.cameras), 3, self.config.image_size, self.config.image_size)
        if pixels.ndim != 5 or tuple(pixels.shape[1:]) != expected:
            raise PolicyInputError(
                f"pixels have shape {tuple(pixels.shape)}, expected "
                f"(B, {', '.join(map(str, expected))})"
            )
        if len(instructions) != pixels.shape[0]:
            raise PolicyInputError(
                f"{len(instructions)} instructions for a batch of {pixels.shape[0]} observations"
            )
        ids, text_mask = self.backbone.tokenize(list(instructions), self.device)
        tokens, mask = self.backbone(pixels.to(self.device).float(), ids, text_mask)
        return self.context_from(tokens, mask)

    def context_from(self, tokens: torch.Tensor, mask: torch.Tensor) -> Context:
        """A context from VLM tokens (B, L, width) and mask (B, L) computed elsewhere (the
        runtime's System 2 process): the head's per-layer cache is built here."""
        tokens, mask = tokens.to(self.device), mask.to(self.device).bool()
        return Context(tokens, mask, self.head.prepare_context(tokens, mask, trim_padding=True))

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
        (distillation trains a student through it); ``state`` in the robot's units.

        ``forecast`` (default: the config's) forecasts the head's features at some
        denoising steps instead of computing them (:mod:`ditvla.policies.forecasting`).

        ``inpaint=(actions, weights)``: actions (B, H, A) or (H, A) in the robot's units and
        weights (H,) or (B, H) in [0, 1]; each denoising step moves its clean-action estimate
        towards ``actions`` by ``weights`` (1: keep that action, 0: free). Real-time chunking
        uses it to keep the actions that execute while this chunk is computed.
        """
        self.eval()
        b = context.tokens.shape[0]
        if self.config.state_dim and state is not None:  # one observation's (D,) too
            state = state if torch.is_tensor(state) else torch.as_tensor(np.asarray(state))
            state = state[None] if state.ndim == 1 else state
        norm_state = self._normalized_state(state)
        shape = (b, *self.noise_shape)
        if noise is None:
            noise = torch.randn(shape, device=self.device)
        elif tuple(noise.shape) != shape:
            raise PolicyInputError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        steps = num_steps or self.config.num_inference_steps
        refusal = self.config.steps_refusal(steps)
        if refusal:
            raise PolicyInputError(refusal)
        times = self.schedule.step_times(steps)
        conditions = self.head.condition_steps(times, norm_state, b, context.cache.summary)
        forecast = forecast or self.config.forecast
        forecaster = None
        if forecast.mode != "off":
            if steps <= forecast.warmup:
                raise PolicyInputError(
                    f"forecast {forecast.mode!r} runs every block for its first "
                    f"{forecast.warmup} steps: with {steps} steps it forecasts nothing; use "
                    f"more than {forecast.warmup} steps or forecast mode 'off'"
                )
            forecaster = Forecaster(forecast, times, len(self.head.blocks))
        self.last_forecaster = forecaster
        return self.schedule.sample(
            lambda x, i: self.head(x, conditions[i], context.cache, forecaster=forecaster),
            noise.to(self.device),
            steps,
            guide=self._inpainting_guide(inpaint, shape) if inpaint is not None else None,
        )

    def _normalized_state(self, state: Any) -> torch.Tensor | None:
        """``state`` (B, D) in the robot's units, checked and normalized; None for a
        policy that reads no state."""
        if not self.config.state_dim:
            return None
        if state is None:
            raise PolicyInputError(f"state is required, shape (B, {self.config.state_dim})")
        raw = _float_batch(state, "state", self.config.state_dim).to(self.device)
        return self.normalizer.normalize("state", raw)

    def _inpainting_guide(self, inpaint: tuple[Any, Any], shape: tuple[int, int, int]):
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
        target = self.normalizer.normalize("action", actions.to(self.device))
        weights = weights.to(self.device)[..., None]
        return lambda x0: x0 + weights * (target - x0)

    # ------------------------------------------------------------------ LeRobot API
    def reset(self) -> None:
        """Forget queued actions (call at the start of an episode)."""
        self._queue.clear()

    def predict_action_chunk(self, observation: dict[str, Any], **kwargs: Any) -> torch.Tensor:
        """encode + act: (B, H, A), or (H, A) for a single observation."""
        batch, single = self._as_batch(observation)
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
        """Training loss of a dataset batch (ReplayBufferDataset samples, collated).

        Uses the last observation step; padded action steps are left out of the loss.
        """
        images = {cam: v[:, -1] for cam, v in batch["images"].items()}
        pixels = _image_batch(images, self.config.cameras, self.config.image_size)
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
        """The training loss from tensors in the robot's units: ``pixels`` as for
        :meth:`encode_pixels`, ``state`` (B, D), ``actions`` (B, H, A), ``action_is_pad``
        (B, H) (padded steps are left out). ``targets`` carries the foresight head's
        (``motion``, or ``future_image`` and ``future_is_pad``) and the auxiliary head's
        (``auxiliary``: the privileged arrays, standardized)."""
        pixels = pixels.to(self.device).float()
        context = self.encode_pixels(pixels, instructions)
        loss = self.action_loss(context, state, actions, action_is_pad)
        metrics = {"action_loss": loss.item()}
        if self.foresight is not None:
            foresight_loss, foresight_metrics = self._foresight_loss(targets or {}, context, pixels)
            loss = loss + self.config.foresight.weight * foresight_loss
            metrics.update(foresight_metrics)
        if self.auxiliary is not None:
            if not targets or "auxiliary" not in targets:
                raise PolicyInputError(
                    f"the policy learns to predict {', '.join(self.config.auxiliary_keys)} but "
                    "the batch has no 'auxiliary' targets"
                )
            predicted = self.auxiliary(context.tokens, context.mask)
            target = torch.as_tensor(targets["auxiliary"]).to(self.device).float()
            auxiliary_loss = ((predicted - target) ** 2).mean()
            loss = loss + self.config.auxiliary_weight * auxiliary_loss
            metrics["auxiliary_loss"] = auxiliary_loss.item()
        return loss, metrics

    def action_loss(
        self, context: Context, state: Any, actions: Any, action_is_pad: Any
    ) -> torch.Tensor:
        """The action head's denoising loss (the schedule's training example: a noisy chunk
        at a random time and its target) of demonstrated chunks ``actions`` (B, H, A) from
        an encoded ``context``; ``state`` (B, D) and ``actions`` in the robot's units,
        ``action_is_pad`` (B, H) marks padded steps, left out of the loss."""
        actions = torch.as_tensor(actions).to(self.device).float()
        if actions.shape[1:] != (self.config.horizon, self.config.action_dim):
            raise PolicyInputError(
                f"batch action has shape {tuple(actions.shape)}, expected "
                f"(B, {self.config.horizon}, {self.config.action_dim})"
            )
        state = self._normalized_state(state)
        target_actions = self.normalizer.normalize("action", actions)
        valid = ~torch.as_tensor(action_is_pad).to(self.device).bool()
        cache, n = context.cache, self.config.noise_samples
        if n > 1:
            target_actions, valid = (x.repeat_interleave(n, 0) for x in (target_actions, valid))
            state = None if state is None else state.repeat_interleave(n, 0)
            cache = cache.repeat_interleave(n)
        noise = torch.randn_like(target_actions)
        noisy, t, target = self.schedule.training_example(target_actions, noise)
        prediction = self.head(noisy, self.head.condition(t, state, cache.summary), cache)
        error = (prediction - target) ** 2
        return (error.mean(-1) * valid).sum() / valid.sum().clamp(min=1)

    def _foresight_loss(
        self, batch: dict[str, Any], context: Context, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config.foresight
        frame = pixels[:, self.config.cameras.index(config.camera)]
        needed = "motion" if config.kind == "motion" else "future_image"
        if needed not in batch:
            raise PolicyInputError(
                f"foresight is {config.kind!r} but the batch has no {needed!r} "
                "(a training batch carries it: 'motion', the optical flow from frame t to "
                "t + k as a motion image; 'future_image', the camera's frame t + k)"
            )
        if config.kind == "motion":
            target = batch["motion"].to(self.device).float()
            return self.foresight.loss(context.tokens, context.mask, frame, target)
        future = _image_batch({config.camera: batch["future_image"]}, [config.camera], None)
        valid = ~torch.as_tensor(batch["future_is_pad"], device=self.device).bool()
        return self.foresight.loss(
            context.tokens, context.mask, frame, future[:, 0].to(self.device), valid, self.backbone
        )

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        folder: str | Path,
        *,
        drop_foresight: bool = False,
        quantization: dict[str, Any] | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write config.json, model.safetensors and the VLM's config/tokenizer to ``folder``.

        Written into a temporary sibling folder and renamed into place, so a crash never
        leaves a half-written policy under the final name. ``drop_foresight`` leaves out
        the foresight head (inference never runs it): a smaller deployable folder.
        ``quantization`` (a recipe from :mod:`ditvla.policies.quantization`) marks these
        float weights to be quantized when loaded. The folder is also a LeRobot
        pretrained-policy folder (:mod:`ditvla.policies.lerobot_layout`). ``state``: the
        weights gathered elsewhere (a sharded model's), else this module's.
        """
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.write_files(tmp, drop_foresight=drop_foresight, quantization=quantization, state=state)
        if folder.exists():
            old = folder.with_name(folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)

    def write_files(
        self,
        folder: Path,
        *,
        drop_foresight: bool = False,
        quantization: dict[str, Any] | None = None,
        config_fields: dict[str, Any] | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """The files of :meth:`save_pretrained`, written into an existing ``folder`` in place
        (for a caller that owns the folder, such as LeRobot's checkpointing).
        ``config_fields`` are other keys for config.json (a LeRobot configuration);
        ``state`` a state dict gathered elsewhere (a sharded model's), else this module's."""
        from safetensors.torch import save_file

        config = self.config.to_dict()
        if state is None:
            state = self.state_dict()
        # float32 on disk whatever the head runs in (set_head_dtype)
        state = {
            k: (v.float() if v.is_floating_point() else v).detach().contiguous().cpu()
            for k, v in state.items()
        }
        if drop_foresight:
            config["foresight"]["kind"] = "off"
            state = {k: v for k, v in state.items() if not k.startswith("foresight.")}
        version = POLICY_FORMAT_VERSION if quantization is None else QUANTIZED_FORMAT_VERSION
        meta = {
            **(config_fields or {}),
            **lerobot_layout.CONFIG_TAG,
            "format": POLICY_FORMAT,
            "format_version": version,
            "policy": config,
        }
        meta.pop("quantization", None)
        if quantization is not None:
            meta["quantization"] = quantization
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": POLICY_FORMAT})
        self.backbone.vlm_config.save_pretrained(folder / VLM_FOLDER)
        self.backbone.tokenizer.save_pretrained(folder / VLM_FOLDER)
        lerobot_layout.write_processor_files(folder)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, map_location: str | torch.device = "cpu"
    ) -> DiTVLAPolicy:
        """Load a folder written by :meth:`save_pretrained` (no network access)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer

        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        missing = [
            p.name for p in (config_path, weights_path, folder / VLM_FOLDER) if not p.exists()
        ]
        if missing:
            raise CheckpointError(
                f"{folder}: incomplete policy folder, missing {', '.join(missing)}"
            )
        try:
            meta = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
        if meta.get("format") != POLICY_FORMAT:
            raise CheckpointError(f"{folder}: not a ditvla policy (format {meta.get('format')!r})")
        version = meta.get("format_version", 0)
        if version not in (POLICY_FORMAT_VERSION, QUANTIZED_FORMAT_VERSION):
            raise CheckpointError(
                f"{folder}: saved by a ditvla with policy format {version}, this version reads "
                f"formats {POLICY_FORMAT_VERSION} and {QUANTIZED_FORMAT_VERSION}"
                + ("; upgrade ditvla" if version > QUANTIZED_FORMAT_VERSION else "")
            )
        config = PolicyConfig(**meta["policy"])
        config.backbone.pretrained_path = None  # the architecture comes from vlm/
        recipe = None
        if "quantization" in meta:
            from ditvla.policies.quantization import QuantizationConfig, QuantizationError

            try:
                recipe = QuantizationConfig.from_dict(meta["quantization"])
            except QuantizationError as exc:
                raise CheckpointError(f"{folder}: {exc}") from None
        vlm_config = AutoConfig.from_pretrained(folder / VLM_FOLDER, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder / VLM_FOLDER, local_files_only=True)
        policy = cls(config, vlm_config=vlm_config, tokenizer=tokenizer)
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{weights_path}: damaged weights file ({exc})") from None
        result = policy.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"{weights_path}: weights do not match the config (missing "
                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
        policy = policy.to(map_location)
        if recipe is not None:
            from ditvla.policies.quantization import apply_recipe

            apply_recipe(policy.eval(), recipe)
        return policy


class AuxiliaryHead(nn.Module):
    """Privileged targets from the context: an MLP over the mean of the valid tokens."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim)
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(masked_mean(tokens, mask))


def edit_config_file(folder: str | Path, edit) -> None:
    """Change a saved policy's config.json in place: ``edit(meta)`` mutates the parsed file
    (e.g. sets ``meta["policy"]["num_inference_steps"]`` or adds a record); the result
    replaces the file atomically. A folder without a readable policy config raises
    CheckpointError."""
    path = Path(folder) / CONFIG_FILE
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
        edit(meta)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a ditvla policy config ({exc})") from None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def _identity_stats(config: PolicyConfig) -> Stats:
    """Statistics that normalize nothing: centre 0, scale 1 in every mode."""
    unit = dict(zip(STAT_NAMES, (0.0, 1.0, -1.0, 1.0, -1.0, 1.0), strict=True))

    def stats(dim: int) -> dict[str, list[float]]:
        return {name: [value] * dim for name, value in unit.items()}

    return {"action": stats(config.action_dim), "state": stats(config.state_dim)}

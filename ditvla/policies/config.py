"""A policy's configuration: everything needed to rebuild it (saved as config.json).

The presets live here, once: ``ditvla train --policy.preset``, the LeRobot plugin and
:meth:`PolicyConfig.preset` all read :data:`POLICY_PRESETS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from ditvla.contract import DataSpec
from ditvla.errors import ConfigError
from ditvla.policies.auxiliary_head import AuxiliaryPooling
from ditvla.policies.backbone import BackboneConfig, Family
from ditvla.policies.dit_head import HEAD_PRESETS, ActionHeadConfig
from ditvla.policies.forecasting import ForecastConfig
from ditvla.policies.foresight_head import ForesightConfig
from ditvla.policies.noise_schedules import Objective, make_schedule
from ditvla.policies.normalizer import NormMode

# preset name -> (the tiny VLM's family, the action head's size in HEAD_PRESETS, its eyes):
# tiny (tiny Idefics3 VLM + tiny head, the CPU default), tiny-paligemma, tiny-qwen
# (Qwen2.5-VL), and head sizes small / base / large over the tiny Idefics3 VLM. The eyes
# are the frozen ImageNet EfficientNet-Lite0 (BackboneConfig.vision_encoder): a tiny VLM
# starts from random weights, and an encoder trained on a few hundred demonstrations
# cannot find small objects on new episodes (docs/benchmarks.md, "Seeing small things").
# Qwen2.5-VL keeps its own tower (its 3-D positions assume it), and so does a pretrained
# VLM (--policy.backbone.pretrained-path): its eyes were trained with its words.
PRESET_EYES = "efficientnet-lite0"
POLICY_PRESETS: dict[str, tuple[Family, str, str]] = {
    "tiny": ("idefics3", "tiny", PRESET_EYES),
    "tiny-paligemma": ("paligemma", "tiny", PRESET_EYES),
    "tiny-qwen": ("qwen2_5_vl", "tiny", ""),
    "small": ("idefics3", "small", PRESET_EYES),
    "base": ("idefics3", "base", PRESET_EYES),
    "large": ("idefics3", "large", PRESET_EYES),
}
PresetName = Literal[tuple(POLICY_PRESETS)]  # the names, for config fields and --help


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
        n_action_steps: actions executed per chunk before the next (0: a quarter of the
            horizon, 4 of 16: replanning that often found Meta-World's goals and LIBERO's
            objects more often than half the horizon did, docs/benchmarks.md).
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
        auxiliary_input: the auxiliary head's prediction also conditions the action head,
            beside the state: the head reads the positions the backbone reads off its
            cameras as it would read privileged state (trained on the predictions, never
            on the true values, so acting sees what training saw).
        auxiliary_pooling: how the auxiliary head pools the context: mean (of every
            token) or attention (a few learned queries, each a softmax over the tokens,
            so that a query can settle on the patches where an object is seen).
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
    auxiliary_input: bool = False
    auxiliary_pooling: AuxiliaryPooling = "mean"
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
                raise ConfigError(
                    f"foresight camera {self.foresight.camera!r} is not one of {self.cameras}"
                )
        make_schedule(self.objective)  # validates the name
        if self.auxiliary_pooling not in ("mean", "attention"):
            raise ConfigError(
                f"auxiliary_pooling must be mean or attention, got {self.auxiliary_pooling!r}"
            )
        if self.n_action_steps == 0:
            self.n_action_steps = max(1, self.horizon // 4)
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ConfigError(
                f"n_action_steps must be in 1..horizon ({self.horizon}), got {self.n_action_steps}"
            )
        if self.noise_samples < 1:
            raise ConfigError(f"noise_samples must be >= 1, got {self.noise_samples}")
        if self.num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.distilled_steps < 0:
            raise ConfigError(f"distilled_steps must be >= 0, got {self.distilled_steps}")
        refusal = self.steps_refusal(self.num_inference_steps)
        if refusal:
            raise ConfigError(f"num_inference_steps: {refusal}")

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
        """The policy preset ``name`` (one of :data:`POLICY_PRESETS`) with ``overrides``
        (PolicyConfig fields; ``backbone``, ``head`` and ``foresight`` as dicts over the
        preset's)."""
        if name not in POLICY_PRESETS:
            raise ConfigError(f"unknown policy preset {name!r}; choose {', '.join(POLICY_PRESETS)}")
        family, head_size, eyes = POLICY_PRESETS[name]
        backbone_settings = overrides.pop("backbone", {})
        if backbone_settings.get("pretrained_path"):
            eyes = ""  # a pretrained VLM sees with its own encoder unless told otherwise
        backbone = BackboneConfig(**{"family": family, "vision_encoder": eyes, **backbone_settings})
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

"""``--policy.type=ditvla``: the LeRobot configuration of a ditvla policy.

The settings that shape the model are ditvla's own (:class:`PolicyConfig`, defaults read
from it: one home per default); the training settings default to ``ditvla train``'s
(:class:`TrainConfig`). A saved policy's config.json holds both this configuration and
ditvla's description of the model (``format``, ``format_version``, ``policy``): LeRobot
reads the first, ``ditvla eval`` the second, and a ``ditvla train`` folder (which has only
the second) gets its LeRobot features from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lerobot.configs import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.optim.optimizers import AdamWConfig
from lerobot.optim.schedulers import CosineDecayWithWarmupSchedulerConfig
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_IMAGES, OBS_STATE

from ditvla.policies.config import PolicyConfig
from ditvla.training.trainer import TrainConfig


def _default(config_class: type, name: str) -> Any:
    """The default of a field of one of ditvla's config dataclasses."""
    spec = next(f for f in dataclasses.fields(config_class) if f.name == name)
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def camera_of(feature_key: str) -> str:
    """LeRobot image key -> ditvla camera: observation.images.<cam> -> <cam>;
    observation.image (a single-camera environment's key) -> image."""
    if feature_key.startswith(OBS_IMAGES + "."):
        return feature_key.removeprefix(OBS_IMAGES + ".")
    if feature_key == OBS_IMAGE:
        return "image"
    raise ValueError(f"{feature_key!r} is not a LeRobot image key")


def feature_of(camera: str) -> str:
    """ditvla camera -> LeRobot image key (the inverse of :func:`camera_of`)."""
    return OBS_IMAGE if camera == "image" else f"{OBS_IMAGES}.{camera}"


@PreTrainedConfig.register_subclass("ditvla")
@dataclass
class DitvlaConfig(PreTrainedConfig):
    """A ditvla policy (VLM backbone + DiT action head) for LeRobot's tools.

    Args:
        preset: tiny (tiny Idefics3 VLM + tiny head, the CPU default), tiny-paligemma,
            tiny-qwen, or small / base / large (head sizes over the tiny VLM).
        image_size: square side the camera frames are resized to (None: the dataset's
            frame side, when every camera is square and the same size).
        state_keys: the environment's state arrays that observation.state stands for, in
            order (what ``ditvla eval`` builds for it: proprio, hand, ...; LeRobot's own
            Meta-World env gives hand position + gripper, ditvla's "hand").
        horizon: actions per chunk.
        n_action_steps: actions executed per chunk before the next (0: half the horizon).
        objective: flow_matching (Euler sampling) or ddpm (DDIM sampling).
        num_inference_steps: denoising steps per chunk.
        num_train_timesteps: ddpm: the training noise levels.
        noise_samples: (noise, time) draws per training observation.
        state_norm / action_norm: mean_std, min_max, quantile or identity, with the
            dataset's statistics (kept in the policy's weights).
        backbone / head: ditvla's BackboneConfig / ActionHeadConfig fields over the preset,
            e.g. --policy.head='{"width": 128}'.
        optimizer_lr / optimizer_weight_decay / optimizer_grad_clip_norm /
            scheduler_warmup_steps: AdamW with linear warm-up and cosine decay to 0, as
            ``ditvla train``.
        format / format_version / policy / quantization: ditvla's description of a saved
            model (written on save; set them only by loading a folder).
    """

    preset: str = "tiny"
    image_size: int | None = None
    state_keys: list[str] = field(default_factory=lambda: _default(PolicyConfig, "state_keys"))
    horizon: int = _default(PolicyConfig, "horizon")
    n_action_steps: int = _default(PolicyConfig, "n_action_steps")
    objective: str = _default(PolicyConfig, "objective")
    num_inference_steps: int = _default(PolicyConfig, "num_inference_steps")
    num_train_timesteps: int = _default(PolicyConfig, "num_train_timesteps")
    noise_samples: int = _default(PolicyConfig, "noise_samples")
    state_norm: str = _default(PolicyConfig, "state_norm")
    action_norm: str = _default(PolicyConfig, "action_norm")
    backbone: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)

    optimizer_lr: float = _default(TrainConfig, "lr")
    optimizer_weight_decay: float = _default(TrainConfig, "weight_decay")
    optimizer_grad_clip_norm: float = _default(TrainConfig, "grad_clip")
    scheduler_warmup_steps: int = _default(TrainConfig, "warmup_steps")

    # The policy normalizes inside (LeRobot's dataset statistics become its buffers), so
    # LeRobot's processors pass every feature through.
    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.IDENTITY,
            "ACTION": NormalizationMode.IDENTITY,
        }
    )

    format: str | None = None
    format_version: int | None = None
    policy: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy is not None and not self.input_features:
            self.input_features, self.output_features = features_of(self.saved_model_config())
        if self.horizon < 1 or not 0 <= self.n_action_steps <= self.horizon:
            raise ValueError(
                f"horizon must be >= 1 and n_action_steps in 0..horizon, got {self.horizon} "
                f"and {self.n_action_steps}"
            )

    def saved_model_config(self) -> PolicyConfig:
        """ditvla's configuration of a loaded model (``policy``)."""
        if self.policy is None:
            raise ValueError("no saved ditvla model configuration (policy) in this config")
        return PolicyConfig(**self.policy)

    # ------------------------------------------------------------------ LeRobot's hooks
    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.horizon))

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(
            lr=self.optimizer_lr,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> CosineDecayWithWarmupSchedulerConfig:
        # LeRobot scales warm-up and decay to the run's steps when it is shorter.
        return CosineDecayWithWarmupSchedulerConfig(
            num_warmup_steps=self.scheduler_warmup_steps,
            num_decay_steps=_default(TrainConfig, "steps"),
            peak_lr=self.optimizer_lr,
            decay_lr=0.0,
        )

    def validate_features(self) -> None:
        """The features a ditvla policy can read: at least one camera, an action; a state
        is optional. Raises ValueError naming the feature."""
        if not self.image_features:
            raise ValueError(
                "ditvla reads at least one camera: no observation.images.* (or "
                f"observation.image) feature among {sorted(self.input_features or {})}"
            )
        if self.action_feature is None:
            raise ValueError(f"no {ACTION!r} feature among {sorted(self.output_features or {})}")
        for key, feature in self.image_features.items():
            camera_of(key)
            if len(feature.shape) != 3 or feature.shape[0] != 3:
                raise ValueError(f"{key} has shape {feature.shape}, expected (3, H, W)")
        if self.image_size is None:
            sides = {tuple(f.shape[1:]) for f in self.image_features.values()}
            if len(sides) != 1 or len(next(iter(sides))) != 2 or len(set(next(iter(sides)))) != 1:
                raise ValueError(
                    f"the cameras' frames are {sorted(sides)}: set --policy.image_size to the "
                    "square side to resize them to"
                )

    def model_config(self, action_range: list[list[float]] | None = None) -> PolicyConfig:
        """ditvla's configuration of a new model for these features."""
        self.validate_features()
        cameras = [camera_of(key) for key in self.image_features]
        size = self.image_size or next(iter(self.image_features.values())).shape[1]
        state = self.robot_state_feature
        state_dim = state.shape[0] if state is not None else 0
        keys = list(self.state_keys) if state_dim else []
        return PolicyConfig.preset(
            self.preset,
            cameras=cameras,
            image_size=size,
            state_dim=state_dim,
            action_dim=self.action_feature.shape[0],
            state_keys=keys,
            action_range=action_range or [],
            horizon=self.horizon,
            n_action_steps=self.n_action_steps,
            objective=self.objective,
            num_inference_steps=self.num_inference_steps,
            num_train_timesteps=self.num_train_timesteps,
            noise_samples=self.noise_samples,
            state_norm=self.state_norm,
            action_norm=self.action_norm,
            backbone=dict(self.backbone),
            head=dict(self.head),
        )


def features_of(config: PolicyConfig) -> tuple[dict[str, PolicyFeature], dict[str, PolicyFeature]]:
    """LeRobot's input and output features of a ditvla model."""
    side = config.image_size
    inputs = {
        feature_of(cam): PolicyFeature(type=FeatureType.VISUAL, shape=(3, side, side))
        for cam in config.cameras
    }
    if config.state_dim:
        inputs[OBS_STATE] = PolicyFeature(type=FeatureType.STATE, shape=(config.state_dim,))
    outputs = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(config.action_dim,))}
    return inputs, outputs

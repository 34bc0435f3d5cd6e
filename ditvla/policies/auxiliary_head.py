"""The auxiliary head: privileged targets read out of the context, in training only.

Asymmetric supervision: an MLP over the mean of the context's valid tokens predicts
arrays the policy never reads (the goal's position, object poses), so that the backbone
learns to encode them from its cameras and words. ``encode`` / ``act`` never run it.
"""

from __future__ import annotations

import torch
from torch import nn

from ditvla.policies.pooling import masked_mean


class AuxiliaryHead(nn.Module):
    """Context tokens (B, L, width) and mask (B, L) -> targets (B, dim)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim)
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(masked_mean(tokens, mask))

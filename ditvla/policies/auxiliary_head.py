"""The auxiliary head: privileged targets read out of the context, in training only.

Asymmetric supervision: an MLP over a pooling of the context's valid tokens predicts
arrays the policy never reads (the goal's position, object poses), so that the backbone
learns to encode them from its cameras and words. ``encode`` / ``act`` never run it
(unless ``auxiliary_input``: then its prediction conditions the action head).

Two poolings (``PolicyConfig.auxiliary_pooling``):

- ``mean``: the mean of the tokens. To read a position out of it, every token has to
  carry the position, which the backbone learns as well from the episode as from the
  object's pixels;
- ``attention``: a few learned queries each attend over the tokens (one softmax over the
  sequence per query) and the MLP reads what they gathered. A query can settle on the
  image tokens where the object is, so the position can stay where it is seen, in the
  tokens of those patches and their place in the frame (the attention pooling of Perceiver
  and of set transformers' PMA; a spatial softmax over tokens rather than pixels).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ditvla.policies.pooling import masked_mean

AuxiliaryPooling = Literal["mean", "attention"]
ATTENTION_QUERIES = 8


class AuxiliaryHead(nn.Module):
    """Context tokens (B, L, width) and mask (B, L) -> targets (B, dim)."""

    def __init__(self, width: int, dim: int, pooling: AuxiliaryPooling = "mean"):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"auxiliary pooling must be mean or attention, got {pooling!r}")
        self.pooling = pooling
        pooled = width
        if pooling == "attention":
            self.norm = nn.LayerNorm(width)
            self.keys = nn.Linear(width, width)
            self.queries = nn.Parameter(torch.randn(ATTENTION_QUERIES, width) * width**-0.5)
            pooled = ATTENTION_QUERIES * width
        self.mlp = nn.Sequential(
            nn.LayerNorm(pooled), nn.Linear(pooled, width), nn.GELU(), nn.Linear(width, dim)
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            return self.mlp(masked_mean(tokens, mask))
        values = self.norm(tokens)
        scores = torch.einsum("qw,blw->bql", self.queries, self.keys(values))
        scores = scores * tokens.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        gathered = torch.einsum("bql,blw->bqw", scores.softmax(-1), values)
        return self.mlp(gathered.flatten(1))

"""Pooling a token sequence over its valid positions."""

from __future__ import annotations

import torch


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """tokens (B, L, W), mask (B, L) True where a token is real (None: all are) -> (B, W),
    the mean over the real tokens (0 for a row without any)."""
    if mask is None:
        return tokens.mean(1)
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)

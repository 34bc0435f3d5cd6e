"""The policy's scaled dot-product attention: PyTorch's, except that bfloat16 attention on
the CPU computes in float32.

PyTorch's CPU flash-attention kernel is much slower in bfloat16 than in float32 at the
short sequences a policy attends over, most of all backward. Forward and backward of 32
rows, 4 heads, 16 tokens of 32 took 8.35 ms in bfloat16 against 0.71 ms in float32; 32 x 2
heads x 64 tokens of 48 (the tiny vision transformer's) 15.3 against 3.8 ms (one thread,
the 2-core EPYC, 2026-12-07; ``docs/benchmarks.md``, "Training throughput"). So on the
CPU, under ``ditvla train``'s bfloat16 autocast and in a bfloat16 head at inference
(``--head-dtype bfloat16``), every attention of the policy casts its queries, keys and
values to float32 and its output back to bfloat16. That covers the VLM's
transformers (through transformers' own extension point, ``AttentionInterface``, as
:data:`ATTENTION_IMPLEMENTATION`) and the action head. On CUDA, and in float32, it is
PyTorch's attention unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

# the name under which transformers' attention modules find the policy's attention
ATTENTION_IMPLEMENTATION = "ditvla_sdpa"


def _in_float32(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and query.dtype == torch.bfloat16


def _float32(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An additive (floating) mask in float32; a boolean mask or None as it is."""
    return mask.float() if mask is not None and mask.is_floating_point() else mask


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, in float32 where the query is bfloat16 on the CPU
    (the output in the query's dtype)."""
    if not _in_float32(query):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), attn_mask=_float32(attn_mask)
        )
    return out.to(query.dtype)


@functools.cache
def _register_with_transformers() -> None:
    """transformers' SDPA attention with :func:`scaled_dot_product_attention`'s rule, as
    :data:`ATTENTION_IMPLEMENTATION` (registered at first use: the action head alone does
    not import transformers)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        if not _in_float32(query):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(
                module,
                query.float(),
                key.float(),
                value.float(),
                _float32(attention_mask),
                **kwargs,
            )
        return out.to(query.dtype), weights

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, attention)


def use_policy_attention(model: torch.nn.Module) -> None:
    """Give a transformers model that attends through PyTorch's SDPA the policy's attention
    (other implementations, e.g. eager or flash-attention 2, are left as chosen). It is not
    saved with the model's config: a saved VLM folder still reads as plain transformers."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa":
        _register_with_transformers()
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)

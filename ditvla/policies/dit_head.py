"""The DiT action head: denoises an action chunk (B, H, A) conditioned on VLM context.

Two ways to condition, chosen in :class:`ActionHeadConfig`:

- ``cross_attention`` (GR00T N1 / SmolVLA): action tokens self-attend, then attend to the
  context tokens; the timestep and the proprioceptive state modulate every block through
  adaLN-Zero (DiT's shift/scale/gate, zero-initialised so a fresh block is the identity).
- ``in_context`` (Dita): one sequence ``[context..., state, time, actions...]`` through
  plain transformer blocks. The context is a prefix that attends only to itself, so its
  keys and values in every layer do not depend on the noisy actions.

The head computes in the dtype of its weights (:attr:`DiTActionHead.dtype`; float32 as
trained, bfloat16 after ``head.to(torch.bfloat16)``): inputs are cast to it on the way in,
and predictions come back in the noisy actions' dtype, so the sampler integrates in float32
whatever the head runs in.

Either way the context's keys and values are computed once per chunk by
:meth:`DiTActionHead.prepare_context` and reused by every denoising step
(openpi's prefix cache; :class:`ContextCache`). What the timestep and the state
contribute (adaLN modulations, or the time/state tokens) does not depend on the noisy
actions either: :meth:`DiTActionHead.condition` computes it for every denoising step of a
chunk in one batched pass, so a step reads only the weights that touch the actions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ditvla.errors import ConfigError
from ditvla.policies.attention import scaled_dot_product_attention
from ditvla.policies.forecasting import Forecaster
from ditvla.policies.pooling import masked_mean

ConditioningKind = Literal["cross_attention", "in_context"]


@dataclass
class ActionHeadConfig:
    """Size and kind of the action head (``filled_in``: from the backbone and the data).

    Args:
        conditioning: cross_attention (GR00T / SmolVLA: action tokens attend to the
            context, adaLN-Zero conditioning) or in_context (Dita: one sequence).
        width / depth / num_heads: the DiT's width, blocks and attention heads.
        mlp_ratio: MLP width over the DiT width.
        self_attention_every: cross_attention: blocks 0, k, 2k, ... also self-attend among
            the action tokens (GR00T N1 alternates with k = 2).
        context_film: the context's mean (over its valid tokens) modulates every block
            with the time and the state (FiLM), beside the attention to the tokens: a
            direct path for what the whole context says (which instruction, which scene).
    """

    filled_in: ClassVar[tuple[str, ...]] = ("context_dim", "state_dim", "action_dim", "horizon")

    conditioning: ConditioningKind = "cross_attention"
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    self_attention_every: int = 2
    context_film: bool = False
    context_dim: int = 0
    state_dim: int = 0
    action_dim: int = 0
    horizon: int = 0

    def __post_init__(self) -> None:
        if self.conditioning not in ("cross_attention", "in_context"):
            raise ConfigError(
                f"conditioning must be 'cross_attention' or 'in_context', got {self.conditioning!r}"
            )
        if self.self_attention_every < 1:
            raise ConfigError(f"self_attention_every must be >= 1, got {self.self_attention_every}")
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")


HEAD_PRESETS: dict[str, dict] = {
    "tiny": dict(width=128, depth=2, num_heads=4),
    "small": dict(width=256, depth=4, num_heads=4),
    "base": dict(width=384, depth=8, num_heads=6),
    "large": dict(width=768, depth=12, num_heads=12),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (scaled to 0..1000) through a 2-layer MLP."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention whose keys/values can come partly from a cache."""

    def __init__(self, width: int, num_heads: int, kv_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_dim or width, 2 * width)
        self.out = nn.Linear(width, width)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D_kv) -> keys, values as (B, heads, L, D / heads)."""
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        *,
        cached: tuple[torch.Tensor, torch.Tensor] | None = None,
        cached_mask: torch.Tensor | None = None,
        self_attend: bool = True,
    ) -> torch.Tensor:
        """Queries from ``x`` (B, N, D); keys/values from the cache, and from ``x`` too when
        ``self_attend``. ``cached_mask`` (B, L) marks the valid cached positions (None:
        all are)."""
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        mask = None  # plain self-attention, or a cache without padding
        if cached is None:  # plain self-attention: nothing to concatenate
            k, v = self.keys_values(x)
        elif not self_attend:  # pure cross-attention to the cache
            k, v = cached
            if cached_mask is not None:
                mask = cached_mask[:, None, None, :]
        else:  # the cached prefix and the tokens themselves
            own_k, own_v = self.keys_values(x)
            k, v = torch.cat([cached[0], own_k], dim=2), torch.cat([cached[1], own_v], dim=2)
            if cached_mask is not None:
                own_mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
                mask = torch.cat([cached_mask, own_mask], dim=1)[:, None, None, :]
        y = scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def _mlp(width: int, ratio: float) -> nn.Sequential:
    hidden = int(width * ratio)
    return nn.Sequential(
        nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
    )


class CrossAttentionBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the context, adaLN-Zero MLP."""

    def __init__(self, config: ActionHeadConfig, self_attention: bool = True):
        super().__init__()
        w = config.width
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(w, config.num_heads) if self_attention else None
        self.norm2 = nn.LayerNorm(w, eps=1e-6)
        self.cross_attn = Attention(w, config.num_heads, kv_dim=w)
        self.norm3 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.mlp = _mlp(w, config.mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))

    def context_keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attn.keys_values(context)

    def forward(self, x, modulation, kv, kv_mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        if self.self_attn is not None:
            x = x + gate1[:, None] * self.self_attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm2(x), cached=kv, cached_mask=kv_mask, self_attend=False)
        return x + gate2[:, None] * self.mlp(modulate(self.norm3(x), shift2, scale2))


class InContextBlock(nn.Module):
    """A pre-norm transformer block over [context prefix | suffix tokens]."""

    def __init__(self, config: ActionHeadConfig):
        super().__init__()
        w = config.width
        self.norm1 = nn.LayerNorm(w, eps=1e-6)
        self.attn = Attention(w, config.num_heads)
        self.norm2 = nn.LayerNorm(w, eps=1e-6)
        self.mlp = _mlp(w, config.mlp_ratio)

    def prefix_step(self, prefix, prefix_mask):
        """Run the context prefix through the block (it attends only to itself); return the
        next layer's prefix and this layer's keys/values of the prefix."""
        h = self.norm1(prefix)
        kv = self.attn.keys_values(h)
        prefix = prefix + self.attn(h, cached=kv, cached_mask=prefix_mask, self_attend=False)
        return prefix + self.mlp(self.norm2(prefix)), kv

    def forward(self, x, kv, kv_mask):
        x = x + self.attn(self.norm1(x), cached=kv, cached_mask=kv_mask, self_attend=True)
        return x + self.mlp(self.norm2(x))


@dataclass
class Conditioning:
    """What time and state contribute, for a batch: adaLN modulations per block (B, 6W)
    (cross-attention), tokens placed before the actions (B, n, W) (the state; in-context
    also the time), and the final layer's modulation (B, 2W)."""

    blocks: list[torch.Tensor]
    tokens: torch.Tensor | None
    final: torch.Tensor

    def rows(self, start: int, stop: int) -> Conditioning:
        """The conditioning of batch rows ``start:stop``."""
        return Conditioning(
            blocks=[m[start:stop] for m in self.blocks],
            tokens=None if self.tokens is None else self.tokens[start:stop],
            final=self.final[start:stop],
        )


@dataclass
class ContextCache:
    """Per-layer keys/values of the context, computed once per chunk."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor | None  # (B, L) bool, True where the token is real; None: all are
    summary: torch.Tensor | None = None  # (B, W): the context's FiLM term (context_film)

    def repeat_interleave(self, n: int) -> ContextCache:
        """Each batch row repeated ``n`` times in place (row b -> rows b*n .. b*n+n-1)."""
        return ContextCache(
            keys_values=[
                (k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.keys_values
            ],
            mask=None if self.mask is None else self.mask.repeat_interleave(n, 0),
            summary=None if self.summary is None else self.summary.repeat_interleave(n, 0),
        )


class DiTActionHead(nn.Module):
    """Predicts the denoising target (velocity or noise) of an action chunk."""

    def __init__(self, config: ActionHeadConfig):
        super().__init__()
        if min(config.context_dim, config.action_dim) <= 0:
            raise ValueError("context_dim and action_dim must be set before building the head")
        self.config = config
        w = config.width
        self.context_proj = nn.Linear(config.context_dim, w)
        self.action_in = nn.Linear(config.action_dim, w)
        self.position = nn.Parameter(torch.zeros(1, config.horizon, w))
        self.time_embed = TimestepEmbedder(w)
        self.state_proj = nn.Linear(config.state_dim, w) if config.state_dim else None
        self.context_film = nn.Linear(w, w) if config.context_film else None
        if config.conditioning == "cross_attention":
            blocks = [
                CrossAttentionBlock(config, self_attention=i % config.self_attention_every == 0)
                for i in range(config.depth)
            ]
        else:
            blocks = [InContextBlock(config) for _ in range(config.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.action_out = nn.Linear(w, config.action_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.position, std=0.02)
        for block in self.blocks:
            if isinstance(block, CrossAttentionBlock):
                nn.init.zeros_(block.ada[-1].weight)
                nn.init.zeros_(block.ada[-1].bias)
        nn.init.zeros_(self.final_ada[-1].weight)
        nn.init.zeros_(self.final_ada[-1].bias)
        nn.init.zeros_(self.action_out.weight)
        nn.init.zeros_(self.action_out.bias)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the head computes in: that of its (float) weights."""
        return self.position.dtype

    def prepare_context(
        self, context: torch.Tensor, mask: torch.Tensor, *, trim_padding: bool = False
    ) -> ContextCache:
        """Context tokens (B, L, context_dim) and their mask (B, L) -> the per-layer cache.

        ``trim_padding``: leave out the positions that are padding in every row (at batch
        1, all of them: an instruction padded before its words has a fixed length) and,
        when no padding is left, attend without a mask. The result is the same; every
        denoising step then attends over fewer keys and skips the mask. Checking costs a
        device sync, so inference asks for it (once per chunk) and training does not.
        """
        if trim_padding:
            real = mask.any(dim=0)
            if not bool(real.all()):
                context, mask = context[:, real], mask[:, real]
            if bool(mask.all()):
                mask = None
        h = self.context_proj(context.to(self.dtype))
        summary = None
        if self.context_film is not None:
            summary = self.context_film(masked_mean(h, mask))
        if self.config.conditioning == "cross_attention":
            kvs = [block.context_keys_values(h) for block in self.blocks]
        else:
            kvs = []
            for block in self.blocks:
                h, kv = block.prefix_step(h, mask)
                kvs.append(kv)
        return ContextCache(keys_values=kvs, mask=mask, summary=summary)

    def condition(
        self,
        time: torch.Tensor,
        state: torch.Tensor | None = None,
        context_summary: torch.Tensor | None = None,
    ) -> Conditioning:
        """time (N,) in [0, 1], state (N, D) and the context's summary (N, W) (with
        ``context_film``; :attr:`ContextCache.summary`) -> their conditioning of N rows."""
        cond = self.time_embed(time)
        if context_summary is not None:
            cond = cond + context_summary
        state_token = None
        if self.state_proj is not None:
            state_token = self.state_proj(state.to(self.dtype))
        if self.config.conditioning == "cross_attention":
            # The state modulates every block with the time, and is also a token beside
            # the actions (as in GR00T N1) that the self-attention blocks read directly.
            tokens = state_token[:, None] if state_token is not None else None
            if state_token is not None:
                cond = cond + state_token
            blocks = [block.ada(cond) for block in self.blocks]
        else:
            extra = [cond] + ([state_token] if state_token is not None else [])
            blocks, tokens = [], torch.stack(extra, dim=1)
        return Conditioning(blocks=blocks, tokens=tokens, final=self.final_ada(cond))

    def condition_steps(
        self,
        times: torch.Tensor,
        state: torch.Tensor | None,
        batch: int,
        context_summary: torch.Tensor | None = None,
    ) -> list[Conditioning]:
        """The conditioning of every denoising step of a chunk, in one batched pass:
        times (S,), state (B, D), summary (B, W) -> S conditionings of B rows."""
        steps = times.shape[0]
        time = times.to(self.position.device).repeat_interleave(batch)
        state = state.repeat(steps, 1) if state is not None else None
        if context_summary is not None:
            context_summary = context_summary.repeat(steps, 1)
        cond = self.condition(time, state, context_summary)
        return [cond.rows(i * batch, (i + 1) * batch) for i in range(steps)]

    def forward(
        self,
        noisy_actions: torch.Tensor,
        cond: Conditioning,
        cache: ContextCache,
        token_inputs: torch.Tensor | None = None,
        forecaster: Forecaster | None = None,
    ) -> torch.Tensor:
        """noisy_actions (B, H, A) -> the denoising target's prediction (B, H, A).

        ``token_inputs`` (B, H, width), if given, is added to the embedded tokens (the
        foresight head's path from the current frame). ``forecaster`` (one per chunk, see
        :mod:`ditvla.policies.forecasting`) may forecast the blocks' output instead of
        computing it. The prediction comes back in ``noisy_actions``' dtype."""
        x = (
            self.action_in(noisy_actions.to(self.dtype))
            + self.position[:, : noisy_actions.shape[1]]
        )
        if token_inputs is not None:
            x = x + token_inputs.to(self.dtype)
        n_extra = 0 if cond.tokens is None else cond.tokens.shape[1]
        if n_extra:
            x = torch.cat([cond.tokens, x], dim=1)

        def run_blocks(h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            for i in range(start, stop):
                kv = cache.keys_values[i]
                if self.config.conditioning == "cross_attention":
                    h = self.blocks[i](h, cond.blocks[i], kv, cache.mask)
                else:
                    h = self.blocks[i](h, kv, cache.mask)
            return h

        if forecaster is None:
            x = run_blocks(x, 0, len(self.blocks))
        else:
            x = forecaster.run(x, run_blocks)
        x = x[:, n_extra:]
        shift, scale = cond.final.chunk(2, dim=-1)
        out = self.action_out(modulate(self.final_norm(x), shift, scale))
        return out.to(noisy_actions.dtype)

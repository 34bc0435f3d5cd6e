"""Time per action chunk: our DiT action head against LeRobot's SmolVLA action expert.

Both produce a 16 x 7 chunk by flow matching from a context that is already encoded:
ours runs ``prepare_context`` (per-layer keys/values of the context, once per chunk) and
the Euler steps; SmolVLA runs its Euler steps (``denoise_step``) over the VLM's prefix
key/value cache, which is computed before timing. Matched size: SmolVLA is built offline
from a locally saved SmolVLM2-style config (text width 512, 8 layers kept, expert width
0.75 x 512 = 384, its default alternation of cross- and self-attention layers) and
processor; our head has width 384, 8 blocks, 8 heads, MLP ratio 4 (the same parameter
count per MLP as the expert's SwiGLU) and self-attention in every other block. Same
process, same threads, batch 1, fp32; the heads are timed in turn, medians reported.

With ``--compile`` each is also timed with its denoising step (ours:
``DiTActionHead.forward``, theirs: ``VLAFlowMatching.denoise_step``) through
``torch.compile`` (TorchInductor, frozen weights, dynamic shapes); compilation (the first
calls, minutes on this CPU) is printed, not timed.

    python -m bench.head_latency [--repeats 20] [--compile]

Last line: ``action chunk latency: <ours> ms vs lerobot smolvla <theirs> ms (<ratio>x)``
at 256 context tokens and 10 steps (SmolVLA's default step count), both eager (the way
both run in their policies' ``act`` / ``select_action``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.compilation import compiled
from bench.smolvla_peer import legacy_cache_crop, save_tiny_smolvlm
from ditvla.policies.timing import paired_median_ms

HORIZON, ACTION_DIM, STATE_DIM = 16, 7, 8
VLM_WIDTH, VLM_LAYERS, EXPERT_WIDTH = 512, 8, 384


def smolvla_model(folder: Path):
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import VLAFlowMatching

    config = SmolVLAConfig(
        vlm_model_name=str(folder),
        load_vlm_weights=False,
        chunk_size=HORIZON,
        n_action_steps=HORIZON,
        num_vlm_layers=VLM_LAYERS,
        max_action_dim=ACTION_DIM,
        max_state_dim=STATE_DIM,
        device="cpu",
    )
    return VLAFlowMatching(config).eval()


def smolvla_chunk(model, context: int, steps: int, step_fn=None):
    """One chunk of SmolVLA's expert over a prefix cache computed beforehand; ``step_fn``
    replaces ``model.denoise_step`` (compiled). LeRobot's own Euler loop runs the steps."""
    from lerobot.policies.common.flow_matching import euler_integrate
    from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks

    legacy_cache_crop()  # lerobot 0.6.1's cache.crop(prefix_len) on today's transformers
    step_fn = step_fn or model.denoise_step
    prefix = torch.randn(1, context, VLM_WIDTH)
    pad = torch.ones(1, context, dtype=torch.bool)
    att = make_att_2d_masks(pad, torch.zeros(1, context, dtype=torch.bool))
    with torch.inference_mode():
        _, cache = model.vlm_with_expert.forward(
            attention_mask=att,
            position_ids=torch.cumsum(pad, 1) - 1,
            past_key_values=None,
            inputs_embeds=[prefix, None],
            use_cache=True,
        )
    noise = torch.randn(1, HORIZON, ACTION_DIM)

    @torch.inference_mode()
    def run():
        return euler_integrate(
            lambda x, t: step_fn(prefix_pad_masks=pad, past_key_values=cache, x_t=x, timestep=t),
            noise,
            steps,
        )

    return run


def ditvla_head(conditioning: str):
    from ditvla.policies.dit_head import ActionHeadConfig, DiTActionHead

    return DiTActionHead(
        ActionHeadConfig(
            conditioning=conditioning,
            width=EXPERT_WIDTH,
            depth=VLM_LAYERS,
            num_heads=8,
            context_dim=VLM_WIDTH,
            state_dim=STATE_DIM,
            action_dim=ACTION_DIM,
            horizon=HORIZON,
        )
    ).eval()


def ditvla_chunk(head, context: int, steps: int, step_fn=None):
    """One chunk of ``head``; ``step_fn`` replaces the head's denoising step (compiled)."""
    from ditvla.policies.noise_schedules import FlowMatching

    step_fn = step_fn or head
    tokens = torch.randn(1, context, VLM_WIDTH)
    mask = torch.ones(1, context, dtype=torch.bool)
    state = torch.randn(1, STATE_DIM)
    noise = torch.randn(1, HORIZON, ACTION_DIM)
    schedule = FlowMatching()

    @torch.inference_mode()
    def run():
        cache = head.prepare_context(tokens, mask)
        conditions = head.condition_steps(schedule.step_times(steps), state, 1)
        return schedule.sample(lambda x, i: step_fn(x, conditions[i], cache), noise, steps)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.head_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--compile", action="store_true", help="also time both denoising steps compiled"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="tiny_smolvlm_"))
    save_tiny_smolvlm(folder, width=VLM_WIDTH, layers=VLM_LAYERS)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, fp32, chunk {HORIZON}x{ACTION_DIM}"
    )
    ours_head, ic_head = ditvla_head("cross_attention"), ditvla_head("in_context")
    smolvla = smolvla_model(folder)
    ours_params = sum(p.numel() for p in ours_head.parameters())
    theirs_params = sum(p.numel() for p in smolvla.vlm_with_expert.lm_expert.parameters())
    print(
        f"params: ditvla head {ours_params / 1e6:.1f}M, smolvla expert {theirs_params / 1e6:.1f}M"
    )
    ours_compiled = theirs_compiled = None
    if args.compile:
        ours_compiled = compiled(ours_head.forward)
        theirs_compiled = compiled(smolvla.denoise_step)
    headline = None
    for context in (64, 256):
        for steps in (4, 10):
            runs = {
                "ours": ditvla_chunk(ours_head, context, steps),
                "in_context": ditvla_chunk(ic_head, context, steps),
                "theirs": smolvla_chunk(smolvla, context, steps),
            }
            if ours_compiled is not None:
                runs["ours_compiled"] = ditvla_chunk(ours_head, context, steps, ours_compiled)
                runs["theirs_compiled"] = smolvla_chunk(smolvla, context, steps, theirs_compiled)
            if ours_compiled is not None and (context, steps) == (64, 4):
                for name in ("ours_compiled", "theirs_compiled"):  # compiles: not timed
                    start = time.perf_counter()
                    runs[name]()
                    print(f"{name}: first call {time.perf_counter() - start:.1f} s")
            ms = dict(zip(runs, paired_median_ms(list(runs.values()), args.repeats), strict=True))
            line = (
                f"context {context:3d} tokens, {steps:2d} steps: eager: ditvla cross-attn "
                f"{ms['ours']:7.2f} ms, in-context {ms['in_context']:7.2f} ms | smolvla expert "
                f"{ms['theirs']:7.2f} ms ({ms['theirs'] / ms['ours']:.2f}x)"
            )
            if ours_compiled is not None:
                line += (
                    f"; compiled: ditvla {ms['ours_compiled']:7.2f} ms | smolvla "
                    f"{ms['theirs_compiled']:7.2f} ms "
                    f"({ms['theirs_compiled'] / ms['ours_compiled']:.2f}x)"
                )
            print(line)
            if (context, steps) == (256, 10):
                headline = ms
    ours, theirs = headline["ours"], headline["theirs"]
    print(
        f"action chunk latency: {ours:.1f} ms vs lerobot smolvla {theirs:.1f} ms ({theirs / ours:.2f}x)"
    )


if __name__ == "__main__":
    main()

"""Post-training quantization of a trained policy: memory, speed, action error, success.

For each arm (w8a8 with and without attention temperature matching / output head
balancing, w8a8 with the DiT head's attention projections integerized too, and with its
adaLN modulation layers as well (the whole head), w8, w4a8):
memory of the quantized layers, `encode` / `act` latency at batch 1 against the float
policy (same process, same threads), relative action error on held-out frames of the
calibration store, and success in simulation on the same episodes and the same initial
noise as the float policy (the evaluator seeds each episode's noise with its seed).
For a policy whose head is narrower than the `base` preset, a second table times the
arms on a base-sized head (width 384, 8 blocks; random weights: speed and memory only),
where the matrix products are large enough for int8 kernels to matter.

    python -m bench.quantize --policy runs/x/policy --calibration demos.zarr \\
        --env metaworld:drawer-close-v3 --episodes 20 [--arms w8a8,w8a8-whole-head]

Last line: ``w8a8: act <x>x faster, quantized-module memory -<y>%, success <float> ->
<quantized>`` for the layout with the whole DiT head integer (MLPs, attention, adaLN
modulations), and QuantVLA's.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

from ditvla.datasets.observations import observations_from_store
from ditvla.envs.evaluate import evaluate
from ditvla.policies.config import PolicyConfig
from ditvla.policies.dit_head import HEAD_PRESETS
from ditvla.policies.policy import DiTVLAPolicy
from ditvla.policies.quantization import (
    QuantizationConfig,
    measure,
    quantize_policy,
    supported_schemes,
)

QUANTVLA = "language_mlp,head_mlp"
WITH_HEAD_ATTENTION = "language_mlp,head_mlp,head_attention"
WHOLE_HEAD = "language_mlp,head_mlp,head_attention,head_modulation"
# name: (scheme, backend, layout, ATM/OHB)
ARMS = {
    "w8a8": ("w8a8", "fbgemm", QUANTVLA, True),
    "w8a8-no-corrections": ("w8a8", "fbgemm", QUANTVLA, False),
    "w8a8-head-attention": ("w8a8", "fbgemm", WITH_HEAD_ATTENTION, True),
    "w8a8-whole-head": ("w8a8", "fbgemm", WHOLE_HEAD, True),
    "w8a8-torchao": ("w8a8", "torchao", QUANTVLA, True),
    "w8": ("w8", "torchao", QUANTVLA, True),
    "w4a8": ("w4a8", "torchao", QUANTVLA, True),
}
HEADLINE, QUANTVLA_HEADLINE = "w8a8-whole-head", "w8a8"


def arm_config(name: str, corrections: bool | None = None) -> QuantizationConfig:
    """The arm's recipe; ``corrections`` overrides its ATM/OHB switch."""
    scheme, backend, layout, on = ARMS[name]
    on = on if corrections is None else corrections
    return QuantizationConfig.from_layout(
        layout,
        scheme=scheme,
        backend=backend,
        attention_temperature_matching=on,
        output_head_balancing=on,
    )


def build_parser() -> argparse.ArgumentParser:
    """The bench's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.quantize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--env", default="metaworld:drawer-close-v3")
    parser.add_argument("--episodes", type=int, default=20, help="0: skip the simulation")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--workers",
        type=int,
        default=4,
        help="simulator processes: their episodes share each policy call (batched)",
    )
    parser.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma-separated, of {', '.join(ARMS)} (all); the last line needs "
        f"{HEADLINE} (and shows {QUANTVLA_HEADLINE} beside it when run)",
    )
    return parser


def success(model, args) -> tuple[float, dict]:
    """Mean success, and each episode's outcome by (task, seed)."""
    if args.episodes == 0:
        return float("nan"), {}
    report = evaluate(
        model,
        args.env,
        episodes_per_task=args.episodes,
        workers=args.workers,
        videos_per_task=0,
        progress=False,
    )
    outcomes = {(e.task, e.seed): e.success for e in report.episodes}
    return report.summary()["mean_success"], outcomes


def quantized_arms(args, arms: list[str], policy, calibration, held_out, float_outcomes) -> dict:
    """Each arm quantized, measured and evaluated, one table row each; the arms that ran,
    by name: (measure's report, success)."""
    print(
        "| scheme | backend | layout | ATM/OHB | memory saved | encode | act | "
        "rel. action error | success | episodes flipped |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for name in arms:
        scheme, backend, layout, corrections = ARMS[name]
        if scheme not in supported_schemes():
            print(f"| {scheme} | {backend} | {layout} | - | unavailable here | | | | | |")
            continue
        result = quantize_policy(policy, arm_config(name), calibration)
        report = measure(policy, result, held_out)
        rate, outcomes = success(result.model, args)
        # same episodes, same noise: the episodes whose outcome quantization changed
        flipped = sum(outcomes[key] != float_outcomes[key] for key in outcomes)
        results[name] = (report, rate)
        print(
            f"| {scheme} | {backend} | {layout} | {'on' if corrections else 'off'} | "
            f"{report['memory_saved']:.0%} | {report['encode_speedup']:.2f}x | "
            f"{report['act_speedup']:.2f}x | {report['relative_action_error']:.4f} | {rate:.1%} | "
            f"{flipped} of {len(outcomes)} |"
        )
    return results


def print_headline(results: dict, float_success: float) -> None:
    """The last line: the whole-head layout, with QuantVLA's beside it when it ran."""
    report, rate = results[HEADLINE]
    beside = ""
    if QUANTVLA_HEADLINE in results:
        quantvla, quantvla_rate = results[QUANTVLA_HEADLINE]
        beside = (
            f"; QuantVLA's {QUANTVLA}: act {quantvla['act_speedup']:.2f}x, "
            f"success {quantvla_rate:.1%}"
        )
    print(
        f"w8a8: act {report['act_speedup']:.2f}x faster, quantized-module memory "
        f"-{report['memory_saved']:.0%}, success {float_success:.1%} -> {rate:.1%} "
        f"(layout {ARMS[HEADLINE][2]}{beside})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        parser.error(f"unknown arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
    os.environ.setdefault("MUJOCO_GL", "egl")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    policy = DiTVLAPolicy.from_pretrained(args.policy).eval()
    calibration = observations_from_store(args.calibration, policy.spec, args.frames)
    held_out = observations_from_store(args.calibration, policy.spec, args.frames, held_out=True)
    float_success, float_outcomes = success(policy, args)
    print(
        f"float policy: success {float_success:.1%} over {args.episodes} episodes per task "
        f"({args.env})"
    )
    results = quantized_arms(args, arms, policy, calibration, held_out, float_outcomes)
    if policy.config.head.width < HEAD_PRESETS["base"]["width"]:
        base_sized_head(policy, held_out, arms)
    if HEADLINE in results:
        print_headline(results, float_success)


def base_sized_head(policy: DiTVLAPolicy, held_out: list[dict], arms: list[str]) -> None:
    """Speed and memory of the arms on a base-sized head (random weights) for a policy
    whose head is too small for int8 kernels to matter."""
    print("\nbase-sized head (width 384, 8 blocks), random weights, batch 1:")
    config = policy.config.to_dict()
    base = DiTVLAPolicy(
        PolicyConfig.preset(
            "base",
            **{
                k: v
                for k, v in config.items()
                if k in ("cameras", "image_size", "state_dim", "action_dim", "horizon")
            },
        )
    ).eval()
    for name in arms:
        scheme, backend, layout, corrections = ARMS[name]
        if scheme not in supported_schemes() or not corrections:
            continue
        # random weights: nothing to calibrate the corrections on
        report = measure(base, quantize_policy(base, arm_config(name, False)), held_out)
        lat = report["latency"]
        print(
            f"  {scheme} {backend} {layout}: act {lat['float']['act_ms']:.1f} -> "
            f"{lat['quantized']['act_ms']:.1f} ms ({report['act_speedup']:.2f}x), encode "
            f"{report['encode_speedup']:.2f}x, memory -{report['memory_saved']:.0%}"
        )


if __name__ == "__main__":
    main()

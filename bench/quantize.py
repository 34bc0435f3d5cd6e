"""Post-training quantization of a trained policy: memory, speed, action error, success.

For each scheme (w8a8 with and without attention temperature matching / output head
balancing, w8, w4a8): memory of the quantized layers, `encode` / `act` latency at batch 1
against the float policy (same process, same threads), relative action error on held-out
frames of the calibration store, and success in simulation on the same episodes as the
float policy. A second table times the same layout on a `base`-sized head (width 384,
8 blocks; random weights: speed and memory only), where the matrix products are large
enough for int8 kernels to matter.

    python bench/quantize.py --policy runs/x/policy --calibration demos.zarr \
        --env metaworld:drawer-close-v3 --episodes 20
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

from ditvla.envs.evaluate import evaluate
from ditvla.policies.policy import DiTVLAPolicy, PolicyConfig
from ditvla.policies.quantization import (
    QuantizationConfig,
    measure,
    observations_from_store,
    quantize_policy,
    supported_schemes,
)

ARMS = [
    ("w8a8", "fbgemm", True),
    ("w8a8", "fbgemm", False),
    ("w8a8", "torchao", True),
    ("w8", "torchao", True),
    ("w4a8", "torchao", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--env", default="metaworld:drawer-close-v3")
    parser.add_argument("--episodes", type=int, default=20, help="0: skip the simulation")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    policy = DiTVLAPolicy.from_pretrained(args.policy).eval()
    calibration = observations_from_store(args.calibration, policy, args.frames)
    held_out = observations_from_store(args.calibration, policy, args.frames, held_out=True)

    def success(model) -> float:
        if args.episodes == 0:
            return float("nan")
        report = evaluate(
            model, args.env, episodes_per_task=args.episodes, videos_per_task=0, progress=False
        )
        return report.summary()["mean_success"]

    float_success = success(policy)
    print(f"float policy: success {float_success:.1%} over {args.episodes} episodes ({args.env})")
    print(
        "| scheme | backend | ATM/OHB | memory saved | encode | act | rel. action error | success |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for scheme, backend, corrections in ARMS:
        if scheme not in supported_schemes():
            print(f"| {scheme} | {backend} | - | unavailable here | | | | |")
            continue
        config = QuantizationConfig(
            scheme,
            backend,
            attention_temperature_matching=corrections,
            output_head_balancing=corrections,
        )
        result = quantize_policy(policy, config, calibration)
        report = measure(policy, result, held_out)
        rate = success(result.model)
        results[(scheme, backend, corrections)] = (report, rate)
        print(
            f"| {scheme} | {backend} | {'on' if corrections else 'off'} | "
            f"{report['memory_saved']:.0%} | {report['encode_speedup']:.2f}x | "
            f"{report['act_speedup']:.2f}x | {report['relative_action_error']:.4f} | {rate:.0%} |"
        )

    print("\nbase-sized head (width 384, 8 blocks), random weights, batch 1:")
    config = policy.config.to_dict()
    config["head"] = None
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
    for scheme, backend, _ in ARMS[:1] + ARMS[2:]:
        if scheme not in supported_schemes():
            continue
        result = quantize_policy(
            base,
            QuantizationConfig(
                scheme, backend, attention_temperature_matching=False, output_head_balancing=False
            ),
        )
        report = measure(base, result, held_out)
        lat = report["latency"]
        print(
            f"  {scheme} {backend}: act {lat['float']['act_ms']:.1f} -> {lat['quantized']['act_ms']:.1f} ms "
            f"({report['act_speedup']:.2f}x), encode {report['encode_speedup']:.2f}x, "
            f"memory -{report['memory_saved']:.0%}"
        )
        results[("base", scheme, backend)] = (report, None)

    report, rate = results[("w8a8", "fbgemm", True)]
    base_report = results[("base", "w8a8", "fbgemm")][0]
    print(
        f"w8a8: act {report['act_speedup']:.2f}x faster (base head {base_report['act_speedup']:.2f}x), "
        f"quantized-module memory -{report['memory_saved']:.0%}, success {float_success:.0%} -> {rate:.0%}"
    )


if __name__ == "__main__":
    main()

"""Fewer, cheaper denoising steps: every sampler arm of a trained policy, side by side.

Arms: the policy's own step count (the reference, plain sampling), plain Euler/DDIM at
fewer steps, TaylorSeer forecasting (a fixed plan of full and forecast steps) and its
confidence-gated variant, at the reference's step count. For each arm: ``act`` latency
at batch 1 (all arms timed in turn, medians), the relative action error against the
reference on held-out frames of a store with the same initial noise, and, with
``--env``, success over the same episodes and noise (the evaluator's seeds 100000 up).

    python bench/head_acceleration.py --policy runs/x/policy --dataset demos.zarr \\
        [--env metaworld:drawer-close-v3,...] [--episodes 20]

Last line: ``fastest within 2 points: <arm> act <x>x vs the reference (success <a>% ->
<b>%; plain sampling at that speed <c>%)`` (with --env), else the fastest arm within 5%
relative action error. Not here yet (issue 18): multimodal demonstrations, few-step
students, the quantized student, SmolVLA's expert.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from ditvla.contract import load_policy
from ditvla.datasets.observations import observations_from_store
from ditvla.policies.forecasting import ForecastConfig
from ditvla.policies.timing import paired_median_ms

OFF = ForecastConfig()


def arms(reference: int) -> dict[str, tuple[int, ForecastConfig]]:
    out = {f"reference ({reference} steps)": (reference, OFF)}
    for steps in (4, 2, 1):
        if steps < reference:
            out[f"plain {steps} steps"] = (steps, OFF)
    out[f"taylor every 2 ({reference} steps)"] = (reference, ForecastConfig("taylor", interval=2))
    out[f"taylor every 3 ({reference} steps)"] = (reference, ForecastConfig("taylor", interval=3))
    out[f"gated 0.05 ({reference} steps)"] = (reference, ForecastConfig("gated", threshold=0.05))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument(
        "--dataset", required=True, help="held-out frames: its last 20%% of episodes"
    )
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--env", help="evaluate each arm's success on these tasks")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--out", default="outputs/head_acceleration")
    args = parser.parse_args()

    torch.manual_seed(0)
    policy = load_policy(args.policy)
    reference = policy.config.num_inference_steps
    plans = arms(reference)
    held_out = observations_from_store(args.dataset, policy.spec, args.frames, held_out=True)
    one = {
        "images": {c: v[:1] for c, v in held_out[0]["images"].items()},
        "instruction": held_out[0]["instruction"][:1],
        "state": held_out[0]["state"][:1],
    }
    with torch.inference_mode():
        context = policy.encode(one)
        latency = dict(
            zip(
                plans,
                paired_median_ms(
                    [
                        lambda s=s, f=f: policy.act(context, one["state"], num_steps=s, forecast=f)
                        for s, f in plans.values()
                    ],
                    args.repeats,
                ),
                strict=True,
            )
        )
        errors = {name: [] for name in plans}
        generator = torch.Generator().manual_seed(0)
        for obs in held_out:
            ctx = policy.encode(obs)
            noise = torch.randn(len(obs["instruction"]), *policy.noise_shape, generator=generator)
            chunks = {
                name: policy.act(ctx, obs["state"], noise=noise, num_steps=s, forecast=f)
                for name, (s, f) in plans.items()
            }
            ref = chunks[next(iter(plans))]
            for name, chunk in chunks.items():
                errors[name].append(float((chunk - ref).norm() / ref.norm().clamp(min=1e-8)))
    ref_name = next(iter(plans))
    results = {
        name: {
            "steps": s,
            "forecast": f.mode,
            "act_ms": latency[name],
            "speedup": latency[ref_name] / latency[name],
            "relative_action_error": sum(errors[name]) / len(errors[name]),
        }
        for name, (s, f) in plans.items()
    }
    if args.env:
        from ditvla.envs.evaluate import evaluate

        base = policy.config
        for name, (s, f) in plans.items():
            policy.config = replace(base, num_inference_steps=s, forecast=f)
            summary = evaluate(policy, args.env, episodes_per_task=args.episodes).summary()
            results[name]["success"] = summary["mean_success"]
        policy.config = base
    rows = [
        "| arm | act (batch 1) | vs reference | relative action error | success |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        success = f"{r['success']:.1%}" if "success" in r else "-"
        rows.append(
            f"| {name} | {r['act_ms']:.2f} ms | {r['speedup']:.2f}x | "
            f"{r['relative_action_error']:.3f} | {success} |"
        )
    print("\n".join(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.env:
        a = results[ref_name]["success"]
        keep = {n: r for n, r in results.items() if r["success"] >= a - 0.02}
        best = max(keep, key=lambda n: keep[n]["speedup"])
        plain = [
            r
            for n, r in results.items()
            if r["forecast"] == "off"
            and n != ref_name
            and r["speedup"] >= keep[best]["speedup"] * 0.9
        ]
        c = f"{plain[0]['success']:.1%}" if plain else "n/a"
        print(
            f"fastest within 2 points: {best} act {keep[best]['speedup']:.2f}x vs the "
            f"reference (success {a:.1%} -> {keep[best]['success']:.1%}; plain sampling at "
            f"that speed {c})"
        )
    else:
        keep = {n: r for n, r in results.items() if r["relative_action_error"] <= 0.05}
        best = max(keep, key=lambda n: keep[n]["speedup"])
        print(
            f"fastest within 5% action error: {best} act {keep[best]['speedup']:.2f}x vs "
            f"the reference (relative action error {keep[best]['relative_action_error']:.3f})"
        )


if __name__ == "__main__":
    main()

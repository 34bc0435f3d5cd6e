"""Fewer, cheaper denoising steps: every sampler arm of a trained policy, side by side.

Arms: the policy's own step count (the reference, plain sampling), plain Euler/DDIM at
fewer steps, TaylorSeer forecasting (a fixed plan of full and forecast steps) and its
confidence-gated variant, at the reference's step count; with ``--student`` a few-step
student of the policy (``ditvla distill``) and that student quantized (w8a8, the whole
head and the language MLPs, calibrated on the store's frames). For each arm: ``act``
latency at batch 1 (all arms timed in turn, medians), the relative action error against
the reference on held-out frames of a store with the same initial noise, and, with
``--env``, success over the same episodes and noise (the evaluator's seeds 100000 up).

    python bench/head_acceleration.py --policy runs/x/policy --dataset demos.zarr \\
        [--student runs/x/student] [--env metaworld:reach-wall-v3] [--episodes 20]

Last line: ``fastest within 2 points: <arm> act <x>x vs the reference (success <a>% ->
<b>%; plain euler at that speed <c>%)`` (with --env), else the fastest arm within 5%
relative action error. Not here yet (issue 18): SmolVLA's expert trained on the same data.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ditvla.contract import load_policy
from ditvla.datasets.observations import observations_from_store
from ditvla.policies.forecasting import ForecastConfig
from ditvla.policies.quantization import QuantizationConfig, quantize_policy
from ditvla.policies.timing import paired_median_ms

OFF = ForecastConfig()
STUDENT_INT8 = "language_mlp,head_mlp,head_attention,head_modulation"


@dataclass
class Arm:
    policy: torch.nn.Module
    steps: int
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    kind: str = "plain"  # plain, forecast, student


def arms(policy, student=None, student_int8=None) -> dict[str, Arm]:
    reference = policy.config.num_inference_steps
    out = {f"reference ({reference} steps)": Arm(policy, reference)}
    for steps in (4, 2, 1):
        if steps < reference:
            out[f"plain {steps} steps"] = Arm(policy, steps)
    for interval in (2, 3):
        out[f"taylor every {interval} ({reference} steps)"] = Arm(
            policy, reference, ForecastConfig("taylor", interval=interval), "forecast"
        )
    out[f"gated 0.05 ({reference} steps)"] = Arm(
        policy, reference, ForecastConfig("gated", threshold=0.05), "forecast"
    )
    if student is not None:
        steps = student.config.num_inference_steps
        out[f"student ({steps} steps)"] = Arm(student, steps, kind="student")
        out[f"student int8 ({steps} steps)"] = Arm(student_int8, steps, kind="student")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument(
        "--dataset", required=True, help="held-out frames: its last 20%% of episodes"
    )
    parser.add_argument("--student", help="a few-step student of --policy (ditvla distill)")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--env", help="evaluate each arm's success on these tasks")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--out", default="outputs/head_acceleration")
    args = parser.parse_args()

    torch.manual_seed(0)
    policy = load_policy(args.policy)
    student = student_int8 = None
    if args.student:
        student = load_policy(args.student)
        calibration = observations_from_store(args.dataset, student.spec, 32)
        student_int8 = quantize_policy(
            student, QuantizationConfig.from_layout(STUDENT_INT8), calibration
        ).model.eval()
    plans = arms(policy, student, student_int8)
    held_out = observations_from_store(args.dataset, policy.spec, args.frames, held_out=True)
    one = {
        "images": {c: v[:1] for c, v in held_out[0]["images"].items()},
        "instruction": held_out[0]["instruction"][:1],
        "state": held_out[0]["state"][:1],
    }
    with torch.inference_mode():
        policies = {id(a.policy): a.policy for a in plans.values()}  # each encodes once
        contexts = {key: p.encode(one) for key, p in policies.items()}
        latency = dict(
            zip(
                plans,
                paired_median_ms(
                    [
                        lambda a=a: a.policy.act(
                            contexts[id(a.policy)],
                            one["state"],
                            num_steps=a.steps,
                            forecast=a.forecast,
                        )
                        for a in plans.values()
                    ],
                    args.repeats,
                ),
                strict=True,
            )
        )
        errors = {name: [] for name in plans}
        generator = torch.Generator().manual_seed(0)
        for obs in held_out:
            ctx = {key: p.encode(obs) for key, p in policies.items()}
            noise = torch.randn(len(obs["instruction"]), *policy.noise_shape, generator=generator)
            chunks = {
                name: a.policy.act(
                    ctx[id(a.policy)],
                    obs["state"],
                    noise=noise,
                    num_steps=a.steps,
                    forecast=a.forecast,
                )
                for name, a in plans.items()
            }
            ref = chunks[next(iter(plans))]
            for name, chunk in chunks.items():
                errors[name].append(float((chunk - ref).norm() / ref.norm().clamp(min=1e-8)))
    ref_name = next(iter(plans))
    results = {
        name: {
            "steps": a.steps,
            "kind": a.kind,
            "forecast": a.forecast.mode,
            "act_ms": latency[name],
            "speedup": latency[ref_name] / latency[name],
            "relative_action_error": sum(errors[name]) / len(errors[name]),
        }
        for name, a in plans.items()
    }
    if args.env:
        from ditvla.envs.evaluate import evaluate

        for name, a in plans.items():
            base = a.policy.config
            a.policy.config = replace(base, num_inference_steps=a.steps, forecast=a.forecast)
            summary = evaluate(a.policy, args.env, episodes_per_task=args.episodes).summary()
            a.policy.config = base
            results[name]["success"] = summary["mean_success"]
            results[name]["tasks"] = summary["tasks"]
            results[name]["observation"] = summary["observation"]
            print(f"{name}: success {summary['mean_success']:.1%}", flush=True)
    rows = [
        "| arm | act (batch 1) | vs reference | relative action error | success |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        success = "-"
        if "success" in r:
            lows, highs = zip(*(t["ci95"] for t in r["tasks"].values()), strict=True)
            interval = f" ({min(lows):.0%}-{max(highs):.0%})" if len(lows) == 1 else ""
            success = f"{r['success']:.1%}{interval}"
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
            if r["kind"] == "plain" and n != ref_name and r["steps"] <= keep[best]["steps"]
        ]
        c = f"{plain[0]['success']:.1%}" if plain else "n/a"
        print(
            f"fastest within 2 points: {best} act {keep[best]['speedup']:.2f}x vs the "
            f"reference (success {a:.1%} -> {keep[best]['success']:.1%}; plain euler at "
            f"that speed {c}); smolvla expert: not measured"
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

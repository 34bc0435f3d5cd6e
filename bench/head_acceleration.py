"""Fewer, cheaper denoising steps: every sampler arm of a trained policy, side by side.

Arms: the policy's own step count (the reference, plain sampling), plain Euler/DDIM at
fewer steps, the policy quantized (w8a8, the whole head and the language MLPs, calibrated
on 32 of the store's frames) and its head in bfloat16 at those fewer steps, TaylorSeer
forecasting (a fixed plan of full and forecast steps) and its confidence-gated variant, at
the reference's step count; with
``--student`` few-step students of the policy (``ditvla distill``, several allowed) and
each student quantized the same way. For each arm: ``act``
latency at batch 1 (all arms timed in turn, medians), the relative action error against
the reference on held-out frames of a store with the same initial noise, and, with
``--env``, success over the same episodes and noise (the evaluator's seeds 100000 up).

    python -m bench.head_acceleration --policy runs/x/policy --dataset demos.zarr \\
        [--student runs/x/student2 runs/x/student1] [--env metaworld:reach-wall-v3] \\
        [--episodes 20]

With ``--env`` and ``--smolvla-budget-s S``, LeRobot's SmolVLA is built offline with its
expert at the head's width, depth and attention heads (its VLM narrow, with as many layers
and heads as the expert: SmolVLA's expert mirrors its VLM), trained on the same store for S
seconds or ``--smolvla-steps`` steps (saved under OUT/smolvla; ``--smolvla OUT/smolvla``
reuses it), evaluated on the same episodes at 10, 4,
2 and 1 Euler steps; its expert's steps over a precomputed prefix cache (the part our
``act`` matches) are timed in turn with our fastest arm, eager and with both denoising
steps compiled (torch.compile, frozen weights), and eager with its expert in bfloat16.

Last line: ``fastest within 2 points: <arm> act <x>x vs the reference (success <a>% ->
<b>%; plain euler at that speed <c>% at <k> steps), <y>x vs smolvla expert at its fewest
steps`` (with --env; plain euler at that speed: the most plain float steps at least as fast
as the arm, else 1), else the fastest arm within 5% relative action error.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.compilation import compiled
from bench.lerobot_adapter import LeRobotAdapter
from bench.lerobot_batches import batches_for_lerobot, lerobot_batch
from bench.lerobot_training import train_for
from bench.smolvla_peer import smolvla_expert_sampler, tiny_smolvla
from ditvla.contract import load_policy
from ditvla.datasets.observations import observations_from_store
from ditvla.policies.forecasting import ForecastConfig
from ditvla.policies.quantization import QuantizationConfig, quantize_policy
from ditvla.policies.timing import paired_median_ms
from ditvla.training.step_calibration import evaluate_with

OFF = ForecastConfig()
INT8_LAYOUT = "language_mlp,head_mlp,head_attention,head_modulation"
SMOLVLA_STEPS = (10, 4, 2, 1)  # the first is its reference (SmolVLA's default)


@dataclass
class Arm:
    policy: torch.nn.Module
    steps: int
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    kind: str = "plain"  # plain, forecast, student, quantized, bfloat16


def arms(policy, policy_int8, policy_bf16, students=()) -> dict[str, Arm]:
    """The arms by name; ``students``: (name, student, student quantized) triples."""
    reference = policy.config.num_inference_steps
    out = {f"reference ({reference} steps)": Arm(policy, reference)}
    fewer = [steps for steps in (4, 2, 1) if steps < reference]
    for steps in fewer:
        out[f"plain {steps} steps"] = Arm(policy, steps)
    for steps in fewer:  # each composes with step reduction
        out[f"int8 {steps} steps"] = Arm(policy_int8, steps, kind="quantized")
        out[f"bfloat16 {steps} steps"] = Arm(policy_bf16, steps, kind="bfloat16")
    for interval in (2, 3):
        out[f"taylor every {interval} ({reference} steps)"] = Arm(
            policy, reference, ForecastConfig("taylor", interval=interval), "forecast"
        )
    out[f"gated 0.05 ({reference} steps)"] = Arm(
        policy, reference, ForecastConfig("gated", threshold=0.05), "forecast"
    )
    for name, student, student_int8 in students:
        steps = student.config.num_inference_steps
        out[f"{name} ({steps} steps)"] = Arm(student, steps, kind="student")
        out[f"{name} int8 ({steps} steps)"] = Arm(student_int8, steps, kind="quantized")
    return out


def act_once(arm: Arm, context, one: dict):
    """One batch-1 ``act`` of ``arm`` on an encoded observation, as a timing closure."""
    return lambda: arm.policy.act(context, one["state"], num_steps=arm.steps, forecast=arm.forecast)


def trained_smolvla(args, policy):
    """LeRobot's SmolVLA with its expert at ``policy``'s head size and its processors,
    trained on ``args.dataset`` (for ``--smolvla-budget-s`` seconds or ``--smolvla-steps``
    steps, then saved under OUT/smolvla) or loaded from ``--smolvla``; and its training
    record."""
    from safetensors.torch import load_model, save_model

    from ditvla.datasets.torch_dataset import ReplayBufferDataset

    spec, head = policy.spec, policy.config.head
    folder = Path(args.smolvla) if args.smolvla else Path(args.out) / "smolvla"
    folder.mkdir(parents=True, exist_ok=True)
    data = ReplayBufferDataset(
        args.dataset, cameras=spec.cameras, state_keys=spec.state_keys
    ).data_spec()
    smolvla, pre, post = tiny_smolvla(
        folder / "vlm",
        data,
        horizon=spec.horizon,
        n_action_steps=spec.n_action_steps,
        layers=head.depth,
        expert_width=head.width,
        heads=head.num_heads,
    )
    if args.smolvla:
        load_model(smolvla, str(folder / "model.safetensors"))
        return smolvla, pre, post, json.loads((folder / "training.json").read_text())
    batches = batches_for_lerobot(Path(args.dataset), spec, batch_size=32)
    training = train_for(
        smolvla,
        pre,
        batches,
        args.smolvla_budget_s,
        name="smolvla",
        max_steps=args.smolvla_steps,
    )
    save_model(smolvla, str(folder / "model.safetensors"))
    (folder / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return smolvla, pre, post, training


def smolvla_expert(args, policy, one: dict, best: Arm, best_act) -> dict:
    """LeRobot's SmolVLA (:func:`trained_smolvla`): its success at each of SMOLVLA_STEPS
    over the same episodes, and its expert's latency against ``best_act`` (our fastest
    arm), eager and compiled."""
    from ditvla.envs.evaluate import evaluate

    smolvla, pre, post, training = trained_smolvla(args, policy)
    expert_params = sum(p.numel() for p in smolvla.model.vlm_with_expert.lm_expert.parameters())
    adapter = LeRobotAdapter(smolvla, pre, post, policy.spec, reads_task=True)
    success, tasks = {}, {}
    for steps in SMOLVLA_STEPS:
        smolvla.config.num_steps = steps
        torch.manual_seed(0)
        summary = evaluate(adapter, args.env, episodes_per_task=args.episodes).summary()
        success[steps], tasks[steps] = summary["mean_success"], summary["tasks"]
        print(f"smolvla expert, {steps} steps: success {summary['mean_success']:.1%}", flush=True)
    reference = success[SMOLVLA_STEPS[0]]
    fewest = min(s for s in SMOLVLA_STEPS if success[s] >= reference - 0.02)
    batch = pre(lerobot_batch(one["images"], one["state"], list(one["instruction"])))
    eager = [smolvla_expert_sampler(smolvla, batch, steps) for steps in SMOLVLA_STEPS]
    eager.append(smolvla_expert_sampler(smolvla, batch, fewest, dtype=torch.bfloat16))
    ours_ms, *theirs_ms, theirs_bf16_ms = paired_median_ms([best_act, *eager], args.repeats)
    their_step = compiled(smolvla.model.denoise_step)
    best.policy.head.forward = compiled(best.policy.head.forward)
    try:  # the first calls compile (the untimed warm-up)
        ours_compiled_ms, theirs_compiled_ms = paired_median_ms(
            [best_act, smolvla_expert_sampler(smolvla, batch, fewest, their_step)],
            args.repeats,
        )
    finally:
        del best.policy.head.forward  # the module's own forward again
    at_fewest = theirs_ms[SMOLVLA_STEPS.index(fewest)]
    return {
        "training": training,
        "expert_parameters": expert_params,
        "head_parameters": sum(p.numel() for p in policy.head.parameters()),  # float
        "success": success,
        "tasks": tasks,
        "fewest_steps": fewest,
        "expert_ms": dict(zip(SMOLVLA_STEPS, theirs_ms, strict=True)),
        "ours_ms": ours_ms,
        "speedup_eager": at_fewest / ours_ms,
        "expert_bf16_ms": theirs_bf16_ms,  # its expert's weights in bfloat16, at fewest
        "speedup_eager_vs_bf16": theirs_bf16_ms / ours_ms,
        "compiled_ms": {"ours": ours_compiled_ms, "theirs": theirs_compiled_ms},
        "speedup_compiled": theirs_compiled_ms / ours_compiled_ms,
    }


def build_parser() -> argparse.ArgumentParser:
    """The bench's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.head_acceleration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", required=True)
    parser.add_argument(
        "--dataset", required=True, help="held-out frames: its last 20%% of episodes"
    )
    parser.add_argument(
        "--student",
        nargs="+",
        default=[],
        help="few-step students of --policy (ditvla distill), one arm each",
    )
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--env", help="evaluate each arm's success on these tasks")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--out", default="outputs/head_acceleration")
    parser.add_argument(
        "--smolvla-budget-s",
        type=float,
        help="with --env: train LeRobot's SmolVLA (expert at the head's size) on --dataset "
        "for this many seconds and add its expert's arms",
    )
    parser.add_argument(
        "--smolvla-steps",
        type=int,
        help="as --smolvla-budget-s, for this many training steps (batch 32) instead",
    )
    parser.add_argument("--smolvla", help="a SmolVLA an earlier run saved (OUT/smolvla)")
    return parser


def wants_smolvla(args) -> bool:
    """Whether the command asks for SmolVLA's expert arms (trained here or loaded)."""
    return bool(args.smolvla_budget_s or args.smolvla_steps or args.smolvla)


def load_arms(args) -> tuple[torch.nn.Module, dict[str, Arm]]:
    """The policy and every arm of it: quantized (calibrated on 32 of the store's
    frames), in bfloat16, and the students given, each quantized too."""
    policy = load_policy(args.policy)
    int8 = QuantizationConfig.from_layout(INT8_LAYOUT)
    calibration = observations_from_store(args.dataset, policy.spec, 32)
    policy_int8 = quantize_policy(policy, int8, calibration).model.eval()
    students = []
    loaded = [load_policy(folder) for folder in args.student]
    counts = [student.config.num_inference_steps for student in loaded]
    for folder, student in zip(args.student, loaded, strict=True):
        # named by their step counts where those tell them apart, else by their folders
        name = "student" if len(set(counts)) == len(counts) else f"student {Path(folder).name}"
        students.append((name, student, quantize_policy(student, int8, calibration).model.eval()))
    policy_bf16 = load_policy(args.policy, head_dtype="bfloat16")
    return policy, arms(policy, policy_int8, policy_bf16, students)


def first_frame(observations: dict) -> dict:
    """The first frame of a batch of observations, as a batch of one."""
    return {
        "images": {c: v[:1] for c, v in observations["images"].items()},
        "instruction": observations["instruction"][:1],
        "state": observations["state"][:1],
    }


@torch.inference_mode()
def latency_and_error(args, policy, plans: dict[str, Arm], held_out: list[dict], one: dict):
    """Each arm's ``act`` latency at batch 1 (timed in turn, medians), its timing closure,
    and its relative action errors against the reference over ``held_out`` (the same
    initial noise for every arm)."""
    policies = {id(a.policy): a.policy for a in plans.values()}  # each encodes once
    contexts = {key: p.encode(one) for key, p in policies.items()}
    acts = {name: act_once(a, contexts[id(a.policy)], one) for name, a in plans.items()}
    latency = dict(zip(plans, paired_median_ms(list(acts.values()), args.repeats), strict=True))
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
    return latency, acts, errors


def arm_results(plans: dict[str, Arm], latency: dict, errors: dict) -> dict[str, dict]:
    """Each arm's record: its steps, kind, latency, speed-up and mean action error."""
    ref_name = next(iter(plans))
    return {
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


def add_success(args, plans: dict[str, Arm], results: dict[str, dict]) -> None:
    """Each arm's success on ``args.env``, over the same episodes and noise, into
    ``results``."""
    from ditvla.envs.evaluate import EvalConfig

    for name, a in plans.items():
        summary = evaluate_with(
            a.policy,
            args.env,
            EvalConfig(episodes_per_task=args.episodes),
            num_inference_steps=a.steps,
            forecast=a.forecast,
        )
        results[name]["success"] = summary["mean_success"]
        results[name]["tasks"] = summary["tasks"]
        results[name]["observation"] = summary["observation"]
        print(f"{name}: success {summary['mean_success']:.1%}", flush=True)


def print_table(results: dict[str, dict]) -> None:
    """The arms as a markdown table."""
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


def report_by_success(args, policy, plans, acts, one, results, out: Path) -> None:
    """The last line with ``--env``: the fastest arm within 2 points of the reference's
    success, plain Euler at that speed, and (when asked) SmolVLA's expert against it."""
    ref_name = next(iter(plans))
    a = results[ref_name]["success"]
    keep = {n: r for n, r in results.items() if r["success"] >= a - 0.02}
    best = max(keep, key=lambda n: keep[n]["speedup"])
    # plain (float) Euler at that speed: the most steps that are at least as fast as
    # the best arm, else the fewest steps (the fastest plain arm)
    plain = sorted(
        (r for n, r in results.items() if r["kind"] == "plain" and n != ref_name),
        key=lambda r: r["steps"],
    )
    as_fast = [r for r in plain if r["speedup"] >= keep[best]["speedup"]]
    match = as_fast[-1] if as_fast else (plain[0] if plain else None)
    c = f"{match['success']:.1%} at {match['steps']} steps" if match else "n/a"
    versus = "smolvla expert: not measured"
    if wants_smolvla(args):
        expert = smolvla_expert(args, policy, one, plans[best], acts[best])
        results["smolvla expert"] = expert
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        versus = (
            f"{expert['speedup_eager']:.2f}x vs smolvla expert at its fewest steps "
            f"({expert['fewest_steps']} steps, success {expert['success'][10]:.1%} -> "
            f"{expert['success'][expert['fewest_steps']]:.1%}; compiled both: "
            f"{expert['speedup_compiled']:.2f}x; its expert in bfloat16 too: "
            f"{expert['speedup_eager_vs_bf16']:.2f}x)"
        )
    print(
        f"fastest within 2 points: {best} act {keep[best]['speedup']:.2f}x vs the "
        f"reference (success {a:.1%} -> {keep[best]['success']:.1%}; plain euler at "
        f"that speed {c}), {versus}"
    )


def report_by_action_error(results: dict[str, dict]) -> None:
    """The last line without ``--env``: the fastest arm within 5% relative action error."""
    keep = {n: r for n, r in results.items() if r["relative_action_error"] <= 0.05}
    best = max(keep, key=lambda n: keep[n]["speedup"])
    print(
        f"fastest within 5% action error: {best} act {keep[best]['speedup']:.2f}x vs "
        f"the reference (relative action error {keep[best]['relative_action_error']:.3f})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if wants_smolvla(args) and not args.env:
        parser.error("the SmolVLA expert arms need --env (its fewest steps are set by success)")

    torch.manual_seed(0)
    policy, plans = load_arms(args)
    held_out = observations_from_store(args.dataset, policy.spec, args.frames, held_out=True)
    one = first_frame(held_out[0])
    latency, acts, errors = latency_and_error(args, policy, plans, held_out, one)
    results = arm_results(plans, latency, errors)
    if args.env:
        add_success(args, plans, results)
    print_table(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.env:
        report_by_success(args, policy, plans, acts, one, results, out)
    else:
        report_by_action_error(results)


if __name__ == "__main__":
    main()

"""``ditvla train``, ``distill``, ``calibrate-steps`` and ``quantize``: make a policy, and
make it cheaper to run."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ditvla.cli.config_options import add_config_options, field_docs, given_options
from ditvla.cli.subcommand import ENV_HELP, Commands, add_command
from ditvla.contract import CONFIG_FILE
from ditvla.errors import ConfigError


# ---------------------------------------------------------------------- train
def run_train(args: argparse.Namespace) -> int:
    from ditvla.policies.config import PolicyConfig
    from ditvla.training.trainer import TrainConfig, train

    overrides = given_options(args, PolicyConfig, prefix="policy.")
    config = TrainConfig(**given_options(args, TrainConfig), policy_overrides=overrides)
    print(f"policy: {train(config)}")
    return 0


def add_train(commands: Commands, configured: bool) -> None:
    train = add_command(
        commands,
        "train",
        run_train,
        "train a policy on a zarr replay buffer",
        "Train a VLM + DiT policy. Writes OUT/policy (the final, EMA weights), "
        "OUT/checkpoints/step_N (every --save-every steps, atomically), OUT/metrics.jsonl and "
        "OUT/tensorboard. Several GPUs or nodes: torchrun --nproc_per_node N -m ditvla.cli "
        "train ... Policy options (--policy.*) override the preset's.",
    )
    if not configured:
        return
    from typing import get_args

    from ditvla.policies.config import PolicyConfig, PresetName
    from ditvla.training.trainer import TrainConfig

    add_config_options(train, TrainConfig, exclude=("preset", "policy_overrides"))
    train.add_argument(
        "--policy.preset",
        dest="preset",
        default=argparse.SUPPRESS,
        choices=get_args(PresetName),
        help=f"{field_docs(TrainConfig)['preset']} (default: {TrainConfig.preset})",
    )
    add_config_options(train, PolicyConfig, prefix="policy.")


# ---------------------------------------------------------------------- policy folders
def claim_policy_out(args: argparse.Namespace) -> None:
    """Make ``--out`` ready for the policy a command writes from ``--policy``: never the
    folder it reads; a folder that holds anything is refused unless ``--overwrite``, and
    then only a policy folder (its ``config.json``) is replaced, never other files."""
    out, source = Path(args.out), Path(args.policy)
    if out.resolve() == source.resolve():
        raise ConfigError(f"--out {out} is the policy that --policy reads: choose another folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / CONFIG_FILE).is_file():
        raise ConfigError(f"--out {out} holds files that are not a policy: choose another folder")
    if not args.overwrite:
        raise ConfigError(
            f"--out {out} holds a policy; --overwrite replaces it, or choose another --out"
        )
    shutil.rmtree(out)


def add_overwrite(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the policy folder at --out (a folder holding one is refused without it)",
    )


# ---------------------------------------------------------------------- distill
def run_distill(args: argparse.Namespace) -> int:
    from ditvla.training.distillation import DistillConfig, distill

    claim_policy_out(args)
    record = distill(
        args.policy, args.dataset, args.out, DistillConfig(**given_options(args, DistillConfig))
    )
    print(
        f"{args.out}: a {record['student_steps']}-step student of {args.policy} "
        f"({record['teacher_steps']} steps), final distillation loss {record['final_loss']:.4f}"
    )
    return 0


def add_distill(commands: Commands, configured: bool) -> None:
    distill = add_command(
        commands,
        "distill",
        run_distill,
        "train a 1-2 step student of a many-step policy",
        "Copy the policy, then train the copy's action head to reproduce, in --student-steps "
        "denoising steps, the chunk the policy samples from the same noise in its own steps "
        "(or --teacher-steps), on frames of a zarr store (its first 80% of episodes), so "
        "that each noise goes to the mode the teacher's sampler reaches from it; "
        "--flow-weight adds the flow-matching loss on the demonstrated chunks. A student "
        "can teach a student with fewer steps (progressive: 10 -> 2 -> 1). Writes a "
        "policy folder that eval, serve, quantize and calibrate-steps take.",
    )
    distill.add_argument(
        "--policy", required=True, help="the teacher: a saved policy folder (a student too)"
    )
    distill.add_argument("--dataset", required=True, help="a zarr store the policy fits")
    distill.add_argument("--out", required=True, help="the student policy folder to write")
    add_overwrite(distill)
    if configured:
        from ditvla.training.distillation import DistillConfig

        add_config_options(distill, DistillConfig)


# ---------------------------------------------------------------------- calibrate-steps
def run_calibrate_steps(args: argparse.Namespace) -> int:
    from ditvla.contract import load_policy
    from ditvla.policies.policy import dit_policy
    from ditvla.training.step_calibration import (
        CalibrateConfig,
        calibrate_steps,
        calibrate_steps_by_success,
        write_steps,
    )

    if (args.dataset is None) == (args.env is None):
        raise ConfigError(
            "calibrate-steps needs one of --dataset (action error) or --env (success)"
        )
    config = CalibrateConfig(**given_options(args, CalibrateConfig))
    policy = dit_policy(load_policy(args.policy), args.policy, "calibrate-steps")
    if args.env is not None:
        calibration = calibrate_steps_by_success(policy, args.env, config)
        within = f"{config.points:g} points of {calibration.reference_steps} steps' success"
    else:
        calibration = calibrate_steps(policy, args.dataset, config)
        within = f"{config.tolerance:.0%}"
    print(calibration.markdown())
    if args.dry_run:
        print(f"fewest steps within {within}: {calibration.chosen_steps} (not written)")
    else:
        write_steps(args.policy, calibration)
        print(
            f"{args.policy}: num_inference_steps {calibration.reference_steps} -> "
            f"{calibration.chosen_steps}"
        )
    return 0


def add_calibrate_steps(commands: Commands, configured: bool) -> None:
    calibrate = add_command(
        commands,
        "calibrate-steps",
        run_calibrate_steps,
        "the fewest denoising steps that keep a policy's action error or success",
        "With --dataset: on held-out frames of a zarr store (its last 20% of episodes), "
        "sample each step count up to the policy's own from the same noise, measure the "
        "error against the demonstrated chunks, and write the fewest steps within "
        "--tolerance of the policy's own error into the policy folder (eval and serve use "
        "it). With --env: evaluate the policy's own step count in the simulator, then each "
        "fewer from 1 up over the same episodes and noise, and write the first within "
        "--points of its success. Action error is the cheap proxy; success is what counts "
        "(docs/benchmarks.md has a policy whose error was lowest at 1 step and whose "
        "success fell 25 points there).",
    )
    calibrate.add_argument("--policy", required=True, help="a saved policy folder")
    calibrate.add_argument("--dataset", help="a zarr store the policy fits (action error)")
    calibrate.add_argument("--env", help="evaluate success on these tasks instead: " + ENV_HELP)
    calibrate.add_argument(
        "--dry-run", action="store_true", help="measure and print; leave the policy as it is"
    )
    if configured:
        from ditvla.training.step_calibration import CalibrateConfig

        add_config_options(calibrate, CalibrateConfig)


# ---------------------------------------------------------------------- quantize
def run_quantize(args: argparse.Namespace) -> int:
    from ditvla.contract import load_policy
    from ditvla.datasets.observations import observations_from_store
    from ditvla.policies.quantization import (
        QuantizationConfig,
        measure,
        quantize_policy,
        report_markdown,
    )

    claim_policy_out(args)
    config = QuantizationConfig.from_layout(args.layout, **given_options(args, QuantizationConfig))
    policy = load_policy(args.policy)
    calibration = observations_from_store(args.calibration, policy.spec, args.frames)
    result = quantize_policy(policy, config, calibration)
    out = Path(args.out)
    result.save(out)
    held_out = observations_from_store(args.calibration, policy.spec, args.frames, held_out=True)
    report = measure(policy, result, held_out)
    (out / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quantization_report.md").write_text(report_markdown(report))
    print(report_markdown(report))
    print(f"quantized policy: {out}")
    return 0


def add_quantize(commands: Commands, configured: bool) -> None:
    quantize = add_command(
        commands,
        "quantize",
        run_quantize,
        "post-training quantization of a saved policy (QuantVLA-style)",
        "Integerize the layers --layout names (by default QuantVLA's: the language model's "
        "and the DiT heads' MLPs), calibrate attention temperature matching and output head "
        "balancing on frames of a zarr store, and write a policy folder that eval and serve "
        "load like any other, with OUT/quantization_report.{md,json} (memory, latency, "
        "action error).",
    )
    quantize.add_argument("--policy", required=True, help="a saved (float) policy folder")
    quantize.add_argument("--calibration", required=True, help="a zarr store the policy fits")
    quantize.add_argument("--out", required=True, help="the quantized policy folder to write")
    add_overwrite(quantize)
    quantize.add_argument("--frames", type=int, default=64, help="calibration frames")
    if not configured:
        return
    from ditvla.policies.quantization import QuantizationConfig

    quantize.add_argument(
        "--layout",
        default=QuantizationConfig().layout,
        help="what to integerize, comma-separated: language_mlp, head_mlp, head_attention "
        "(the DiT heads' attention projections: faster act on CPU, see docs/quantization.md), "
        "head_modulation (the heads' adaLN modulation layers)",
    )
    add_config_options(quantize, QuantizationConfig)

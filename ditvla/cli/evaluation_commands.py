"""``ditvla eval`` and ``ditvla demo``: success rates in simulators."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import get_args

from ditvla.cli.config_options import add_config_options, given_options
from ditvla.cli.subcommand import ENV_HELP, Commands, add_command
from ditvla.contract import STATE_PROPRIO, HeadDType

SCRATCH_OUT = "outputs/eval"  # ditvla eval's folder when it is given none


# ---------------------------------------------------------------------- demo
def run_demo(args: argparse.Namespace) -> int:
    from ditvla.demo import run_demo

    return run_demo(Path(args.out), quick=args.quick, state=args.state, robustness=args.robustness)


def add_demo(commands: Commands, configured: bool) -> None:
    demo = add_command(
        commands,
        "demo",
        run_demo,
        "collect, train and evaluate on seven Meta-World tasks from pixels, proprioception "
        "and words (about 20-30 min on a laptop CPU)",
        "The main job end to end on this machine: scripted demonstrations of seven Meta-World "
        "tasks (three of them told apart by the instruction alone), a tiny VLA trained on "
        "them that reads two cameras, the instruction and the hand's proprioception, "
        "evaluated on unseen seeds; writes report.md, report.json, loss.png and a rollout "
        "video per task to --out.",
    )
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument(
        "--quick", action="store_true", help="a smoke run of every stage (about a minute)"
    )
    demo.add_argument(
        "--robustness",
        action="store_true",
        help="also evaluate the same episodes under each perturbation axis at its moderate "
        "level (camera, lighting, table, background, robot, pixels, state, instruction: "
        "docs/robustness.md) and add the profile to the report (about eight more "
        "evaluations)",
    )
    demo.add_argument(
        "--state",
        default=STATE_PROPRIO,
        help="the state the policy reads: proprio (hand and gripper; the VLA setting) or full "
        "(with Meta-World's privileged object poses and goal)",
    )


# ---------------------------------------------------------------------- eval
def run_eval(args: argparse.Namespace) -> int:
    from ditvla.envs.evaluate import EvalConfig, evaluate_named_policy
    from ditvla.envs.ray_launcher import RayShardsConfig, evaluate_on_ray
    from ditvla.errors import ConfigError

    if args.policy is None or args.env is None:
        raise ConfigError("ditvla eval needs --policy and --env (or: ditvla eval merge DIR...)")
    config = EvalConfig(**given_options(args, EvalConfig))
    if args.out is None and not config.resume:  # the scratch folder: each run replaces it
        config = replace(config, overwrite=True)
    out = args.out or SCRATCH_OUT
    on_ray = RayShardsConfig(**given_options(args, RayShardsConfig))
    loading = {"device": args.device, "head_dtype": args.head_dtype}
    if on_ray.ray:
        report = evaluate_on_ray(args.policy, args.env, config, Path(out), on_ray, **loading)
    else:
        report = evaluate_named_policy(args.policy, args.env, config, out, **loading)
    print(report.markdown())
    print(f"results: {out}/results.json")
    return 0


def run_eval_merge(args: argparse.Namespace) -> int:
    from ditvla.envs.evaluation_runs import merge_runs

    folders = [Path(folder) for folder in args.folders]
    report = merge_runs(folders, Path(args.out), overwrite=args.overwrite)
    print(report.markdown())
    print(f"results: {args.out}/results.json")
    return 0


def add_eval(commands: Commands, configured: bool) -> None:
    evaluation = add_command(
        commands,
        "eval",
        run_eval,
        "success rates of a policy in a simulator",
        "Roll a policy out in simulator episodes fixed by seed, in parallel worker "
        "processes; write OUT/results.json ({tasks: {name: {success_rate, episodes, ci95}}, "
        "mean_success}), OUT/results.md, OUT/episodes.jsonl (as episodes end), OUT/run.json "
        "(what was evaluated) and OUT/videos/ (H.264). Split a run across machines with "
        "--shard I/N and join the shards with `ditvla eval merge`, or let a Ray cluster run "
        "the shards and merge them (--ray HOST:PORT --shards N); --resume finishes an "
        "interrupted run.",
    )
    evaluation.add_argument(
        "--policy", help="a saved policy folder, or the baselines random / expert (required)"
    )
    evaluation.add_argument("--env", help=ENV_HELP + " (required)")
    evaluation.add_argument("--device", default="cpu", help="where the policy runs")
    evaluation.add_argument(
        "--head-dtype",
        default="float32",
        choices=get_args(HeadDType),
        help="what the action head computes in: bfloat16 is faster on GPUs and on CPUs with "
        "AVX512-BF16 or AMX, slower on others (bench/head_acceleration.py measures it)",
    )
    evaluation.add_argument(
        "--out",
        help=f"output folder (default {SCRATCH_OUT}, which each run that names no folder "
        "replaces; a folder you name is never replaced without --overwrite or --resume)",
    )
    if configured:
        from ditvla.envs.evaluate import EvalConfig
        from ditvla.envs.perturbations import describe_axes
        from ditvla.envs.ray_launcher import RayShardsConfig

        add_config_options(evaluation, EvalConfig, exclude=("progress",))
        add_config_options(evaluation, RayShardsConfig)
        evaluation.epilog = "--perturb axes and levels: " + describe_axes()
    actions = evaluation.add_subparsers(dest="eval_command", metavar="[merge]")
    merge = add_command(
        actions,
        "merge",
        run_eval_merge,
        "join the shards of one evaluation (--shard I/N) into one report",
        "Read every shard's folder (run.json, episodes.jsonl), check they are all the shards "
        "of one run and each finished, and write OUT/results.json, results.md, "
        "episodes.jsonl and run.json: the report one machine would have written for the same "
        "episodes.",
    )
    merge.add_argument("folders", nargs="+", metavar="DIR", help="the shards' --out folders")
    merge.add_argument("--out", required=True, help="the merged report's folder")
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the report an earlier merge left in OUT (refused without it)",
    )

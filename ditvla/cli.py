"""The ``ditvla`` command: train, benchmark and deploy VLA policies with DiT heads.

Each subcommand's ``--help`` explains it. Options that set a config field are derived
from the config dataclass (:mod:`ditvla.config_options`), so every default and its
description has one home. Errors in user input (a damaged store, a wrong path, an
unknown task) print one line and exit with status 2 instead of a traceback.

Only the light parts are imported here; a command imports what it runs (``ditvla keygen``
loads neither zarr, h5py nor MuJoCo).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import get_args

from ditvla.config_options import add_config_options, field_docs, given_options
from ditvla.contract import CheckpointError, HeadDType
from ditvla.datasets.errors import DatasetError
from ditvla.deploy.errors import TransportError
from ditvla.envs.errors import SimulatorUnavailable
from ditvla.envs.registry import SUITES

DESCRIPTION = """\
ditvla: a vision-language backbone feeding Diffusion-Transformer heads, for robot policies.

Three jobs: train a policy on demonstrations (collect, train), benchmark it in simulators
(eval), deploy it to a robot controller process (serve, robot). Data are LIBERO-style
zarr replay buffers, converted from LIBERO HDF5 files and LeRobot datasets. Start with
`ditvla demo`.
"""
ENV_HELP = "SUITE:TASKS — " + "; ".join(suite.task_names for suite in SUITES.values())
USER_ERRORS = (
    DatasetError,
    CheckpointError,
    TransportError,
    SimulatorUnavailable,
    FileNotFoundError,
    ValueError,
)


# ---------------------------------------------------------------------- commands
def _cmd_demo(args: argparse.Namespace) -> int:
    from ditvla.demo import run_demo

    return run_demo(Path(args.out), quick=args.quick, state=args.state)


def _cmd_collect(args: argparse.Namespace) -> int:
    from ditvla.datasets.dataset_info import describe
    from ditvla.datasets.replay_buffer import ReplayBuffer
    from ditvla.envs.collect import CollectConfig, collect_demonstrations

    config = CollectConfig(**given_options(args, CollectConfig))
    report = collect_demonstrations(args.env, args.out, config)
    for task in report.kept:
        print(
            f"{task}: kept {report.kept[task]} of {report.attempts[task]} episodes "
            f"(expert success {report.success_rate(task):.0%})"
        )
    print(describe(ReplayBuffer.open(args.out), with_stats=False))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ditvla.policies.config import PolicyConfig
    from ditvla.training.trainer import TrainConfig, train

    overrides = given_options(args, PolicyConfig, prefix="policy.")
    config = TrainConfig(**given_options(args, TrainConfig), policy_overrides=overrides)
    print(f"policy: {train(config)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ditvla.envs.baselines import policy_from_argument
    from ditvla.envs.evaluate import EvalConfig, evaluate
    from ditvla.envs.registry import suite_of

    policy = policy_from_argument(
        args.policy,
        action_dim=suite_of(args.env).action_dim,
        device=args.device,
        head_dtype=args.head_dtype,
    )
    report = evaluate(policy, args.env, EvalConfig(**given_options(args, EvalConfig)))
    print(report.markdown())
    print(f"results: {args.out}/results.json")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from ditvla.deploy.keys import server_keys
    from ditvla.deploy.server import PolicyServer, ServeConfig

    keys = server_keys(args.keys) if args.keys else None
    config = ServeConfig(**{**given_options(args, ServeConfig), "keys": keys})
    server = PolicyServer(config)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    print(f"serving {config.policy} on {config.address} (merge: {config.merge}); Ctrl-C stops")

    def status(stats, last_error) -> None:
        line = (
            f"chunks {stats.chunks} | contexts {stats.contexts} | S1 {stats.system1_hz:.1f} Hz "
            f"| S2 {stats.system2_hz:.1f} Hz | stale {stats.stale_skips} | "
            f"S2 restarts {stats.system2_restarts} | rejected {stats.rejected_messages} | "
            f"bad observations {stats.bad_observations}"
        )
        print(line + (f" (last: {last_error})" if last_error else ""), file=sys.stderr)

    stats = server.serve(duration_s=args.duration_s, on_status=None if args.quiet else status)
    if args.stats_json:
        report = {k: v for k, v in asdict(stats).items() if k != "act_ms"}
        Path(args.stats_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cmd_robot(args: argparse.Namespace) -> int:
    from ditvla.deploy.controller import ControllerConfig, RunConfig, run_lerobot, run_sim
    from ditvla.deploy.keys import client_keys
    from ditvla.deploy.transport import ClientChannel

    config = ControllerConfig(**given_options(args, ControllerConfig))
    run = RunConfig(**given_options(args, RunConfig))
    out = Path(args.out)
    keys = client_keys(args.keys, args.key_name) if args.keys else None
    with ClientChannel(args.server, keys=keys) as channel:
        if args.sim:
            summary = run_sim(channel, args.sim, config=config, run=run, out=out)
        else:
            options = dict(item.split("=", 1) for item in args.robot_arg)
            summary = run_lerobot(
                channel, args.robot, options, args.instruction, config=config, run=run, out=out
            )
    report = asdict(summary)
    episodes = report.pop("episodes")
    print(json.dumps(report, indent=2))
    if episodes:
        print(f"success: {sum(e['success'] for e in episodes)}/{len(episodes)} episodes")
    print(f"metrics: {out}/ticks.csv, {out}/summary.json")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from ditvla.contract import load_policy
    from ditvla.datasets.observations import observations_from_store
    from ditvla.policies.quantization import (
        QuantizationConfig,
        measure,
        quantize_policy,
        report_markdown,
    )

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


def _cmd_calibrate_steps(args: argparse.Namespace) -> int:
    from ditvla.contract import load_policy
    from ditvla.training.step_calibration import (
        calibrate_steps,
        calibrate_steps_by_success,
        write_steps,
    )

    if (args.dataset is None) == (args.env is None):
        raise ValueError("calibrate-steps needs one of --dataset (action error) or --env (success)")
    policy = load_policy(args.policy)
    if not hasattr(policy, "normalizer"):
        raise ValueError(f"{args.policy}: calibrate-steps needs a diffusion policy folder")
    if args.env is not None:
        calibration = calibrate_steps_by_success(
            policy, args.env, points=args.points, episodes_per_task=args.episodes
        )
        within = f"{args.points:g} points of {calibration.reference_steps} steps' success"
    else:
        calibration = calibrate_steps(
            policy, args.dataset, frames=args.frames, tolerance=args.tolerance
        )
        within = f"{args.tolerance:.0%}"
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


def _cmd_distill(args: argparse.Namespace) -> int:
    from ditvla.training.distillation import DistillConfig, distill

    record = distill(
        args.policy, args.dataset, args.out, DistillConfig(**given_options(args, DistillConfig))
    )
    print(
        f"{args.out}: a {record['student_steps']}-step student of {args.policy} "
        f"({record['teacher_steps']} steps), final distillation loss {record['final_loss']:.4f}"
    )
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from ditvla.deploy.keys import generate_keypair

    secret = generate_keypair(args.folder, args.name, force=args.force)
    print(
        f"wrote {secret} (secret, mode 600) and {secret.with_suffix('.key')} (public). The "
        "server needs server.key_secret and the robots' *.key; a robot needs its own "
        "NAME.key_secret and server.key."
    )
    return 0


def _cmd_dataset_info(args: argparse.Namespace) -> int:
    from ditvla.datasets.dataset_info import describe
    from ditvla.datasets.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.open(args.path)
    print(describe(buffer, with_stats=not args.no_stats))
    if args.check:
        problems = buffer.check()
        for line in problems:
            print(f"problem: {line}")
        print(f"check: {len(problems)} problems in {len(buffer.keys)} arrays")
        return 1 if problems else 0
    return 0


def _cmd_dataset_split_state(args: argparse.Namespace) -> int:
    from ditvla.envs.metaworld_env import split_state

    added = split_state(args.path)
    if added:
        print(f"{args.path}: added {', '.join(added)} beside data/state (proprio: {added[0]})")
    else:
        print(f"{args.path}: proprioception and privileged state are already apart")
    return 0


def _cmd_convert_libero(args: argparse.Namespace) -> int:
    from ditvla.datasets.convert_libero import convert_libero_hdf5
    from ditvla.datasets.dataset_info import describe

    buffer = convert_libero_hdf5(
        args.inputs, args.out, flip_images=not args.no_flip, overwrite=args.overwrite
    )
    print(describe(buffer, with_stats=False))
    return 0


def _cmd_convert_from_lerobot(args: argparse.Namespace) -> int:
    from ditvla.datasets.convert_lerobot import lerobot_to_zarr
    from ditvla.datasets.dataset_info import describe

    buffer = lerobot_to_zarr(args.root, args.out, repo_id=args.repo_id, overwrite=args.overwrite)
    print(describe(buffer, with_stats=False))
    return 0


def _cmd_convert_to_lerobot(args: argparse.Namespace) -> int:
    from ditvla.datasets.convert_lerobot import zarr_to_lerobot

    dataset = zarr_to_lerobot(
        args.store,
        args.out,
        repo_id=args.repo_id,
        use_videos=args.storage == "video",
        state=args.state,
    )
    print(f"{args.out}: {dataset.num_episodes} episodes, {dataset.num_frames} frames (LeRobot v3)")
    return 0


# ---------------------------------------------------------------------- parser
def _command(commands, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def _config_classes():
    """The config dataclasses whose fields are options (imported on demand: they pull in
    torch, simulators or ZeroMQ, which ``--help`` of another command does not need)."""
    from ditvla.deploy.controller import ControllerConfig, RunConfig
    from ditvla.deploy.server import ServeConfig
    from ditvla.envs.collect import CollectConfig
    from ditvla.envs.evaluate import EvalConfig
    from ditvla.policies.config import PolicyConfig
    from ditvla.policies.quantization import QuantizationConfig
    from ditvla.training.distillation import DistillConfig
    from ditvla.training.trainer import TrainConfig

    return {
        cls.__name__: cls
        for cls in (
            CollectConfig,
            ControllerConfig,
            DistillConfig,
            EvalConfig,
            PolicyConfig,
            QuantizationConfig,
            RunConfig,
            ServeConfig,
            TrainConfig,
        )
    }


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ditvla`` parser; ``command`` (the one being run, if known) limits the
    options derived from configs to that command's, so other parts are not imported."""
    parser = argparse.ArgumentParser(
        prog="ditvla", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    configured = (None, "collect", "train", "eval", "serve", "robot", "quantize", "distill")
    configs = _config_classes() if command in configured else {}

    def options(sub: argparse.ArgumentParser, name: str, **kwargs) -> None:
        if configs:
            add_config_options(sub, configs[name], **kwargs)

    demo = _command(
        commands,
        "demo",
        _cmd_demo,
        "collect, train and evaluate on seven Meta-World tasks from pixels, proprioception "
        "and words (about 20-30 min on a laptop CPU)",
        "The main job end to end on this machine: scripted demonstrations of seven Meta-World "
        "tasks (three of them told apart by the instruction alone), a tiny VLA trained on "
        "them that reads two cameras, the instruction and the hand's proprioception, "
        "evaluated on unseen seeds; writes report.md, report.json, loss.png and a rollout "
        "video per task to --out.",
    )
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument("--quick", action="store_true", help="a smoke run of every stage (~2 min)")
    demo.add_argument(
        "--state",
        default="proprio",
        help="the state the policy reads: proprio (hand and gripper; the VLA setting) or full "
        "(with Meta-World's privileged object poses and goal)",
    )

    collect = _command(
        commands,
        "collect",
        _cmd_collect,
        "scripted demonstrations from a simulator into a zarr store",
        "Run a simulator's scripted experts and write their episodes to a zarr replay "
        "buffer. Only successful episodes are kept unless --keep-failures; each episode's "
        "seed is recorded in the store.",
    )
    collect.add_argument(
        "--env",
        required=True,
        help=f"{ENV_HELP}; scripted experts exist for metaworld and robosuite Lift, Stack, "
        "PickPlaceCan",
    )
    collect.add_argument("--out", required=True, help="the zarr store to write")
    options(collect, "CollectConfig", exclude=("progress",))

    train = _command(
        commands,
        "train",
        _cmd_train,
        "train a policy on a zarr replay buffer",
        "Train a VLM + DiT policy. Writes OUT/policy (the final, EMA weights), "
        "OUT/checkpoints/step_N (every --save-every steps, atomically), OUT/metrics.jsonl and "
        "OUT/tensorboard. Several GPUs or nodes: torchrun --nproc_per_node N -m ditvla.cli "
        "train ... Policy options (--policy.*) override the preset's.",
    )
    if configs:
        add_config_options(train, configs["TrainConfig"], exclude=("preset", "policy_overrides"))
        trainer = configs["TrainConfig"]
        train.add_argument(
            "--policy.preset",
            dest="preset",
            default=argparse.SUPPRESS,
            help=f"{field_docs(trainer)['preset']} (default: {trainer.preset})",
        )
        add_config_options(train, configs["PolicyConfig"], prefix="policy.")

    evaluation = _command(
        commands,
        "eval",
        _cmd_eval,
        "success rates of a policy in a simulator",
        "Roll a policy out in simulator episodes fixed by seed, in parallel worker "
        "processes; write OUT/results.json ({tasks: {name: {success_rate, episodes, ci95}}, "
        "mean_success}), OUT/results.md, OUT/episodes.jsonl (as episodes end) and "
        "OUT/videos/.",
    )
    evaluation.add_argument(
        "--policy", required=True, help="a saved policy folder, or the baselines random / expert"
    )
    evaluation.add_argument("--env", required=True, help=ENV_HELP)
    evaluation.add_argument("--device", default="cpu", help="where the policy runs")
    evaluation.add_argument(
        "--head-dtype",
        default="float32",
        choices=get_args(HeadDType),
        help="what the action head computes in: bfloat16 is faster on GPUs and on CPUs with "
        "AVX512-BF16 or AMX, slower on others (bench/head_acceleration.py measures it)",
    )
    evaluation.add_argument("--out", default="outputs/eval", help="output folder")
    options(evaluation, "EvalConfig", exclude=("out", "progress"))

    serve = _command(
        commands,
        "serve",
        _cmd_serve,
        "run a policy as the slow/fast dual-system server for a robot controller",
        "System 2 (the VLM, its own process) refreshes the context from the newest camera "
        "frames; System 1 (the DiT head) denoises action chunks from the newest context and "
        "state and streams them to the controller (`ditvla robot`). Loopback only unless "
        "--keys is given.",
    )
    options(serve, "ServeConfig", exclude=("keys",))
    serve.add_argument(
        "--keys",
        help="a key folder (ditvla keygen): server.key_secret, and the public keys of the "
        "robots it admits (CURVE: authenticated, encrypted); required off loopback",
    )
    serve.add_argument("--duration-s", type=float, help="stop after this many seconds")
    serve.add_argument("--quiet", action="store_true", help="no status line every second")
    serve.add_argument("--stats-json", help="write the server's final counters here on exit")

    robot = _command(
        commands,
        "robot",
        _cmd_robot,
        "the robot controller process: a fixed-rate loop fed by `ditvla serve`",
        "Run the control loop at --hz: execute the action due at each tick, hold the robot "
        "when none is due (or the watchdog fires), send observations. --sim runs a simulator "
        "in real time as the robot; --robot drives a LeRobot robot through its own API. "
        "Writes OUT/ticks.csv and OUT/summary.json.",
    )
    target = robot.add_mutually_exclusive_group(required=True)
    target.add_argument("--sim", help="metaworld:<task>, stepped in real time")
    target.add_argument("--robot", help="a LeRobot robot type, e.g. so101_follower")
    robot.add_argument(
        "--robot-arg", action="append", default=[], help="KEY=VALUE for the robot's config"
    )
    robot.add_argument("--instruction", default="", help="the task instruction (--robot)")
    robot.add_argument("--server", default="tcp://127.0.0.1:5555", help="the policy server")
    robot.add_argument(
        "--keys", help="a key folder (ditvla keygen): this robot's NAME.key_secret and server.key"
    )
    robot.add_argument("--key-name", default="robot", help="NAME of this robot's key pair")
    robot.add_argument("--out", default="outputs/robot", help="metrics folder")
    options(robot, "ControllerConfig")
    options(robot, "RunConfig")

    quantize = _command(
        commands,
        "quantize",
        _cmd_quantize,
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
    quantize.add_argument("--frames", type=int, default=64, help="calibration frames")
    if configs:
        recipe = configs["QuantizationConfig"]
        quantize.add_argument(
            "--layout",
            default=recipe().layout,
            help="what to integerize, comma-separated: language_mlp, head_mlp, head_attention "
            "(the DiT heads' attention projections: faster act on CPU, see docs/quantization.md), "
            "head_modulation (the heads' adaLN modulation layers)",
        )
        add_config_options(quantize, recipe)

    calibrate = _command(
        commands,
        "calibrate-steps",
        _cmd_calibrate_steps,
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
    calibrate.add_argument("--frames", type=int, default=256, help="held-out frames")
    calibrate.add_argument(
        "--tolerance", type=float, default=0.05, help="relative action-error increase allowed"
    )
    calibrate.add_argument(
        "--episodes", type=int, default=20, help="with --env: episodes per task and step count"
    )
    calibrate.add_argument(
        "--points",
        type=float,
        default=2.0,
        help="with --env: success percentage points allowed below the policy's own",
    )
    calibrate.add_argument(
        "--dry-run", action="store_true", help="measure and print; leave the policy as it is"
    )

    distill = _command(
        commands,
        "distill",
        _cmd_distill,
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
    options(distill, "DistillConfig")

    keygen = _command(
        commands,
        "keygen",
        _cmd_keygen,
        "write a CURVE key pair for serve/robot",
        "Write FOLDER/NAME.key (public) and FOLDER/NAME.key_secret (mode 600, never through a "
        "link). Make one pair named server and one per robot; give the server its secret "
        "and the robots' public keys, each robot its secret and server.key.",
    )
    keygen.add_argument("folder", help="the key folder")
    keygen.add_argument("--name", default="server", help="the key pair's name: server, robot, ...")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")

    dataset = commands.add_parser("dataset", help="inspect zarr replay buffers")
    dataset_commands = dataset.add_subparsers(
        dest="dataset_command", metavar="ACTION", required=True
    )
    info = _command(
        dataset_commands,
        "info",
        _cmd_dataset_info,
        "episodes, frames, arrays, tasks and normalization stats of a store",
        "Print the number of episodes and frames, every array with its shape and dtype, the "
        "tasks with their instructions, and the normalization statistics (computed once and "
        "saved in the store).",
    )
    info.add_argument("path", help="a zarr replay buffer (v3, or a v2 diffusion-policy store)")
    info.add_argument("--check", action="store_true", help="read every chunk; exit 1 on damage")
    info.add_argument("--no-stats", action="store_true", help="do not compute/print statistics")
    split = _command(
        dataset_commands,
        "split-state",
        _cmd_dataset_split_state,
        "split a Meta-World store's 39-D state into proprio, objects and goal arrays",
        "Meta-World stores written before proprioception and privileged state were recorded "
        "apart hold one 39-D state. This adds proprio (hand and gripper, now and one frame "
        "earlier: 8-D, what a real robot has), objects (28-D) and goal (3-D) arrays beside "
        "it, for every frame; data/state stays, so nothing is lost.",
    )
    split.add_argument("path", help="a Meta-World zarr replay buffer")

    convert = commands.add_parser("convert", help="convert datasets to and from zarr")
    convert_commands = convert.add_subparsers(
        dest="convert_command", metavar="FORMAT", required=True
    )
    libero = _command(
        convert_commands,
        "libero",
        _cmd_convert_libero,
        "LIBERO HDF5 demonstrations -> zarr",
        "Convert LIBERO HDF5 files (official layout: data/demo_N/obs/{agentview_rgb, "
        "eye_in_hand_rgb, ee_pos, ee_ori, gripper_states, joint_states}, actions, and the "
        "instruction in data.attrs['problem_info']) into one zarr replay buffer.",
    )
    libero.add_argument("inputs", nargs="+", help="HDF5 files or folders of them")
    libero.add_argument("--out", required=True, help="the zarr store to write")
    libero.add_argument(
        "--no-flip", action="store_true", help="keep images as stored (LIBERO's are upside down)"
    )
    libero.add_argument("--overwrite", action="store_true", help="replace an existing store")

    from_lerobot = _command(
        convert_commands,
        "from-lerobot",
        _cmd_convert_from_lerobot,
        "LeRobot dataset (v3, local folder) -> zarr",
        "Convert a LeRobot v3 dataset on disk into a zarr replay buffer.",
    )
    from_lerobot.add_argument("root", help="the LeRobot dataset folder (holds meta/info.json)")
    from_lerobot.add_argument("--out", required=True, help="the zarr store to write")
    from_lerobot.add_argument("--repo-id", help="repo id to open it under (default: local/<name>)")
    from_lerobot.add_argument("--overwrite", action="store_true", help="replace an existing store")

    to_lerobot = _command(
        convert_commands,
        "to-lerobot",
        _cmd_convert_to_lerobot,
        "zarr -> LeRobot dataset (v3)",
        "Write a zarr replay buffer as a LeRobot v3 dataset with lerobot's own API.",
    )
    to_lerobot.add_argument("store", help="the zarr replay buffer")
    to_lerobot.add_argument("--out", required=True, help="the LeRobot dataset folder to create")
    to_lerobot.add_argument("--repo-id", help="repo id to record (default: local/<name>)")
    to_lerobot.add_argument(
        "--storage",
        choices=("video", "image"),
        default="video",
        help="cameras as mp4 videos (lossy, lerobot's default) or PNG images (lossless)",
    )
    to_lerobot.add_argument(
        "--state",
        default="proprio",
        help="the arrays concatenated into observation.state, as ditvla train --state: "
        "proprio (the store's state_keys), full, none or KEY[,KEY...]",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"ditvla: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditvla: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

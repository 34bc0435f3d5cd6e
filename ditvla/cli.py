"""The ``ditvla`` command: train, benchmark and deploy VLA policies with DiT heads.

Each subcommand's ``--help`` explains it. Errors in user input (a damaged store, a wrong
path) print one line and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ditvla.datasets.replay_buffer import DatasetError
from ditvla.deploy.transport import TransportError
from ditvla.envs.registry import SUITES
from ditvla.policies.errors import CheckpointError

DESCRIPTION = """\
ditvla: a vision-language backbone feeding Diffusion-Transformer heads, for robot policies.

Data: LIBERO-style zarr replay buffers (diffusion-policy layout, zarr v3), converted from
LIBERO HDF5 files and LeRobot datasets.
"""


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
        args.store, args.out, repo_id=args.repo_id, use_videos=args.storage == "video"
    )
    print(f"{args.out}: {dataset.num_episodes} episodes, {dataset.num_frames} frames (LeRobot v3)")
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from ditvla.datasets.dataset_info import describe
    from ditvla.datasets.replay_buffer import ReplayBuffer
    from ditvla.envs.collect import collect_demonstrations

    report = collect_demonstrations(
        args.env,
        args.out,
        episodes_per_task=args.episodes,
        cameras=None if args.cameras is None else [c for c in args.cameras.split(",") if c],
        image_size=args.image_size,
        seed_start=args.seed_start,
        keep_failures=args.keep_failures,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    for task in report.kept:
        print(
            f"{task}: kept {report.kept[task]} of {report.attempts[task]} episodes "
            f"(expert success {report.success_rate(task):.0%})"
        )
    print(describe(ReplayBuffer.open(args.out), with_stats=False))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ditvla.train import TrainConfig, train

    policy_overrides = {
        "objective": getattr(args, "policy.objective"),
        "num_inference_steps": getattr(args, "policy.inference_steps"),
        "noise_samples": getattr(args, "policy.noise_samples"),
        "horizon": getattr(args, "policy.horizon"),
        "n_action_steps": getattr(args, "policy.n_action_steps"),
        "head": {"conditioning": getattr(args, "policy.conditioning")},
        "foresight": {
            "kind": getattr(args, "policy.foresight"),
            "weight": getattr(args, "policy.foresight_weight"),
            "k": getattr(args, "policy.foresight_k"),
            "method": getattr(args, "policy.foresight_method"),
            "size": getattr(args, "policy.foresight_size"),
            "grid": getattr(args, "policy.foresight_grid"),
        },
    }
    config = TrainConfig(
        dataset=args.dataset,
        out=args.out,
        preset=getattr(args, "policy.preset"),
        policy_overrides=policy_overrides,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        seed=args.seed,
        num_workers=args.num_workers,
        augment=args.augment,
        save_every=args.save_every,
        device=args.device,
        resume=args.resume,
    )
    final = train(config)
    print(f"policy: {final}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ditvla.envs.evaluate import evaluate, load_policy
    from ditvla.envs.registry import suite_of

    policy = load_policy(args.policy, device=args.device, action_dim=suite_of(args.env).action_dim)
    report = evaluate(
        policy,
        args.env,
        episodes_per_task=args.episodes,
        workers=args.workers,
        seed_start=args.seed_start,
        max_steps=args.max_steps,
        out=args.out,
        videos_per_task=args.videos,
    )
    print(report.markdown())
    print(f"results: {args.out}/results.json")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from ditvla.deploy.server import PolicyServer, ServeConfig
    from ditvla.deploy.transport import read_key

    server = PolicyServer(
        ServeConfig(
            policy=args.policy,
            address=args.address,
            key=read_key(args.key_file),
            merge=args.merge,
            system1_hz=args.system1_hz,
            system2_hz=args.system2_hz,
            system1_threads=args.system1_threads,
            system2_threads=args.system2_threads,
            max_context_age_s=args.max_context_age,
            action_low=args.action_low,
            action_high=args.action_high,
            num_inference_steps=args.inference_steps,
        )
    )
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    print(f"serving {args.policy} on {args.address} (merge: {args.merge}); Ctrl-C stops")

    def status(stats, last_error) -> None:
        line = (
            f"chunks {stats.chunks} | contexts {stats.contexts} | S1 {stats.system1_hz:.1f} Hz "
            f"| S2 {stats.system2_hz:.1f} Hz | stale {stats.stale_skips} | "
            f"S2 restarts {stats.system2_restarts} | rejected {stats.rejected_messages}"
        )
        print(line + (f" (last: {last_error})" if last_error else ""), file=sys.stderr)

    server.serve(duration_s=args.duration, on_status=None if args.quiet else status)
    return 0


def _cmd_robot(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from ditvla.deploy.controller import Controller, ControllerConfig, handshake, run_sim
    from ditvla.deploy.transport import Channel, read_key

    config = ControllerConfig(
        hz=args.hz,
        merge=args.merge,
        watchdog_s=args.watchdog,
        action_low=args.action_low,
        action_high=args.action_high,
        realtime=not args.no_realtime,
    )
    with Channel(args.server, bind=False, key=read_key(args.key_file)) as channel:
        if args.sim:
            summary = run_sim(
                channel,
                args.sim,
                config=config,
                episodes=args.episodes,
                seed_start=args.seed_start,
                max_steps=args.max_steps,
                duration_s=args.duration,
                camera_hz=args.camera_hz,
                out=Path(args.out),
            )
        else:
            from ditvla.deploy.robots import LeRobotRobot

            options = dict(item.split("=", 1) for item in args.robot_arg)
            robot = LeRobotRobot(args.robot, options, instruction=args.instruction)
            handshake(channel, f"lerobot:{args.robot}", config.hz)
            controller = Controller(channel, robot, config)
            controller.install_signal_handlers()
            controller.prepare_clock()
            try:
                controller.run_episode(0, int((args.duration or 60) * args.hz))
            finally:
                robot.close()
            summary = controller.summary([])
            controller.write(Path(args.out), summary)
    report = asdict(summary)
    episodes = report.pop("episodes")
    print(json.dumps(report, indent=2))
    if episodes:
        print(f"success: {sum(e['success'] for e in episodes)}/{len(episodes)} episodes")
    print(f"metrics: {args.out}/ticks.csv, {args.out}/summary.json")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import json

    from ditvla.policies.policy import DiTVLAPolicy
    from ditvla.policies.quantization import (
        QuantizationConfig,
        measure,
        observations_from_store,
        quantize_policy,
        report_markdown,
    )

    config = QuantizationConfig.from_layout(
        args.layout,
        scheme=args.scheme,
        backend=args.backend,
        attention_temperature_matching=not args.no_atm,
        output_head_balancing=not args.no_ohb,
    )
    policy = DiTVLAPolicy.from_pretrained(args.policy).eval()
    calibration = observations_from_store(args.calibration, policy, args.frames)
    result = quantize_policy(policy, config, calibration)
    out = Path(args.out)
    result.save(out)
    held_out = observations_from_store(args.calibration, policy, args.frames, held_out=True)
    report = measure(policy, result, held_out)
    (out / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quantization_report.md").write_text(report_markdown(report))
    print(report_markdown(report))
    print(f"quantized policy: {out}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from ditvla.deploy.transport import new_key_file

    print(f"wrote {new_key_file(args.path)} (give the server and the robot the same file)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ditvla.demo import run_demo

    return run_demo(Path(args.out), quick=args.quick)


ENV_HELP = "SUITE:TASKS — " + "; ".join(suite.task_names for suite in SUITES.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditvla", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the whole mission on its embedded default, on this CPU",
        description="Run the main job end to end on its embedded default and write a report.",
    )
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a small smoke run (about 2 minutes)")
    demo.set_defaults(func=_cmd_demo)

    collect = commands.add_parser(
        "collect",
        help="scripted demonstrations from a simulator into a zarr store",
        description=(
            "Run a simulator's scripted experts and write their episodes to a zarr replay "
            "buffer. Only successful episodes are kept unless --keep-failures; each "
            "episode's seed is recorded in the store."
        ),
    )
    collect.add_argument(
        "--env",
        required=True,
        help=f"{ENV_HELP}; scripted experts exist for metaworld and robosuite "
        "Lift, Stack, PickPlaceCan",
    )
    collect.add_argument("--episodes", type=int, default=50, help="episodes per task (%(default)s)")
    collect.add_argument("--out", required=True, help="the zarr store to write")
    collect.add_argument(
        "--cameras",
        default=None,
        help=(
            "comma-separated camera names, '' for none (the suite's: metaworld corner; "
            "robosuite agentview,robot0_eye_in_hand)"
        ),
    )
    collect.add_argument(
        "--image-size", type=int, default=64, help="image side in px (%(default)s)"
    )
    collect.add_argument(
        "--seed-start", type=int, default=0, help="first episode seed (%(default)s)"
    )
    collect.add_argument(
        "--workers",
        type=int,
        default=2,
        help="simulator processes; the store is the same for any number (%(default)s)",
    )
    collect.add_argument("--keep-failures", action="store_true", help="keep failed episodes too")
    collect.add_argument("--overwrite", action="store_true", help="replace an existing store")
    collect.set_defaults(func=_cmd_collect)

    train = commands.add_parser(
        "train",
        help="train a policy on a zarr replay buffer",
        description=(
            "Train a VLM + DiT policy. Writes OUT/policy (the final, EMA weights), "
            "OUT/checkpoints/step_N (every --save-every steps, atomically), "
            "OUT/metrics.jsonl and OUT/tensorboard. Several GPUs or nodes: launch with "
            "torchrun --nproc_per_node N -m ditvla.cli train ..."
        ),
    )
    train.add_argument("--dataset", required=True, help="the zarr replay buffer")
    train.add_argument("--out", default="outputs/train", help="output folder (outputs/train)")
    train.add_argument(
        "--policy.preset",
        default="tiny",
        help="tiny (tiny Idefics3 VLM, CPU default), tiny-paligemma, tiny-qwen (Qwen2.5-VL), "
        "small, base, large (head sizes over the tiny Idefics3 VLM)",
    )
    train.add_argument(
        "--policy.objective", default="flow_matching", choices=("flow_matching", "ddpm")
    )
    train.add_argument(
        "--policy.conditioning",
        default="cross_attention",
        choices=("cross_attention", "in_context"),
    )
    train.add_argument(
        "--policy.foresight",
        default="off",
        choices=("off", "motion", "latent"),
        help="train a foresight head jointly, skipped at inference: motion = optical flow "
        "t -> t+k as a small motion image; latent = the frozen vision encoder's pooled "
        "features of frame t+k (Mantis-style)",
    )
    train.add_argument(
        "--policy.foresight-weight", type=float, default=0.1, help="its loss weight (0.1)"
    )
    train.add_argument("--policy.foresight-k", type=int, default=4, help="frames ahead (4)")
    train.add_argument(
        "--policy.foresight-method", default="dis", choices=("dis", "farneback"), help="(dis)"
    )
    train.add_argument(
        "--policy.foresight-size", type=int, default=16, help="motion image side (16)"
    )
    train.add_argument(
        "--policy.foresight-grid", type=int, default=4, help="latent: pooled feature grid side (4)"
    )
    train.add_argument("--policy.horizon", type=int, default=16, help="action chunk length (16)")
    train.add_argument(
        "--policy.n-action-steps",
        type=int,
        default=0,
        help="actions executed per chunk (0: half the horizon)",
    )
    train.add_argument(
        "--policy.inference-steps", type=int, default=10, help="denoising steps at inference (10)"
    )
    train.add_argument(
        "--policy.noise-samples",
        type=int,
        default=1,
        help="(noise, time) draws per training observation: the backbone runs once, the "
        "action head once per draw (1)",
    )
    train.add_argument("--steps", type=int, default=2000, help="optimizer steps (2000)")
    train.add_argument("--batch-size", type=int, default=64, help="samples per step (64)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (1)")
    train.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (3e-4)")
    train.add_argument("--warmup-steps", type=int, default=100, help="linear warmup (100)")
    train.add_argument("--ema-decay", type=float, default=0.999, help="0 turns EMA off (0.999)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (2)")
    train.add_argument("--augment", action="store_true", help="random shift + color jitter")
    train.add_argument("--save-every", type=int, default=500, help="checkpoint period (500)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    train.add_argument(
        "--resume", action="store_true", help="continue from OUT's latest checkpoint"
    )
    train.set_defaults(func=_cmd_train)

    evaluation = commands.add_parser(
        "eval",
        help="success rates of a policy in a simulator",
        description=(
            "Roll a policy out in simulator episodes fixed by seed, in parallel worker "
            "processes; write OUT/results.json ({tasks: {name: {success_rate, episodes, "
            "ci95}}, mean_success}), OUT/results.md, OUT/episodes.jsonl (as episodes end) "
            "and OUT/videos/."
        ),
    )
    evaluation.add_argument(
        "--policy", required=True, help="a saved policy folder, or the baselines random / expert"
    )
    evaluation.add_argument(
        "--env",
        required=True,
        help=ENV_HELP,
    )
    evaluation.add_argument("--episodes", type=int, default=50, help="episodes per task (50)")
    evaluation.add_argument("--workers", type=int, default=2, help="simulator processes (2)")
    evaluation.add_argument(
        "--seed-start", type=int, default=100_000, help="first episode seed (100000)"
    )
    evaluation.add_argument("--max-steps", type=int, help="episode step limit (the task's own)")
    evaluation.add_argument("--videos", type=int, default=1, help="videos per task (1)")
    evaluation.add_argument("--device", default="cpu", help="where the policy runs (cpu)")
    evaluation.add_argument("--out", default="outputs/eval", help="output folder (outputs/eval)")
    evaluation.set_defaults(func=_cmd_eval)

    serve = commands.add_parser(
        "serve",
        help="run a policy as the slow/fast dual-system server for a robot controller",
        description=(
            "System 2 (the VLM, its own process) refreshes the context from the newest "
            "camera frames; System 1 (the DiT head) denoises action chunks from the newest "
            "context and state and streams them to the controller (`ditvla robot`). "
            "Loopback only unless --key-file is given."
        ),
    )
    serve.add_argument("--policy", required=True, help="a saved policy folder")
    serve.add_argument("--address", default="tcp://127.0.0.1:5555", help="where to listen")
    serve.add_argument("--key-file", help="shared key: authenticates every message")
    serve.add_argument(
        "--merge",
        default="latest",
        choices=("latest", "ensemble", "rtc"),
        help="rtc: real-time chunking inpaints new chunks towards the executing plan",
    )
    serve.add_argument(
        "--system1-hz", type=float, default=0, help="chunks/s (0: 2 per n_action_steps)"
    )
    serve.add_argument("--system2-hz", type=float, default=0, help="contexts/s (0: as fast)")
    serve.add_argument("--system1-threads", type=int, default=1, help="torch threads (1)")
    serve.add_argument("--system2-threads", type=int, default=1, help="torch threads (1)")
    serve.add_argument(
        "--max-context-age", type=float, default=1.0, help="s; older: no new chunks (1.0)"
    )
    serve.add_argument("--action-low", type=float, help="clip actions below")
    serve.add_argument("--action-high", type=float, help="clip actions above")
    serve.add_argument("--inference-steps", type=int, help="denoising steps (the policy's)")
    serve.add_argument("--duration", type=float, help="stop after this many seconds")
    serve.add_argument("--quiet", action="store_true", help="no status line every second")
    serve.set_defaults(func=_cmd_serve)

    robot = commands.add_parser(
        "robot",
        help="the robot controller process: a fixed-rate loop fed by `ditvla serve`",
        description=(
            "Run the control loop at --hz: execute the action due at each tick, hold the "
            "robot when none is due (or the watchdog fires), send observations. --sim runs "
            "a simulator in real time as the robot; --robot drives a LeRobot robot through "
            "its own API. Writes OUT/ticks.csv and OUT/summary.json."
        ),
    )
    target = robot.add_mutually_exclusive_group(required=True)
    target.add_argument("--sim", help="metaworld:<task>, stepped in real time")
    target.add_argument("--robot", help="a LeRobot robot type, e.g. so101_follower")
    robot.add_argument(
        "--robot-arg", action="append", default=[], help="KEY=VALUE for the robot's config"
    )
    robot.add_argument("--instruction", default="", help="the task instruction (--robot)")
    robot.add_argument("--server", default="tcp://127.0.0.1:5555", help="the policy server")
    robot.add_argument("--key-file", help="the server's shared key")
    robot.add_argument("--hz", type=float, default=50.0, help="control rate (50)")
    robot.add_argument(
        "--merge", default="latest", choices=("latest", "ensemble", "rtc"), help="chunk merging"
    )
    robot.add_argument("--watchdog", type=float, default=0.5, help="s without chunks: hold (0.5)")
    robot.add_argument("--action-low", type=float, help="clip actions below")
    robot.add_argument("--action-high", type=float, help="clip actions above")
    robot.add_argument("--episodes", type=int, default=1, help="episodes (--sim) (1)")
    robot.add_argument("--seed-start", type=int, default=100_000, help="first seed (100000)")
    robot.add_argument("--max-steps", type=int, default=500, help="ticks per episode (500)")
    robot.add_argument("--duration", type=float, help="run for this many seconds instead")
    robot.add_argument("--camera-hz", type=float, default=10.0, help="sim camera rate (10)")
    robot.add_argument("--out", default="outputs/robot", help="metrics folder (outputs/robot)")
    robot.add_argument(
        "--no-realtime",
        action="store_true",
        help="do not ask for SCHED_FIFO (by default used where permitted: root/CAP_SYS_NICE)",
    )
    robot.set_defaults(func=_cmd_robot)

    quantize = commands.add_parser(
        "quantize",
        help="post-training quantization of a saved policy (QuantVLA-style)",
        description=(
            "Integerize the language model's and the DiT heads' MLP layers (attention, "
            "embeddings, norms and the action projection stay float), calibrate attention "
            "temperature matching and output head balancing on frames of a zarr store, "
            "and write a policy folder that from_pretrained, eval and serve load like any "
            "other, with OUT/quantization_report.{md,json} (memory, latency, action error)."
        ),
    )
    quantize.add_argument("--policy", required=True, help="a saved (float) policy folder")
    quantize.add_argument("--calibration", required=True, help="a zarr store the policy fits")
    quantize.add_argument("--scheme", default="w8a8", choices=("w8a8", "w8", "w4a8"))
    quantize.add_argument(
        "--backend",
        default="fbgemm",
        choices=("fbgemm", "torchao"),
        help="fbgemm: PyTorch's dynamic int8 kernels (w8a8, fastest on CPU here); torchao",
    )
    quantize.add_argument(
        "--layout",
        default="language_mlp,head_mlp",
        help="what to integerize, comma-separated: language_mlp, head_mlp (QuantVLA's layout, "
        "the default), head_attention (the DiT heads' attention projections too: faster "
        "act on CPU, see the README) and head_modulation (the heads' adaLN modulation layers)",
    )
    quantize.add_argument("--frames", type=int, default=64, help="calibration frames (64)")
    quantize.add_argument("--no-atm", action="store_true", help="no attention temperature matching")
    quantize.add_argument("--no-ohb", action="store_true", help="no output head balancing")
    quantize.add_argument("--out", required=True, help="the quantized policy folder to write")
    quantize.set_defaults(func=_cmd_quantize)

    keygen = commands.add_parser("keygen", help="write a random shared key for serve/robot")
    keygen.add_argument("path", help="the key file to write (mode 600)")
    keygen.set_defaults(func=_cmd_keygen)

    dataset = commands.add_parser("dataset", help="inspect zarr replay buffers")
    dataset_commands = dataset.add_subparsers(
        dest="dataset_command", metavar="ACTION", required=True
    )
    info = dataset_commands.add_parser(
        "info",
        help="episodes, frames, arrays, tasks and normalization stats of a store",
        description=(
            "Print the number of episodes and frames, every array with its shape and dtype, "
            "the tasks with their instructions, and the normalization statistics (computed "
            "once and saved in the store)."
        ),
    )
    info.add_argument("path", help="a zarr replay buffer (v3, or a v2 diffusion-policy store)")
    info.add_argument("--check", action="store_true", help="read every chunk; exit 1 on damage")
    info.add_argument("--no-stats", action="store_true", help="do not compute/print statistics")
    info.set_defaults(func=_cmd_dataset_info)

    convert = commands.add_parser("convert", help="convert datasets to and from zarr")
    convert_commands = convert.add_subparsers(
        dest="convert_command", metavar="FORMAT", required=True
    )
    libero = convert_commands.add_parser(
        "libero",
        help="LIBERO HDF5 demonstrations -> zarr",
        description=(
            "Convert LIBERO HDF5 files (official layout: data/demo_N/obs/{agentview_rgb, "
            "eye_in_hand_rgb, ee_pos, ee_ori, gripper_states, joint_states}, actions, and "
            "the instruction in data.attrs['problem_info']) into one zarr replay buffer."
        ),
    )
    libero.add_argument("inputs", nargs="+", help="HDF5 files or folders of them")
    libero.add_argument("--out", required=True, help="the zarr store to write")
    libero.add_argument(
        "--no-flip", action="store_true", help="keep images as stored (LIBERO's are upside down)"
    )
    libero.add_argument("--overwrite", action="store_true", help="replace an existing store")
    libero.set_defaults(func=_cmd_convert_libero)

    from_lerobot = convert_commands.add_parser(
        "from-lerobot",
        help="LeRobot dataset (v3, local folder) -> zarr",
        description="Convert a LeRobot v3 dataset on disk into a zarr replay buffer.",
    )
    from_lerobot.add_argument("root", help="the LeRobot dataset folder (holds meta/info.json)")
    from_lerobot.add_argument("--out", required=True, help="the zarr store to write")
    from_lerobot.add_argument("--repo-id", help="repo id to open it under (default: local/<name>)")
    from_lerobot.add_argument("--overwrite", action="store_true", help="replace an existing store")
    from_lerobot.set_defaults(func=_cmd_convert_from_lerobot)

    to_lerobot = convert_commands.add_parser(
        "to-lerobot",
        help="zarr -> LeRobot dataset (v3)",
        description="Write a zarr replay buffer as a LeRobot v3 dataset with lerobot's own API.",
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
    to_lerobot.set_defaults(func=_cmd_convert_to_lerobot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DatasetError, CheckpointError, TransportError, FileNotFoundError, ValueError) as exc:
        print(f"ditvla: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditvla: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``ditvla collect``, ``ditvla dataset ...`` and ``ditvla convert ...``: demonstrations
into zarr replay buffers, and what is in one."""

from __future__ import annotations

import argparse

from ditvla.cli.config_options import add_config_options, given_options
from ditvla.cli.subcommand import ENV_HELP, Commands, add_command
from ditvla.contract import STATE_PROPRIO


# ---------------------------------------------------------------------- collect
def run_collect(args: argparse.Namespace) -> int:
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


def add_collect(commands: Commands, configured: bool) -> None:
    collect = add_command(
        commands,
        "collect",
        run_collect,
        "scripted demonstrations from a simulator into a zarr store",
        "Run a simulator's scripted experts and write their episodes to a zarr replay "
        "buffer. Only successful episodes are kept unless --keep-failures; each episode's "
        "seed is recorded in the store.",
    )
    collect.add_argument(
        "--env",
        required=True,
        help=f"{ENV_HELP}; scripted experts exist for metaworld, robosuite Lift, Stack, "
        "PickPlaceCan, and LIBERO goals of putting things in or on others, opening the "
        "cabinet's drawers and turning the stove on (libero:spatial, object, goal; "
        "libero_10's two-part goals where both parts are of these)",
    )
    collect.add_argument("--out", required=True, help="the zarr store to write")
    if configured:
        from ditvla.envs.collect import CollectConfig

        add_config_options(collect, CollectConfig, exclude=("progress",))


# ---------------------------------------------------------------------- dataset
def run_dataset_info(args: argparse.Namespace) -> int:
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


def run_dataset_split_state(args: argparse.Namespace) -> int:
    from ditvla.envs.metaworld_env import split_state

    added = split_state(args.path)
    if added:
        print(f"{args.path}: added {', '.join(added)} beside data/state (proprio: {added[0]})")
    else:
        print(f"{args.path}: proprioception and privileged state are already apart")
    return 0


def run_dataset_pack(args: argparse.Namespace) -> int:
    from ditvla.datasets.store_packing import pack_store

    packed = pack_store(
        args.path, args.out, frames_per_object=args.frames_per_object, overwrite=args.overwrite
    )
    objects = -(-packed.n_frames // args.frames_per_object)
    print(
        f"{args.out}: {packed.n_episodes} episodes, {packed.n_frames} frames; "
        f"{args.frames_per_object} frames per object: {objects} objects per camera "
        f"({', '.join(packed.cameras) or 'no cameras'}) where the source had {packed.n_frames}"
    )
    return 0


def add_dataset(commands: Commands, configured: bool) -> None:
    dataset = commands.add_parser("dataset", help="inspect zarr replay buffers")
    actions = dataset.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    info = add_command(
        actions,
        "info",
        run_dataset_info,
        "episodes, frames, arrays, tasks and normalization stats of a store",
        "Print the number of episodes and frames, every array with its shape and dtype, the "
        "tasks with their instructions, and the normalization statistics (computed once and "
        "saved in the store).",
    )
    info.add_argument("path", help="a zarr replay buffer (v3, or a v2 diffusion-policy store)")
    info.add_argument("--check", action="store_true", help="read every chunk; exit 1 on damage")
    info.add_argument("--no-stats", action="store_true", help="do not compute/print statistics")
    split = add_command(
        actions,
        "split-state",
        run_dataset_split_state,
        "split a Meta-World store's 39-D state into proprio, objects and goal arrays",
        "Meta-World stores written before proprioception and privileged state were recorded "
        "apart hold one 39-D state. This adds proprio (hand and gripper, now and one frame "
        "earlier: 8-D, what a real robot has), objects (28-D) and goal (3-D) arrays beside "
        "it, for every frame; data/state stays, so nothing is lost.",
    )
    split.add_argument("path", help="a Meta-World zarr replay buffer")
    pack = add_command(
        actions,
        "pack",
        run_dataset_pack,
        "copy a store laid out for object storage (many frames per object)",
        "Write a copy of a store whose camera arrays hold --frames-per-object frames per "
        "object (zarr sharding), for uploading to an object store (s3://...): a store as "
        "collect writes it has one object per frame, one request each to upload and to "
        "read. The copy reads as the source does; a training run fetches each object once "
        "and keeps it. Keep the source for local training: one frame per file reads "
        "fastest from a disk.",
    )
    pack.add_argument("path", help="the store to copy (a folder or a URL)")
    pack.add_argument("--out", required=True, help="the folder to write the copy to")
    pack.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    if configured:
        from ditvla.datasets.store_layout import FRAMES_PER_OBJECT

        pack.add_argument(
            "--frames-per-object",
            type=int,
            default=FRAMES_PER_OBJECT,
            help="frames of one camera per object (default: %(default)s)",
        )


# ---------------------------------------------------------------------- convert
def run_convert_libero(args: argparse.Namespace) -> int:
    from ditvla.datasets.convert_libero import convert_libero_hdf5
    from ditvla.datasets.dataset_info import describe

    buffer = convert_libero_hdf5(
        args.inputs, args.out, flip_images=not args.no_flip, overwrite=args.overwrite
    )
    print(describe(buffer, with_stats=False))
    return 0


def run_convert_to_libero(args: argparse.Namespace) -> int:
    from ditvla.datasets.convert_libero import zarr_to_libero_hdf5

    files = zarr_to_libero_hdf5(
        args.store, args.out, flip_images=not args.no_flip, overwrite=args.overwrite
    )
    print(f"{args.out}: {len(files)} LIBERO HDF5 files ({', '.join(f.name for f in files)})")
    return 0


def run_convert_from_lerobot(args: argparse.Namespace) -> int:
    from ditvla.datasets.convert_lerobot import lerobot_to_zarr
    from ditvla.datasets.dataset_info import describe

    buffer = lerobot_to_zarr(args.root, args.out, repo_id=args.repo_id, overwrite=args.overwrite)
    print(describe(buffer, with_stats=False))
    return 0


def run_convert_to_lerobot(args: argparse.Namespace) -> int:
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


def add_convert(commands: Commands, configured: bool) -> None:
    convert = commands.add_parser("convert", help="convert datasets to and from zarr")
    formats = convert.add_subparsers(dest="convert_command", metavar="FORMAT", required=True)
    libero = add_command(
        formats,
        "libero",
        run_convert_libero,
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

    to_libero = add_command(
        formats,
        "to-libero",
        run_convert_to_libero,
        "zarr -> LIBERO HDF5 demonstrations",
        "Write a zarr replay buffer holding LIBERO's arrays (cameras agentview and "
        "eye_in_hand; ee_pos, ee_ori, gripper_states, joint_states; action), as `ditvla "
        "collect --env libero:...` and `ditvla convert libero` write them, in LIBERO's HDF5 "
        "layout: one <task>_demo.hdf5 per task. The MuJoCo states LIBERO's own files carry "
        "for replay are not in a store and are not written.",
    )
    to_libero.add_argument("store", help="the zarr replay buffer")
    to_libero.add_argument("--out", required=True, help="the folder to write the files into")
    to_libero.add_argument(
        "--no-flip", action="store_true", help="keep images upright (LIBERO's are upside down)"
    )
    to_libero.add_argument("--overwrite", action="store_true", help="replace existing files")

    from_lerobot = add_command(
        formats,
        "from-lerobot",
        run_convert_from_lerobot,
        "LeRobot dataset (v3, local folder) -> zarr",
        "Convert a LeRobot v3 dataset on disk into a zarr replay buffer.",
    )
    from_lerobot.add_argument("root", help="the LeRobot dataset folder (holds meta/info.json)")
    from_lerobot.add_argument("--out", required=True, help="the zarr store to write")
    from_lerobot.add_argument("--repo-id", help="repo id to open it under (default: local/<name>)")
    from_lerobot.add_argument("--overwrite", action="store_true", help="replace an existing store")

    to_lerobot = add_command(
        formats,
        "to-lerobot",
        run_convert_to_lerobot,
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
        default=STATE_PROPRIO,
        help="the arrays concatenated into observation.state, as ditvla train --state: "
        "proprio (the store's state_keys), full, none or KEY[,KEY...]",
    )

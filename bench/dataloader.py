"""Training batches per second: our zarr loader against LeRobotDataset, same episodes.

Both loaders serve the same samples: two 128x128 cameras and the state at 2 observation
steps (t-1, t), and a 16-step action chunk, in batches of 64, shuffled, through a torch
DataLoader with the same number of workers. The episodes are written once to our zarr
store, then converted with our LeRobot converter to a LeRobot v3 dataset with lerobot's
default storage (AV1 video); LeRobotDataset decodes with its default backend
(torchcodec when FFmpeg's libraries are present) and returns uint8 frames, as
lerobot's own training script asks it to.

    python -m bench.dataloader [--workers 2] [--batches 30]

Last line: ``dataloader speedup vs lerobot: <X>x``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.loader_data import (
    CAMERAS,
    add_loader_arguments,
    loader,
    samples_per_second,
    write_episodes,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dataloader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_loader_arguments(parser, batches=30)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ditvla_bench_"))
    os.environ.setdefault("HF_HOME", str(workdir / "hf_home"))
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from ditvla.datasets.convert_lerobot import zarr_to_lerobot
    from ditvla.datasets.torch_dataset import ReplayBufferDataset

    store, lerobot_root = workdir / "bench.zarr", workdir / "bench_lerobot"
    shutil.rmtree(lerobot_root, ignore_errors=True)
    t0 = time.perf_counter()
    write_episodes(store, args.episodes, args.length, args.size)
    t1 = time.perf_counter()
    zarr_to_lerobot(store, lerobot_root, progress=False)
    t2 = time.perf_counter()
    print(
        f"{args.episodes} episodes x {args.length} frames, 2 cameras {args.size}x{args.size}: "
        f"zarr written in {t1 - t0:.1f} s, lerobot (video) in {t2 - t1:.1f} s"
    )
    fps = 10
    ours = ReplayBufferDataset(store, n_obs_steps=2, horizon=16)
    theirs = LeRobotDataset(
        "local/bench_lerobot",
        root=lerobot_root,
        return_uint8=True,
        delta_timestamps={
            **{f"observation.images.{cam}": [-1 / fps, 0.0] for cam in CAMERAS},
            "observation.state": [-1 / fps, 0.0],
            "action": [i / fps for i in range(16)],
        },
    )

    ours_rate = samples_per_second(loader(ours, args.batch_size, args.workers), args.batches)
    print(
        f"ditvla zarr loader : {ours_rate:8.1f} samples/s ({ours_rate / args.batch_size:.2f} batches/s)"
    )
    theirs_rate = samples_per_second(loader(theirs, args.batch_size, args.workers), args.batches)
    print(
        f"lerobot dataset    : {theirs_rate:8.1f} samples/s ({theirs_rate / args.batch_size:.2f} batches/s)"
    )
    print(
        f"workers {args.workers}, batch {args.batch_size}, {args.batches} timed batches each, torch threads {torch.get_num_threads()}"
    )
    print(f"dataloader speedup vs lerobot: {ours_rate / theirs_rate:.1f}x")


if __name__ == "__main__":
    main()

"""Training samples per second from a store in a local folder against the same store on an
S3-compatible server (moto's, started on this machine), in one run.

The loader serves what bench.dataloader's does: two 128x128 cameras and the state at 2
observation steps and a 16-step action chunk, in shuffled batches of 64, through a torch
DataLoader with the same workers for each source. Four sources, one store: the folder
(frames read from their chunk files directly), the folder as a ``file://`` URL (every
read through zarr and fsspec, as a store by URL is read), ``s3://`` read from the server
at every sample (over HTTP to the local server, which shares the machine's cores with the
loader), and ``s3://`` as ``ditvla train`` reads it, keeping each object in the run's
cache folder: timed over its first epoch (every frame fetched once) and after it.

    python -m bench.remote_store [--workers 2] [--batches 20]

Last line: ``remote loader vs local: <X>x; kept by the run <Y>x after its first epoch
(<Z>x during it)``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.loader_data import add_loader_arguments, loader, samples_per_second, write_episodes
from bench.object_store import s3_server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.remote_store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_loader_arguments(parser, batches=20)
    args = parser.parse_args(argv)

    import fsspec.config

    from ditvla.datasets.torch_dataset import ReplayBufferDataset

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ditvla_bench_"))
    store = workdir / "bench.zarr"
    write_episodes(store, args.episodes, args.length, args.size)
    with s3_server() as server:
        start = time.perf_counter()
        url = server.upload(store, "bench/bench.zarr")
        print(
            f"{args.episodes} episodes x {args.length} frames, 2 cameras {args.size}x{args.size}: "
            f"uploaded to {server.endpoint} in {time.perf_counter() - start:.1f} s"
        )
        fsspec.config.conf["s3"] = server.storage_options()  # the workers inherit it
        os.environ["DITVLA_CACHE"] = str(workdir / "machine")  # statistics without a run
        rates = {}

        def report(name: str, rate: float) -> None:
            rates[name] = rate
            print(f"{name:22s}: {rate:8.1f} samples/s ({rate / args.batch_size:.2f} batches/s)")

        for name, source in (("folder", store), ("file://", store.as_uri()), ("s3://", url)):
            dataset = ReplayBufferDataset(source, n_obs_steps=2, horizon=16)
            batches = loader(dataset, args.batch_size, args.workers)
            report(name, samples_per_second(batches, args.batches))
        # as a training run reads it: objects kept in the run's cache folder
        kept = ReplayBufferDataset(url, n_obs_steps=2, horizon=16, cache_dir=workdir / "run")
        epoch = len(kept) // args.batch_size
        batches = loader(kept, args.batch_size, args.workers)
        report("s3://, first epoch", samples_per_second(batches, epoch - 1, warmup=1))
        report("s3://, kept by the run", samples_per_second(batches, args.batches))
    print(
        f"workers {args.workers}, batch {args.batch_size}, {args.batches} timed batches each "
        f"(the first epoch: {epoch}), torch threads {torch.get_num_threads()}"
    )
    local = rates["folder"]
    print(
        f"remote loader vs local: {rates['s3://'] / local:.2f}x; kept by the run "
        f"{rates['s3://, kept by the run'] / local:.2f}x after its first epoch "
        f"({rates['s3://, first epoch'] / local:.2f}x during it)"
    )


if __name__ == "__main__":
    main()

"""Training samples per second from a store in a local folder against the same store on an
S3-compatible server (moto's, started on this machine), in one run.

The loader serves what bench.dataloader's does: two 128x128 cameras and the state at 2
observation steps and a 16-step action chunk, in shuffled batches of 64, through a torch
DataLoader with the same workers for each source. Four sources, one store: the folder
(frames read from their chunk files directly), the folder as a ``file://`` URL (every
read through zarr and fsspec, as a store by URL is read), ``s3://`` read from the server
at every sample (over HTTP to the local server, which shares the machine's cores with the
loader), and ``s3://`` as ``ditvla train`` reads it, keeping each object in the run's
cache folder: timed over its first epoch (every frame fetched once) and after it. Then the
same store packed for object storage (``ditvla dataset pack``: many frames of a camera per
object), uploaded and read as a run reads it, over its first epoch and after it.

    python -m bench.remote_store [--workers 2] [--batches 20] [--frames-per-object 256]

Last line: ``remote loader vs local: <X>x; kept by the run <Y>x after its first epoch
(<Z>x during it); packed <P>x during its first epoch, <Q>x after; upload <U>x faster``.
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
    parser.add_argument(
        "--frames-per-object",
        type=int,
        default=None,
        help="for the packed copy (default: ditvla's)",
    )
    args = parser.parse_args(argv)

    import fsspec.config

    from ditvla.datasets.store_layout import FRAMES_PER_OBJECT
    from ditvla.datasets.store_packing import pack_store
    from ditvla.datasets.torch_dataset import ReplayBufferDataset

    frames_per_object = args.frames_per_object or FRAMES_PER_OBJECT
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ditvla_bench_"))
    store = workdir / "bench.zarr"
    write_episodes(store, args.episodes, args.length, args.size)
    packed = workdir / "packed.zarr"
    pack_store(store, packed, frames_per_object=frames_per_object, overwrite=True, progress=False)
    with s3_server() as server:
        upload_s, urls = {}, {}
        for name, folder in (("bench", store), ("packed", packed)):
            start = time.perf_counter()
            urls[name] = server.upload(folder, f"bench/{name}.zarr")
            upload_s[name] = time.perf_counter() - start
        print(
            f"{args.episodes} episodes x {args.length} frames, 2 cameras {args.size}x{args.size}: "
            f"uploaded to {server.endpoint} in {upload_s['bench']:.1f} s, packed "
            f"({frames_per_object} frames per object) in {upload_s['packed']:.1f} s"
        )
        fsspec.config.conf["s3"] = server.storage_options()  # the workers inherit it
        os.environ["DITVLA_CACHE"] = str(workdir / "machine")  # statistics without a run
        rates = {}

        def report(name: str, rate: float) -> None:
            rates[name] = rate
            print(f"{name:22s}: {rate:8.1f} samples/s ({rate / args.batch_size:.2f} batches/s)")

        for name, source in (
            ("folder", store),
            ("file://", store.as_uri()),
            ("s3://", urls["bench"]),
        ):
            dataset = ReplayBufferDataset(source, n_obs_steps=2, horizon=16)
            batches = loader(dataset, args.batch_size, args.workers)
            report(name, samples_per_second(batches, args.batches))
        # as a training run reads it: objects kept in the run's cache folder
        for name, source in (("s3://", "bench"), ("s3:// packed", "packed")):
            run = workdir / f"run_{source}"
            kept = ReplayBufferDataset(urls[source], n_obs_steps=2, horizon=16, cache_dir=run)
            epoch = len(kept) // args.batch_size
            batches = loader(kept, args.batch_size, args.workers)
            report(f"{name}, first epoch", samples_per_second(batches, epoch - 1, warmup=1))
            report(f"{name}, kept by the run", samples_per_second(batches, args.batches))
    print(
        f"workers {args.workers}, batch {args.batch_size}, {args.batches} timed batches each "
        f"(the first epoch: {epoch}), torch threads {torch.get_num_threads()}"
    )
    local = rates["folder"]
    print(
        f"remote loader vs local: {rates['s3://'] / local:.2f}x; kept by the run "
        f"{rates['s3://, kept by the run'] / local:.2f}x after its first epoch "
        f"({rates['s3://, first epoch'] / local:.2f}x during it); packed "
        f"{rates['s3:// packed, first epoch'] / local:.2f}x during its first epoch, "
        f"{rates['s3:// packed, kept by the run'] / local:.2f}x after; upload "
        f"{upload_s['bench'] / upload_s['packed']:.1f}x faster"
    )


if __name__ == "__main__":
    main()

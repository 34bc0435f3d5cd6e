"""Stores on object storage, against a real S3-compatible server (moto's, started here on a
free localhost port): read as their folder reads, trained on with the folder's losses,
what is derived from them and each object read cached beside the run, never written to, configured as a user
would (fsspec's config, the environment), and an unreachable or refusing server named in
one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import fsspec.config
import numpy as np
import pytest
from test_policy import write_reaching_store
from test_train import SMALL_HEAD, losses

from bench.object_store import s3_server
from ditvla.datasets.motion_targets import (
    MotionTargetSpec,
    compute_motion_targets,
    load_or_compute_motion_targets,
)
from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer
from ditvla.datasets.statistics import compute_stats, load_or_compute_stats
from ditvla.datasets.url_stores import cache_folder, objects_folder
from ditvla.training.trainer import TrainConfig, train

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

MOTION = {"kind": "motion", "size": 8}  # flow targets: cached beside the run too


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """The server, holding ``s3://bucket/reach.zarr`` (a copy of ``local``), readable only
    with ``server.key`` / ``server.secret``."""
    local = tmp_path_factory.mktemp("object_store") / "reach.zarr"
    write_reaching_store(local, episodes=3, length=10)
    with s3_server() as server:
        url = server.upload(local, "bucket/reach.zarr")
        server.require_credentials()
        yield server, url, local


@pytest.fixture
def configured(bucket, monkeypatch, tmp_path):
    """fsspec's configuration pointing at the server (as ~/.config/fsspec/ would)."""
    server, url, local = bucket
    monkeypatch.setitem(fsspec.config.conf, "s3", server.storage_options())
    monkeypatch.setenv("DITVLA_CACHE", str(tmp_path / "machine_cache"))
    return server, url, local


def test_a_store_on_s3_reads_as_its_folder_and_is_never_written(configured, tmp_path):
    _, url, local = configured
    remote, folder = ReplayBuffer.open(url), ReplayBuffer.open(local)
    assert remote.path == url and remote.episode_ends.tolist() == folder.episode_ends.tolist()
    assert remote.tasks == folder.tasks and remote.attrs == folder.attrs
    for episode in range(folder.n_episodes):
        for key, values in folder.get_episode(episode).items():
            np.testing.assert_array_equal(remote.get_episode(episode)[key], values)
    np.testing.assert_array_equal(
        remote.read_frames("cam", [17, 2]), folder.read_frames("cam", [17, 2])
    )

    # derived data: in the cache folder given (a run's), else this machine's, never the bucket
    run_cache = tmp_path / "run" / "cache"
    assert load_or_compute_stats(remote, run_cache) == compute_stats(folder)
    assert (cache_folder(url, run_cache) / "stats.json").exists()
    assert not (tmp_path / "machine_cache").exists()
    load_or_compute_stats(remote)
    assert (cache_folder(url) / "stats.json").is_relative_to(tmp_path / "machine_cache")
    spec = MotionTargetSpec("cam", k=2, size=8)
    targets, _ = load_or_compute_motion_targets(url, spec, progress=False, cache_dir=run_cache)
    expected = compute_motion_targets(folder, spec, progress=False).astype(np.float16)
    np.testing.assert_array_equal(targets, expected)
    assert (cache_folder(url, run_cache) / "targets.zarr").is_dir()

    with pytest.raises(DatasetError, match="a store by URL opens read-only"):
        ReplayBuffer.open(url, mode="a")
    with pytest.raises(DatasetError, match="opened read-only"):
        remote.set_attrs(note="x")
    assert "stats" not in ReplayBuffer.open(url).attrs  # nothing was written to the bucket


def test_a_run_reads_each_object_from_the_server_once(configured, tmp_path):
    """With a run's cache folder, every object read is kept there: once the server has lost
    the frames, a reader opened again with that folder (a loader process, a resumed run)
    still reads each of them, equal to the folder's; a read of kept and new frames at once
    gives each."""
    import s3fs

    server, _, local = configured
    url = server.upload(local, "bucket/kept.zarr")
    run_cache = tmp_path / "run" / "cache"
    folder = ReplayBuffer.open(local)
    frames = list(range(folder.n_frames))
    remote = ReplayBuffer.open(url, cache_dir=run_cache)
    half = remote.read_frames("cam", frames[::2])
    np.testing.assert_array_equal(half, folder.read_frames("cam", frames[::2]))
    first = remote.read_frames("cam", frames[::-1])[::-1]  # half kept, half fetched
    np.testing.assert_array_equal(first, folder.read_frames("cam", frames))
    objects = objects_folder(url, run_cache)
    assert objects.is_relative_to(run_cache)
    assert len(list((objects / "data" / "cam").rglob("c/*/*/*/*"))) == folder.n_frames

    bucket = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    bucket.rm("bucket/kept.zarr/data/cam", recursive=True)
    assert not bucket.exists("bucket/kept.zarr/data/cam/zarr.json")
    again = ReplayBuffer.open(url, cache_dir=run_cache).read_frames("cam", frames[::-1])
    np.testing.assert_array_equal(again, first[::-1])


def test_a_packed_store_is_fetched_one_shard_at_a_time_and_kept_whole(configured, tmp_path):
    """A store packed for object storage (``ditvla dataset pack``, 8 frames per object)
    reads from the bucket as its source's folder does; a run keeps each shard whole once
    any of its frames is read (4 objects for 30 frames), so after the bucket has lost the
    frames, every frame still reads from the run's folder."""
    import s3fs

    from ditvla.datasets.store_packing import pack_store

    server, _, local = configured
    packed = pack_store(local, tmp_path / "packed.zarr", frames_per_object=8, progress=False)
    url = server.upload(packed.path, "bucket/packed.zarr")
    folder = ReplayBuffer.open(local)
    frames = list(range(folder.n_frames))
    run_cache = tmp_path / "run" / "cache"
    remote = ReplayBuffer.open(url, cache_dir=run_cache)
    np.testing.assert_array_equal(
        remote.read_frames("cam", [0, 9, 29]), folder.read_frames("cam", [0, 9, 29])
    )
    kept = objects_folder(url, run_cache) / "data" / "cam"
    assert len(list(kept.rglob("c/*/*/*/*"))) == 3  # the shards of frames 0, 9 and 29
    np.testing.assert_array_equal(remote.read_all("action"), folder.read_all("action"))

    bucket = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    remote.read_frames("cam", [17])  # the fourth shard
    bucket.rm("bucket/packed.zarr/data/cam", recursive=True)
    again = ReplayBuffer.open(url, cache_dir=run_cache)
    np.testing.assert_array_equal(
        again.read_frames("cam", frames), folder.read_frames("cam", frames)
    )
    assert len(list(kept.rglob("c/*/*/*/*"))) == 4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_or_refusing_store_says_what_would_work(configured, monkeypatch):
    server, url, _ = configured
    options = server.storage_options()
    monkeypatch.setitem(fsspec.config.conf, "s3", {**options, "secret": "wrong"})
    with pytest.raises(DatasetError, match="refused access") as refused:
        ReplayBuffer.open(url)
    monkeypatch.setitem(fsspec.config.conf, "s3", {**options, "key": "nobody"})
    with pytest.raises(DatasetError, match="refused access"):
        ReplayBuffer.open(url)
    nowhere = {
        **options,
        "endpoint_url": f"http://127.0.0.1:{_free_port()}",  # nothing listens there
        "config_kwargs": {"retries": {"max_attempts": 1}},  # fail fast
    }
    monkeypatch.setitem(fsspec.config.conf, "s3", nowhere)
    with pytest.raises(DatasetError, match="cannot reach the object store") as unreachable:
        ReplayBuffer.open(url)
    for error in (refused.value, unreachable.value):
        assert "\n" not in str(error) and str(error).startswith(url)
    assert "FSSPEC_S3_KEY and FSSPEC_S3_SECRET" in str(refused.value)
    assert "FSSPEC_S3_ENDPOINT_URL" in str(unreachable.value)


@pytest.mark.slow
def test_training_from_s3_gives_the_losses_of_the_folder(configured, tmp_path):
    """A loader process reading the bucket: the folder's losses, with a motion-foresight
    head; what the run derives from the store (statistics, flow targets) is kept in it."""
    _, url, local = configured
    overrides = {**SMALL_HEAD, "foresight": MOTION}
    common = dict(steps=3, batch_size=8, policy_overrides=overrides, progress=False)
    train(TrainConfig(dataset=str(local), out=str(tmp_path / "folder"), num_workers=0, **common))
    out = tmp_path / "s3"
    train(TrainConfig(dataset=url, out=str(out), num_workers=1, **common))
    np.testing.assert_allclose(losses(out), losses(tmp_path / "folder"), rtol=1e-5)
    stats = json.loads((cache_folder(url, out / "cache") / "stats.json").read_text())
    assert stats["url"] == url and stats["n_frames"] == 30
    assert (cache_folder(url, out / "cache") / "targets.zarr").is_dir()
    assert not (tmp_path / "machine_cache").exists()


def test_the_command_line_reads_the_options_from_the_environment(bucket, tmp_path):
    """FSSPEC_S3_ENDPOINT_URL, _KEY, _SECRET as a user would set them; the process exits
    without aiohttp's "Unclosed client session" noise."""
    server, url, _ = bucket
    env = {**os.environ, **server.environment(), "DITVLA_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "ditvla.cli", "dataset", "info", url],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 episodes" in result.stdout and result.stderr == ""
    assert (cache_folder(url, tmp_path) / "stats.json").exists()

"""The zarr replay buffer: round trips, atomic appends, and clear errors on bad stores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import make_episode, write_store

from ditvla.crash_points import CRASH_AT_ENV, CRASH_EXIT_STATUS
from ditvla.datasets.chunk_files import FrameReader
from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer
from ditvla.datasets.statistics import compute_stats, load_or_compute_stats
from ditvla.datasets.url_stores import cache_folder


def test_round_trip_of_episodes_and_metadata(small_store):
    buffer = ReplayBuffer.open(small_store)
    assert buffer.n_episodes == 3
    assert buffer.n_frames == 16
    assert buffer.episode_ends.tolist() == [5, 8, 16]
    assert buffer.cameras == ["front", "wrist"]
    assert buffer.fps == 10
    assert buffer.zarr_format == 3
    for i, length in enumerate([5, 3, 8]):
        expected = make_episode(i, length)
        got = buffer.get_episode(i)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
        assert buffer.episode_task(i).instruction == f"do thing {i % 2}"
        assert buffer.episode_seed[i] == i
    assert [t.name for t in buffer.tasks] == ["task0", "task1"]


def test_read_frames_matches_slices_and_orders_as_asked(small_store):
    buffer = ReplayBuffer.open(small_store)
    frames = np.array([15, 0, 0, 7])
    got = buffer.read_frames("front", frames)
    full = buffer.read_all("front")
    np.testing.assert_array_equal(got, full[frames])


def test_append_after_reopen_and_stats_invalidated(small_store):
    from ditvla.datasets.statistics import load_or_compute_stats

    buffer = ReplayBuffer.open(small_store, mode="a")
    load_or_compute_stats(buffer)
    assert ReplayBuffer.open(small_store).attrs["stats"]["n_frames"] == 16
    buffer.append_episode(make_episode(3, 4), task="task9", instruction="new")
    reopened = ReplayBuffer.open(small_store)
    assert reopened.n_episodes == 4 and reopened.n_frames == 20
    assert "stats" not in reopened.attrs
    np.testing.assert_array_equal(reopened.get_episode(3)["state"], make_episode(3, 4)["state"])
    assert reopened.episode_seed[3] == -1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.update(state=e["state"][:, :3]), "frames of shape"),
        (lambda e: e["action"].__setitem__((1, 1), np.nan), "NaN"),
        (lambda e: e.pop("wrist"), "wrist"),
        (lambda e: e.update(front=e["front"].astype(np.float32)), "uint8"),
        (lambda e: e.update(action=e["action"][:2]), "one non-zero length"),
    ],
)
def test_bad_episode_is_refused_and_store_unchanged(small_store, change, message):
    buffer = ReplayBuffer.open(small_store, mode="a")
    episode = make_episode(7, 4)
    change(episode)
    with pytest.raises(DatasetError, match=message):
        buffer.append_episode(episode)
    reopened = ReplayBuffer.open(small_store)
    assert reopened.n_frames == 16 and reopened.n_episodes == 3
    assert reopened.check() == []


def test_read_only_store_refuses_append(small_store):
    with pytest.raises(DatasetError, match="read-only"):
        ReplayBuffer.open(small_store).append_episode(make_episode(0, 2))


def test_create_refuses_to_overwrite(small_store):
    with pytest.raises(DatasetError, match="already exists"):
        ReplayBuffer.create(small_store, fps=10)


APPEND_TWO = """
import sys
sys.path.insert(0, sys.argv[2])
from conftest import make_episode
from ditvla.datasets.replay_buffer import ReplayBuffer
buffer = ReplayBuffer.open(sys.argv[1], mode="a")
for i in range(buffer.n_episodes, buffer.n_episodes + 2):
    buffer.append_episode(make_episode(i, 60, size=64), task="t", instruction="x", seed=i)
"""

# Where the child dies while appending its second episode (an episode has four arrays:
# front, wrist, state, action; each append passes array_written once per array).
APPEND_CRASHES = [
    "replay_buffer.append.array_written:6",  # half of its arrays written
    "replay_buffer.append.array_written:8",  # every data array, no meta/episode_ends
    "replay_buffer.append.meta_written:2",  # meta/* written, the marker not yet cleared
]


def append_in_a_child(path: Path, crash_at: str) -> subprocess.CompletedProcess:
    """Run APPEND_TWO in a child process that crashes at the named point."""
    tests_dir = str(Path(__file__).parent)
    return subprocess.run(
        [sys.executable, "-c", APPEND_TWO, str(path), tests_dir],
        env={**os.environ, CRASH_AT_ENV: crash_at},
        capture_output=True,
        text=True,
    )


def test_crash_mid_append_keeps_every_complete_episode(tmp_path):
    path = tmp_path / "crashed.zarr"
    buffer = ReplayBuffer.create(path, fps=10, cameras=["front", "wrist"])
    buffer.append_episode(make_episode(0, 60, size=64), task="t", instruction="x")
    for crash_at in APPEND_CRASHES:
        before = ReplayBuffer.open(path).n_episodes
        result = append_in_a_child(path, crash_at)
        assert result.returncode == CRASH_EXIT_STATUS, (crash_at, result.stderr[-2000:])
        buffer = ReplayBuffer.open(path)
        # the child's first episode is complete and kept; nothing of its second shows
        assert buffer.interrupted_append, crash_at
        assert buffer.n_episodes == before + 1, crash_at
        assert buffer.n_frames == buffer.n_episodes * 60
        for key in ("front", "state", "action"):
            assert buffer.read_all(key).shape[0] == buffer.n_frames
        last = buffer.n_episodes - 1
        np.testing.assert_array_equal(
            buffer.get_episode(last)["front"], make_episode(last, 60, size=64)["front"]
        )
        assert buffer.check() == []
    # After a crash, appending goes on and overwrites the partial episode.
    buffer = ReplayBuffer.open(path, mode="a")
    n = buffer.n_episodes
    buffer.append_episode(make_episode(n, 60, size=64), task="t", instruction="x")
    reopened = ReplayBuffer.open(path)
    assert not reopened.interrupted_append
    for i in range(reopened.n_episodes):
        np.testing.assert_array_equal(
            reopened.get_episode(i)["state"], make_episode(i, 60, size=64)["state"]
        )


def test_crash_in_the_first_append_leaves_an_empty_store_that_appends(tmp_path):
    path = tmp_path / "first.zarr"
    ReplayBuffer.create(path, fps=10, cameras=["front", "wrist"])
    result = append_in_a_child(path, "replay_buffer.append.array_written:1")  # data/front only
    assert result.returncode == CRASH_EXIT_STATUS, result.stderr[-2000:]
    buffer = ReplayBuffer.open(path, mode="a")
    assert buffer.interrupted_append
    assert buffer.n_episodes == 0 and buffer.keys == []
    buffer.append_episode(make_episode(0, 60, size=64), task="t", instruction="x")
    reopened = ReplayBuffer.open(path)
    assert not reopened.interrupted_append and reopened.n_episodes == 1
    np.testing.assert_array_equal(
        reopened.get_episode(0)["wrist"], make_episode(0, 60, 64)["wrist"]
    )
    assert reopened.check() == []


# ---------------------------------------------------------------- bad stores


def test_non_dataset_paths_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        ReplayBuffer.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a zarr replay buffer"):
        ReplayBuffer.open(tmp_path / "plain")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"file\.txt"):
        ReplayBuffer.open(tmp_path / "file.txt")
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w").create_group("data")
    with pytest.raises(DatasetError, match="meta/episode_ends"):
        ReplayBuffer.open(tmp_path / "group.zarr")


def test_missing_array_is_named(small_store):
    from ditvla.datasets.torch_dataset import ReplayBufferDataset

    shutil.rmtree(small_store / "data" / "action")
    with pytest.raises(DatasetError, match=r"small.zarr: missing array data/action"):
        ReplayBufferDataset(small_store)


def test_length_disagreeing_with_episode_ends(small_store):
    zarr.open_array(str(small_store / "data" / "state"), mode="r+").resize((12, 5))
    with pytest.raises(
        DatasetError, match=r"data/state has 12 rows but meta/episode_ends ends at 16"
    ):
        ReplayBuffer.open(small_store)


def test_extra_rows_without_interrupted_append_are_an_error(small_store):
    zarr.open_array(str(small_store / "data" / "state"), mode="r+").resize((20, 5))
    with pytest.raises(DatasetError, match=r"data/state has 20 rows"):
        ReplayBuffer.open(small_store)


def test_wrong_dtypes(small_store, tmp_path):
    group = zarr.open_group(str(small_store), mode="r+")
    group["data"].create_array("front2", shape=(16, 4, 4, 3), dtype=np.float32)
    group.attrs["cameras"] = ["front", "wrist", "front2"]
    with pytest.raises(DatasetError, match=r"data/front2 must be uint8"):
        ReplayBuffer.open(small_store)

    other = tmp_path / "ends.zarr"
    root = zarr.open_group(str(other), mode="w")
    root.create_group("data").create_array("action", shape=(4, 2), dtype=np.float32)
    root.create_group("meta").create_array("episode_ends", data=np.array([4.0]))
    with pytest.raises(DatasetError, match="episode_ends must be a 1-D integer array"):
        ReplayBuffer.open(other)


def test_truncated_image_chunk(small_store):
    chunk = small_store / "data" / "front" / "c" / "6" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    buffer = ReplayBuffer.open(small_store)
    with pytest.raises(DatasetError, match=r"small.zarr: data/front: chunk file .*c/6/0/0/0"):
        buffer.read_frames("front", [6])
    problems = buffer.check()
    assert len(problems) == 1 and "data/front" in problems[0]


def test_truncated_and_missing_low_dim_chunks(small_store):
    chunk = small_store / "data" / "action" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    buffer = ReplayBuffer.open(small_store)
    with pytest.raises(DatasetError, match=r"data/action rows 0:16: chunk file .* is truncated"):
        buffer.read_all("action")
    chunk.unlink()
    with pytest.raises(DatasetError, match=r"data/action rows 0:16: chunk file .* is missing"):
        buffer.read_all("action")


def test_a_packed_copy_reads_as_its_source_with_many_frames_per_file(small_store, tmp_path):
    """``ditvla dataset pack``: the copy holds 4 frames of a camera per file (a zarr shard)
    and reads as its source does; a damaged shard is named; an interrupted pack leaves no
    store at ``out``, and a second run replaces what it left."""
    from ditvla.datasets import store_packing

    ReplayBuffer.open(small_store, mode="a").set_attrs(note="kept")
    source = ReplayBuffer.open(small_store)
    out = tmp_path / "packed.zarr"
    packed = store_packing.pack_store(small_store, out, frames_per_object=4, progress=False)
    for key in source.keys:
        np.testing.assert_array_equal(packed.read_all(key), source.read_all(key))
    np.testing.assert_array_equal(
        packed.read_frames("wrist", [15, 0, 7]), source.read_frames("wrist", [15, 0, 7])
    )
    assert packed.attrs == source.attrs and packed.tasks == source.tasks
    assert packed.episode_seed.tolist() == source.episode_seed.tolist()
    assert packed.array("front").shards == (4, 16, 16, 3)
    assert packed.array("front").chunks == (1, 16, 16, 3)
    assert FrameReader(packed.array("front")).direct  # frames found by the shard's index
    assert sorted(p.name for p in (out / "data" / "front" / "c").iterdir()) == list("0123")
    assert packed.check() == []
    with pytest.raises(DatasetError, match="already exists"):
        store_packing.pack_store(small_store, out, progress=False)
    for inside in (small_store / "inside.zarr", small_store.parent):
        with pytest.raises(DatasetError, match="lies inside the store being packed"):
            store_packing.pack_store(small_store, inside, overwrite=True, progress=False)
    assert ReplayBuffer.open(small_store).n_frames == 16

    single = tmp_path / "single.zarr"
    write_store(single, [6])  # one task: the task index is a chunk of zeros, written too
    copy = store_packing.pack_store(single, out, overwrite=True, progress=False)
    assert copy.episode_task_index.tolist() == [0] and copy.n_frames == 6 and copy.check() == []
    assert not (tmp_path / "packed.zarr.replaced").exists()
    store_packing.pack_store(small_store, out, frames_per_object=4, overwrite=True, progress=False)

    shard = out / "data" / "front" / "c" / "1" / "0" / "0" / "0"  # frames 4-7
    shard.write_bytes(shard.read_bytes()[:-1] + b"?")  # its index's checksum
    with pytest.raises(DatasetError, match=r"c/1/0/0/0 is damaged \(its index fails its CRC32C\)"):
        ReplayBuffer.open(out).read_frames("front", [5])
    (out / "data" / "front" / "c" / "2" / "0" / "0" / "0").unlink()  # frames 8-11
    with pytest.raises(DatasetError, match="c/2/0/0/0 is missing"):
        ReplayBuffer.open(out).read_frames("front", [9])
    problems = ReplayBuffer.open(out).check()
    assert any("c/2/0/0/0 is missing" in problem for problem in problems)

    reads = []
    read = ReplayBuffer.read

    def failing(self, key, start, stop):  # the third block read fails: two were written
        reads.append(key)
        if len(reads) == 3:
            raise OSError("disk full")
        return read(self, key, start, stop)

    again = tmp_path / "again.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ReplayBuffer, "read", failing)
        with pytest.raises(OSError, match="disk full"):
            store_packing.pack_store(small_store, again, progress=False)
    assert not again.exists() and (tmp_path / "again.zarr.partial").exists()
    packed = store_packing.pack_store(small_store, again, frames_per_object=3, progress=False)
    np.testing.assert_array_equal(packed.read_all("front"), source.read_all("front"))
    assert not (tmp_path / "again.zarr.partial").exists()

    # appending to a packed store rewrites its last shard; a reader that read it reads anew
    appended = ReplayBuffer.open(again, mode="a")
    appended.read_frames("front", [15])  # the last shard, frames 15-17, holds one frame
    appended.append_episode(make_episode(3, 2), task="task1", instruction="do thing 1")
    np.testing.assert_array_equal(
        appended.read_frames("front", [15, 16, 17]),
        np.concatenate([source.read_frames("front", [15]), make_episode(3, 2)["front"]]),
    )


def test_newer_format_version_is_refused(small_store):
    group = zarr.open_group(str(small_store), mode="r+")
    group.attrs["format_version"] = 99
    with pytest.raises(DatasetError, match="newer ditvla"):
        ReplayBuffer.open(small_store)


# ---------------------------------------------------------------- zarr v2 stores


def write_diffusion_policy_v2_store(path: Path) -> dict[str, np.ndarray]:
    """A store in the layout diffusion-policy's ReplayBuffer wrote with zarr v2."""
    rng = np.random.default_rng(0)
    data = {
        "img": rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8),
        "state": rng.normal(size=(12, 5)).astype(np.float32),
        "action": rng.normal(size=(12, 2)).astype(np.float32),
    }
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    group = root.create_group("data")
    for key, value in data.items():
        chunks = (1, *value.shape[1:]) if key == "img" else value.shape
        group.create_array(key, data=value, chunks=chunks)
    root.create_group("meta").create_array("episode_ends", data=np.array([5, 12], dtype=np.int64))
    return data


def test_opens_zarr_v2_store(tmp_path):
    from ditvla.datasets.torch_dataset import ReplayBufferDataset

    path = tmp_path / "pusht_like.zarr"
    data = write_diffusion_policy_v2_store(path)
    assert json.loads((path / "data" / "img" / ".zarray").read_text())["zarr_format"] == 2
    buffer = ReplayBuffer.open(path)
    assert buffer.zarr_format == 2
    assert buffer.cameras == ["img"]
    assert buffer.n_episodes == 2
    np.testing.assert_array_equal(buffer.read_frames("img", [11, 3]), data["img"][[11, 3]])
    np.testing.assert_array_equal(buffer.get_episode(1)["action"], data["action"][5:])
    sample = ReplayBufferDataset(path, horizon=3)[5]
    np.testing.assert_array_equal(sample["images"]["img"][1].numpy(), data["img"][5])
    np.testing.assert_array_equal(sample["action"].numpy(), data["action"][5:8])
    with pytest.raises(DatasetError, match="v2 stores open read-only"):
        ReplayBuffer.open(path, mode="a")


def test_a_store_by_url_reads_as_its_folder_does_and_keeps_its_stats_here(
    small_store, tmp_path, monkeypatch
):
    """Through fsspec (file:// here; s3://, gs:// the same way with their filesystems):
    read-only, the store untouched, its statistics kept in this machine's cache."""
    monkeypatch.setenv("DITVLA_CACHE", str(tmp_path / "cache"))
    url = small_store.as_uri()
    remote, local = ReplayBuffer.open(url), ReplayBuffer.open(small_store)
    assert remote.path == url and remote.episode_ends.tolist() == [5, 8, 16]
    for i in range(3):
        for key, array in local.get_episode(i).items():
            np.testing.assert_array_equal(remote.get_episode(i)[key], array)
    stats = load_or_compute_stats(remote)
    assert (cache_folder(url) / "stats.json").exists() and "stats" not in ReplayBuffer.open(
        small_store
    ).attrs
    assert stats == compute_stats(local) == load_or_compute_stats(ReplayBuffer.open(url))
    with pytest.raises(DatasetError, match="a store by URL opens read-only"):
        ReplayBuffer.open(url, mode="a")
    with pytest.raises(DatasetError, match="needs fsspec's filesystem for its scheme"):
        ReplayBuffer.open("nosuchfs://bucket/demos.zarr")
    with pytest.raises(DatasetError, match="not a zarr replay buffer"):
        ReplayBuffer.open((tmp_path / "nothing.zarr").as_uri())

"""LeRobot v3 datasets, made with lerobot's own API, to zarr and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_store
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

from ditvla.cli import main
from ditvla.datasets.convert_lerobot import lerobot_to_zarr, zarr_to_lerobot
from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer

FEATURES = {
    "action": {"dtype": "float32", "shape": (6,), "names": None},
    "observation.state": {"dtype": "float32", "shape": (5,), "names": None},
    "observation.images.top": {
        "dtype": "image",
        "shape": (24, 32, 3),
        "names": ["height", "width", "channels"],
    },
}


def make_lerobot_dataset(root: Path, lengths: list[int]) -> list[dict]:
    """A LeRobot dataset written with create/add_frame/save_episode/finalize."""
    dataset = LeRobotDataset.create(
        "local/source", fps=15, features=FEATURES, root=root, use_videos=False
    )
    rng = np.random.default_rng(0)
    episodes = []
    for e, length in enumerate(lengths):
        episode = {
            "action": rng.normal(size=(length, 6)).astype(np.float32),
            "observation.state": rng.normal(size=(length, 5)).astype(np.float32),
            "observation.images.top": rng.integers(0, 256, (length, 24, 32, 3), dtype=np.uint8),
            "task": f"stack block {e}",
        }
        for t in range(length):
            dataset.add_frame({k: (v if k == "task" else v[t]) for k, v in episode.items()})
        dataset.save_episode()
        episodes.append(episode)
    dataset.finalize()
    return episodes


def test_lerobot_to_zarr_round_trips_every_value(tmp_path):
    episodes = make_lerobot_dataset(tmp_path / "lerobot", [4, 7])
    out = tmp_path / "from_lerobot.zarr"
    assert main(["convert", "from-lerobot", str(tmp_path / "lerobot"), "--out", str(out)]) == 0
    buffer = ReplayBuffer.open(out)
    assert buffer.n_episodes == 2 and buffer.fps == 15
    assert buffer.cameras == ["top"] and buffer.state_keys == ["state"]
    for i, episode in enumerate(episodes):
        got = buffer.get_episode(i)
        np.testing.assert_array_equal(got["action"], episode["action"])
        np.testing.assert_array_equal(got["state"], episode["observation.state"])
        np.testing.assert_array_equal(got["top"], episode["observation.images.top"])
        assert buffer.episode_task(i).instruction == episode["task"]


def test_zarr_to_lerobot_and_back_is_lossless_with_image_storage(tmp_path):
    episodes = make_lerobot_dataset(tmp_path / "lerobot", [3, 5])
    first = lerobot_to_zarr(tmp_path / "lerobot", tmp_path / "a.zarr", progress=False)
    target = tmp_path / "again"
    assert (
        main(["convert", "to-lerobot", str(first.path), "--out", str(target), "--storage", "image"])
        == 0
    )
    reloaded = LeRobotDataset("local/again", root=target)
    assert reloaded.num_episodes == 2 and reloaded.fps == 15
    assert reloaded.meta.names["observation.state"] == [f"state.{i}" for i in range(5)]
    item = reloaded[3 + 2]  # episode 1, frame 2
    np.testing.assert_allclose(item["action"].numpy(), episodes[1]["action"][2])
    assert item["task"] == "stack block 1"
    second = lerobot_to_zarr(target, tmp_path / "b.zarr", progress=False)
    for i in range(2):
        a, b = first.get_episode(i), second.get_episode(i)
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_zarr_to_lerobot_with_video_storage(tmp_path):
    # Smooth moving gradients: what cameras see, and what video codecs are built for.
    small_store = tmp_path / "video_source.zarr"
    buffer = write_store(small_store, [5, 3, 8], size=32)
    yy, xx = np.mgrid[:32, :32]
    t = np.arange(buffer.n_frames)[:, None, None]
    smooth = (128 + 60 * np.sin((xx[None] + 2 * t) / 6) + 50 * np.cos(yy[None] / 5)).astype(
        np.uint8
    )
    for cam in ("front", "wrist"):
        buffer.array(cam)[:] = np.repeat(smooth[..., None], 3, axis=-1)
    target = tmp_path / "video"
    dataset = zarr_to_lerobot(small_store, target, progress=False)
    assert dataset.meta.video_keys == ["observation.images.front", "observation.images.wrist"]
    back = lerobot_to_zarr(target, tmp_path / "back.zarr", progress=False)
    source = ReplayBuffer.open(small_store)
    np.testing.assert_array_equal(back.read_all("action"), source.read_all("action"))
    np.testing.assert_array_equal(back.read_all("state"), source.read_all("state"))
    # Video is lossy: frames come back close, not equal.
    error = np.abs(back.read_all("front").astype(float) - source.read_all("front").astype(float))
    assert error.mean() < 8
    assert [back.episode_task(i).instruction for i in range(3)] == [
        "do thing 0",
        "do thing 1",
        "do thing 0",
    ]


def test_composed_state_becomes_observation_state(tmp_path):
    store = tmp_path / "parts.zarr"
    buffer = ReplayBuffer.create(store, fps=20, state_keys=["ee_pos", "gripper"])
    rng = np.random.default_rng(0)
    episode = {
        "ee_pos": rng.normal(size=(3, 3)),
        "gripper": rng.normal(size=(3, 2)),
        "action": rng.normal(size=(3, 7)),
    }
    buffer.append_episode(episode, task="t", instruction="go")
    dataset = zarr_to_lerobot(store, tmp_path / "lr", progress=False)
    # its names say which arrays, so that a policy trained on it can ask an env for them
    assert LeRobotDatasetMetadata("local/lr", root=tmp_path / "lr").names["observation.state"] == [
        "ee_pos.0",
        "ee_pos.1",
        "ee_pos.2",
        "gripper.0",
        "gripper.1",
    ]
    item = dataset[1]
    np.testing.assert_allclose(
        item["observation.state"].numpy(),
        np.concatenate([episode["ee_pos"][1], episode["gripper"][1]]).astype(np.float32),
    )
    np.testing.assert_allclose(
        item["observation.ee_pos"].numpy(), episode["ee_pos"][1].astype(np.float32)
    )


def test_bad_inputs(tmp_path, small_store):
    with pytest.raises(DatasetError, match="not a LeRobot dataset"):
        lerobot_to_zarr(tmp_path, tmp_path / "x.zarr", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(DatasetError, match="already exists"):
        zarr_to_lerobot(small_store, tmp_path / "exists", progress=False)
    with pytest.raises(DatasetError, match=r"16x16, too small .* \(--storage image\)"):
        zarr_to_lerobot(small_store, tmp_path / "tiny_video", progress=False)

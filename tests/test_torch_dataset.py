"""Training samples from a zarr store: content, workers, augmentation, stats, memory."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_episode
from torch.utils.data import DataLoader

from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer
from ditvla.datasets.statistics import compute_stats, load_or_compute_stats
from ditvla.datasets.torch_dataset import ImageAugmentation, ReplayBufferDataset
from ditvla.errors import ConfigError
from ditvla.policies.normalizer import Normalizer, narrow_features
from ditvla.training.training_data import camera_dropout


def test_sample_content_matches_the_store(small_store):
    dataset = ReplayBufferDataset(small_store, n_obs_steps=2, horizon=4)
    assert len(dataset) == 16
    assert (dataset.action_dim, dataset.state_dim) == (4, 5)
    # Frame 5 is the first frame of episode 1 (length 3, frames 5..7).
    sample = dataset[5]
    episode = make_episode(1, 3)
    assert sample["episode_index"] == 1 and sample["frame_index"] == 5
    assert sample["instruction"] == "do thing 1"
    assert sample["obs_is_pad"].tolist() == [True, False]
    np.testing.assert_array_equal(sample["images"]["front"][0], episode["front"][0])
    np.testing.assert_array_equal(sample["images"]["wrist"][1], episode["wrist"][0])
    np.testing.assert_array_equal(sample["state"][1], episode["state"][0])
    np.testing.assert_array_equal(sample["action"][:3], episode["action"])
    np.testing.assert_array_equal(sample["action"][3], episode["action"][2])
    assert sample["action_is_pad"].tolist() == [False, False, False, True]
    assert sample["images"]["front"].dtype == torch.uint8
    assert tuple(sample["images"]["front"].shape) == (2, 16, 16, 3)


def test_workers_give_the_same_batches(small_store):
    dataset = ReplayBufferDataset(small_store, n_obs_steps=2, horizon=4)
    serial = list(DataLoader(dataset, batch_size=5))
    parallel = list(DataLoader(dataset, batch_size=5, num_workers=2))
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel, strict=True):
        assert a["instruction"] == b["instruction"]
        torch.testing.assert_close(a["action"], b["action"])
        torch.testing.assert_close(a["images"]["front"], b["images"]["front"])


def test_augmentation_shifts_all_steps_alike(small_store):
    augmentation = ImageAugmentation(max_shift_px=3, brightness=0.0, contrast=0.0)
    dataset = ReplayBufferDataset(small_store, horizon=2, augmentation=augmentation)
    plain = ReplayBufferDataset(small_store, horizon=2)
    changed = 0
    for index in (0, 5, 8):  # first frames: both observation steps are the same frame
        sample = dataset[index]["images"]["front"]
        assert sample.shape == plain[index]["images"]["front"].shape
        torch.testing.assert_close(sample[0], sample[1])
        changed += not torch.equal(sample, plain[index]["images"]["front"])
    assert changed >= 1


def test_camera_dropout_blanks_only_that_camera_at_its_rate(small_store):
    dataset = ReplayBufferDataset(small_store, horizon=2, camera_dropout={"front": 0.5})
    plain = ReplayBufferDataset(small_store, horizon=2)
    samples = dataset.__getitems__(list(range(len(dataset))) * 8)
    blank = [not s["images"]["front"].any() for s in samples]
    assert 0.3 < np.mean(blank) < 0.7  # 128 draws at 0.5
    for sample in samples:
        expected = plain[sample["frame_index"]]["images"]
        torch.testing.assert_close(sample["images"]["wrist"], expected["wrist"])  # untouched
        front = sample["images"]["front"]
        assert not front.any() or torch.equal(front, expected["front"])  # whole, or gone
    with pytest.raises(ConfigError, match=r"reads no camera 'top'; it reads front, wrist"):
        camera_dropout("top=0.3", ["front", "wrist"])
    with pytest.raises(ConfigError, match=r"P in \[0, 1\), e.g. front=0.3"):
        camera_dropout("front=1", ["front", "wrist"])
    assert camera_dropout("front=0.25", ["front", "wrist"]) == {"front": 0.25}


def test_dataset_rejects_unknown_camera_and_key(small_store):
    with pytest.raises(DatasetError, match="no camera top; the store's cameras are front, wrist"):
        ReplayBufferDataset(small_store, cameras=["top"])
    with pytest.raises(DatasetError, match="no camera state; the store's cameras are front, wrist"):
        ReplayBufferDataset(small_store, cameras=["state"])
    with pytest.raises(DatasetError, match="missing array data/elbow"):
        ReplayBufferDataset(small_store, state_keys=["elbow"])


def test_stats_are_computed_once_and_stored(small_store):
    dataset = ReplayBufferDataset(small_store)
    stats = dataset.stats()
    state = ReplayBuffer.open(small_store).read_all("state")
    np.testing.assert_allclose(stats["state"]["mean"], state.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["state"]["q99"], np.quantile(state, 0.99, axis=0), rtol=1e-5)
    assert len(stats["front"]["mean"]) == 3
    stored = ReplayBuffer.open(small_store).attrs["stats"]
    assert stored["n_frames"] == 16
    # A second reader uses the stored values (here altered to tell them apart).
    buffer = ReplayBuffer.open(small_store, mode="a")
    stored["keys"]["action"]["mean"] = [42.0] * 4
    buffer.set_attrs(stats=stored)
    assert load_or_compute_stats(ReplayBuffer.open(small_store))["action"]["mean"] == [42.0] * 4


def test_composed_state_stats_follow_state_keys(tmp_path):
    path = tmp_path / "parts.zarr"
    buffer = ReplayBuffer.create(path, fps=5, state_keys=["pos", "grip"])
    rng = np.random.default_rng(1)
    buffer.append_episode(
        {
            "pos": rng.normal(size=(6, 3)),
            "grip": rng.normal(size=(6, 1)),
            "action": rng.normal(size=(6, 2)),
        }
    )
    dataset = ReplayBufferDataset(path, horizon=2)
    assert dataset.state_dim == 4 and dataset.cameras == []
    stats = dataset.stats()
    raw = compute_stats(ReplayBuffer.open(path))
    assert stats["state"]["max"] == raw["pos"]["max"] + raw["grip"]["max"]


@pytest.mark.parametrize("mode", ["mean_std", "min_max", "quantile"])
def test_normalizer_round_trip_and_range(mode):
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=(500, 3)).astype(np.float32)
    values[:, 2] = 1.0  # a constant feature passes through centred
    stats = {"action": compute_stats_of(values)}
    norm = Normalizer(stats, {"action": mode})
    x = torch.from_numpy(values)
    y = norm.normalize("action", x)
    if mode == "mean_std":
        torch.testing.assert_close(y[:, :2].mean(0), torch.zeros(2), atol=1e-4, rtol=0)
    if mode == "min_max":
        assert y[:, :2].min() >= -1 - 1e-5 and y[:, :2].max() <= 1 + 1e-5
    torch.testing.assert_close(y[:, 2], torch.zeros(500))
    if mode != "quantile":
        torch.testing.assert_close(norm.unnormalize("action", y), x, atol=1e-4, rtol=1e-5)
    else:
        assert y.abs().max() <= 1.5
    # Statistics travel in the state dict.
    again = Normalizer(stats, {"action": mode})
    again.load_state_dict(norm.state_dict())
    assert set(norm.state_dict()) == {"action__center", "action__scale"}


def compute_stats_of(values: np.ndarray) -> dict:
    from ditvla.datasets.statistics import _array_stats

    return _array_stats(values)


def test_a_barely_varying_state_dimension_is_named_before_mean_std_magnifies_it():
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 0.3, size=(500, 4)).astype(np.float32)
    values[:, 1] = 1.0 + rng.normal(0.0, 8e-4, 500)  # a gripper the demonstrations never use
    values[:, 3] = 0.5  # constant: passes through centred, nothing to magnify
    stats = {"state": compute_stats_of(values)}
    assert narrow_features(stats, "state") == [1]
    # why it matters: the policy opening that gripper by 0.1 is a huge input under mean_std
    moved = torch.tensor([[0.0, 1.1, 0.0, 0.5]])
    assert Normalizer(stats, {"state": "mean_std"}).normalize("state", moved)[0, 1] > 100
    assert Normalizer(stats, {"state": "quantile"}).normalize("state", moved)[0, 1] == 1.5


def test_normalizer_names_missing_stats():
    with pytest.raises(KeyError, match="state"):
        Normalizer({}, {"state": "mean_std"})


MEMORY_PROBE = """
import resource, sys
import torch
from torch.utils.data import DataLoader
from ditvla.datasets.torch_dataset import ReplayBufferDataset
dataset = ReplayBufferDataset(sys.argv[1], n_obs_steps=2, horizon=16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for batch in DataLoader(dataset, batch_size=32, shuffle=True):
    pass
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""


def test_memory_stays_bounded_for_a_store_larger_than_the_budget(tmp_path):
    # 240 MB of incompressible frames; iterating every sample must not load them all.
    path = tmp_path / "big.zarr"
    buffer = ReplayBuffer.create(path, fps=10, cameras=["cam"])
    rng = np.random.default_rng(0)
    for _ in range(8):
        buffer.append_episode(
            {
                "cam": rng.integers(0, 256, size=(150, 256, 256, 3), dtype=np.uint8),
                "state": rng.normal(size=(150, 4)),
                "action": rng.normal(size=(150, 2)),
            }
        )
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, check=True
    )
    growth_mb = int(out.stdout.strip().splitlines()[-1])
    assert growth_mb < 100, f"peak memory grew by {growth_mb} MB while iterating a 240 MB store"

"""Shared fixtures: small real stores on disk, no hub access."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ditvla.datasets.replay_buffer import ReplayBuffer

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--nightly",
        action="store_true",
        help="also run the tests marked nightly (minutes each; `make test-nightly`)",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked nightly run only with --nightly: each takes minutes on the 2-core CPU,
    and a cheaper test in the default suite covers the same code."""
    if config.getoption("--nightly"):
        return
    skip = pytest.mark.skip(reason="nightly: run with --nightly (make test-nightly)")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _hf_home(tmp_path_factory, monkeypatch):
    """lerobot writes to ~/.cache/huggingface unless HF_HOME is set: keep it in tmp."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


def make_episode(index: int, length: int, size: int = 16, state_dim: int = 5) -> dict:
    """A deterministic episode whose every value depends on (episode, frame)."""
    rng = np.random.default_rng(index)
    frames = np.arange(length)
    base = rng.integers(0, 256, size=(1, size, size, 3))
    image = ((base + frames[:, None, None, None] * 7) % 256).astype(np.uint8)
    return {
        "front": image,
        "wrist": (255 - image).astype(np.uint8),
        "state": (index * 1000 + frames[:, None] + np.arange(state_dim) / 10).astype(np.float32),
        "action": rng.normal(size=(length, 4)).astype(np.float32),
    }


def write_store(path: Path, lengths: list[int], size: int = 16) -> ReplayBuffer:
    buffer = ReplayBuffer.create(path, fps=10, cameras=["front", "wrist"])
    for i, length in enumerate(lengths):
        buffer.append_episode(
            make_episode(i, length, size=size),
            task=f"task{i % 2}",
            instruction=f"do thing {i % 2}",
            seed=i,
        )
    return buffer


@pytest.fixture
def small_store(tmp_path) -> Path:
    path = tmp_path / "small.zarr"
    write_store(path, [5, 3, 8])
    return path

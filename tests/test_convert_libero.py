"""LIBERO HDF5 (official layout, written here with h5py) to zarr: every value round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from ditvla.cli import main
from ditvla.datasets.convert_libero import (
    LIBERO_STATE_KEYS,
    convert_libero_hdf5,
    zarr_to_libero_hdf5,
)
from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer


def write_libero_file(path: Path, instruction: str, lengths: list[int], seed: int) -> list[dict]:
    """A file in LIBERO's layout; returns the demos as written."""
    rng = np.random.default_rng(seed)
    demos = []
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps(
            {"problem_name": "libero_tabletop_manipulation", "language_instruction": instruction}
        )
        data.attrs["env_args"] = json.dumps({"env_name": "Libero_Tabletop_Manipulation"})
        for i, length in enumerate(lengths):
            demo = {
                "actions": rng.uniform(-1, 1, size=(length, 7)),
                "agentview_rgb": rng.integers(0, 256, (length, 12, 10, 3), dtype=np.uint8),
                "eye_in_hand_rgb": rng.integers(0, 256, (length, 12, 10, 3), dtype=np.uint8),
                "ee_pos": rng.normal(size=(length, 3)),
                "ee_ori": rng.normal(size=(length, 3)),
                "gripper_states": rng.normal(size=(length, 2)),
                "joint_states": rng.normal(size=(length, 7)),
            }
            group = data.create_group(f"demo_{i}")
            group.attrs["num_samples"] = length
            group.create_dataset("actions", data=demo["actions"])
            obs = group.create_group("obs")
            for key, value in demo.items():
                if key != "actions":
                    obs.create_dataset(key, data=value)
            group.create_dataset("rewards", data=np.zeros(length))
            group.create_dataset("dones", data=np.zeros(length, dtype=np.uint8))
            demos.append(demo)
    return demos


@pytest.fixture
def libero_folder(tmp_path) -> tuple[Path, dict[str, list[dict]]]:
    folder = tmp_path / "libero_spatial"
    folder.mkdir()
    written = {
        "pick_up_the_black_bowl_demo": write_libero_file(
            folder / "pick_up_the_black_bowl_demo.hdf5", "pick up the black bowl", [4, 6], 0
        ),
        "open_the_drawer_demo": write_libero_file(
            folder / "open_the_drawer_demo.hdf5", "open the drawer", [5], 1
        ),
    }
    return folder, written


def test_convert_libero_folder_round_trips_every_value(libero_folder, tmp_path, capsys):
    folder, written = libero_folder
    out = tmp_path / "libero.zarr"
    assert main(["convert", "libero", str(folder), "--out", str(out)]) == 0
    assert "3 episodes" in capsys.readouterr().out
    buffer = ReplayBuffer.open(out)
    assert buffer.cameras == ["agentview", "eye_in_hand"]
    assert buffer.state_keys == list(LIBERO_STATE_KEYS)
    assert buffer.fps == 20
    # Files are taken in sorted order: open_the_drawer first.
    expected = [
        ("open_the_drawer", "open the drawer", written["open_the_drawer_demo"][0]),
        (
            "pick_up_the_black_bowl",
            "pick up the black bowl",
            written["pick_up_the_black_bowl_demo"][0],
        ),
        (
            "pick_up_the_black_bowl",
            "pick up the black bowl",
            written["pick_up_the_black_bowl_demo"][1],
        ),
    ]
    for episode, (task, instruction, demo) in enumerate(expected):
        got = buffer.get_episode(episode)
        assert buffer.episode_task(episode).name == task
        assert buffer.episode_task(episode).instruction == instruction
        np.testing.assert_array_equal(got["action"], demo["actions"].astype(np.float32))
        for key in ("ee_pos", "ee_ori", "gripper_states", "joint_states"):
            np.testing.assert_array_equal(got[key], demo[key].astype(np.float32))
        # Upright: rotated by 180 degrees, as LIBERO's evaluation shows them.
        np.testing.assert_array_equal(got["agentview"], demo["agentview_rgb"][:, ::-1, ::-1])
        np.testing.assert_array_equal(got["eye_in_hand"], demo["eye_in_hand_rgb"][:, ::-1, ::-1])


def test_no_flip_keeps_images_as_stored(libero_folder, tmp_path):
    folder, written = libero_folder
    buffer = convert_libero_hdf5(
        [folder / "open_the_drawer_demo.hdf5"],
        tmp_path / "x.zarr",
        flip_images=False,
        progress=False,
    )
    demo = written["open_the_drawer_demo"][0]
    np.testing.assert_array_equal(buffer.get_episode(0)["agentview"], demo["agentview_rgb"])


def test_missing_observation_is_named_and_nothing_written(libero_folder, tmp_path):
    folder, _ = libero_folder
    with h5py.File(folder / "pick_up_the_black_bowl_demo.hdf5", "a") as f:
        del f["data/demo_1/obs/ee_ori"]
    out = tmp_path / "bad.zarr"
    with pytest.raises(
        DatasetError, match=r"pick_up_the_black_bowl_demo.hdf5: data/demo_1/obs/ee_ori is missing"
    ):
        convert_libero_hdf5([folder], out, progress=False)
    assert not out.exists()


def test_wrong_image_dtype_and_length_mismatch(libero_folder, tmp_path):
    folder, _ = libero_folder
    path = folder / "open_the_drawer_demo.hdf5"
    with h5py.File(path, "a") as f:
        del f["data/demo_0/obs/agentview_rgb"]
        f["data/demo_0/obs"].create_dataset("agentview_rgb", data=np.zeros((5, 12, 10, 3)))
    with pytest.raises(
        DatasetError, match=r"agentview_rgb must be uint8 \(T, H, W, 3\), found float64"
    ):
        convert_libero_hdf5([path], tmp_path / "a.zarr", progress=False)
    with h5py.File(path, "a") as f:
        del f["data/demo_0/obs/agentview_rgb"]
        f["data/demo_0/obs"].create_dataset(
            "agentview_rgb", data=np.zeros((4, 12, 10, 3), np.uint8)
        )
    with pytest.raises(DatasetError, match="share one non-zero length"):
        convert_libero_hdf5([path], tmp_path / "b.zarr", progress=False)


def test_not_hdf5_and_missing_instruction(tmp_path):
    bogus = tmp_path / "bogus.hdf5"
    bogus.write_text("not hdf5")
    with pytest.raises(DatasetError, match="not a readable HDF5 file"):
        convert_libero_hdf5([bogus], tmp_path / "x.zarr", progress=False)
    path = tmp_path / "task_demo.hdf5"
    write_libero_file(path, "x", [2], 0)
    with h5py.File(path, "a") as f:
        del f["data"].attrs["problem_info"]
    with pytest.raises(DatasetError, match="problem_info"):
        convert_libero_hdf5([path], tmp_path / "y.zarr", progress=False)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert (
        main(["convert", "libero", str(tmp_path / "nope.hdf5"), "--out", str(tmp_path / "o.zarr")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("ditvla: error: ") and "nope.hdf5: no such file" in err
    assert "Traceback" not in err


def test_a_store_goes_back_to_libero_files_and_converts_again_unchanged(
    libero_folder, tmp_path, capsys
):
    """zarr -> LIBERO HDF5 (the layout of LIBERO's create_dataset.py) -> zarr keeps every
    value, and the files hold what LIBERO's own files hold besides the MuJoCo states."""
    folder, _ = libero_folder
    first = tmp_path / "first.zarr"
    convert_libero_hdf5([folder], first, progress=False)
    assert main(["convert", "to-libero", str(first), "--out", str(tmp_path / "h5")]) == 0
    assert "2 LIBERO HDF5 files" in capsys.readouterr().out
    with h5py.File(tmp_path / "h5" / "open_the_drawer_demo.hdf5", "r") as f:
        data = f["data"]
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == "open the drawer"
        assert data.attrs["num_demos"] == 1 and data.attrs["total"] == 5
        demo = data["demo_0"]
        assert demo.attrs["num_samples"] == 5 and demo["dones"][-1] == 1
        assert set(demo["obs"]) == {
            "agentview_rgb",
            "eye_in_hand_rgb",
            "ee_pos",
            "ee_ori",
            "ee_states",
            "gripper_states",
            "joint_states",
        }
        np.testing.assert_array_equal(
            demo["obs"]["ee_states"][:, 3:], np.asarray(demo["obs"]["ee_ori"])
        )
    again = convert_libero_hdf5([tmp_path / "h5"], tmp_path / "again.zarr", progress=False)
    before = ReplayBuffer.open(first)
    assert again.n_episodes == before.n_episodes == 3
    for episode in range(3):
        assert again.episode_task(episode).instruction == before.episode_task(episode).instruction
        got, want = again.get_episode(episode), before.get_episode(episode)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(DatasetError, match="already exist"):
        zarr_to_libero_hdf5(first, tmp_path / "h5", progress=False)


def test_a_store_without_libero_arrays_is_refused_by_name(tmp_path):
    buffer = ReplayBuffer.create(tmp_path / "s.zarr", fps=10, cameras=["agentview"])
    buffer.append_episode(
        {
            "agentview": np.zeros((3, 8, 8, 3), np.uint8),
            "state": np.zeros((3, 4)),
            "action": np.zeros((3, 7)),
        },
        task="t",
        instruction="do it",
    )
    with pytest.raises(DatasetError, match=r"needs arrays eye_in_hand, ee_pos, ee_ori"):
        zarr_to_libero_hdf5(tmp_path / "s.zarr", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

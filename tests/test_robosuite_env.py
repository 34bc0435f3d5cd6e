"""robosuite tasks behind our schema, their scripted experts, and collection into a store."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ditvla.datasets.errors import DatasetError
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.statistics import load_or_compute_stats
from ditvla.envs.baselines import ExpertPolicy, RandomPolicy
from ditvla.envs.collect import collect_demonstrations
from ditvla.envs.evaluate import evaluate
from ditvla.envs.registry import parse_env
from ditvla.envs.robosuite_env import RobosuiteEnv, observed_again
from ditvla.training.processes import join_processes
from ditvla.training.trainer import TrainConfig
from ditvla.training.training_data import training_dataset


def test_task_names_and_unknown_ones():
    suite, tasks = parse_env("robosuite:all")
    assert tasks == ["Lift", "Stack", "PickPlaceCan", "NutAssemblySquare"]
    assert suite.action_dim == 7
    with pytest.raises(ValueError, match="unknown robosuite task Door; valid: all, Lift, Stack"):
        parse_env("robosuite:Lift,Door")


def test_observation_schema_seeded_episodes_and_bad_actions():
    env = RobosuiteEnv("Lift", cameras=("agentview", "robot0_eye_in_hand"), image_size=32)
    try:
        obs, _ = env.reset(seed=3)
        assert set(obs) == {"images", "state", "instruction"}
        assert obs["instruction"] == "lift the red cube"
        assert obs["state"].shape == (9,) and obs["state"].dtype == np.float32
        for cam in ("agentview", "robot0_eye_in_hand"):
            assert obs["images"][cam].shape == (32, 32, 3) and obs["images"][cam].dtype == np.uint8
        cube = env._raw["cube_pos"].copy()
        again, _ = env.reset(seed=3)
        assert np.array_equal(env._raw["cube_pos"], cube)  # one seed, one episode
        assert np.array_equal(again["images"]["agentview"], obs["images"]["agentview"])
        env.reset(seed=4)
        assert not np.allclose(env._raw["cube_pos"], cube)
        moved, *_ = env.step(np.array([0, 0, 1, 0, 0, 0, -1], np.float32), render=False)
        assert moved["images"] == {} and moved["state"][2] > obs["state"][2]  # up means up
        with pytest.raises(ValueError, match=r"shape \(7,\)"):
            env.step(np.zeros(4, np.float32))
        with pytest.raises(ValueError, match="NaN"):
            env.step(np.full(7, np.nan, np.float32))
    finally:
        env.close()
    with pytest.raises(ValueError, match="unknown robosuite camera"):
        RobosuiteEnv("Lift", cameras=("corner",))


def test_the_first_observation_is_as_fresh_as_the_next():
    env = RobosuiteEnv("PickPlaceCan", cameras=(), state_keys=("proprio", "objects"))
    try:
        env.reset(seed=3)
        first = env._raw["Can_to_robot0_eef_pos"].copy()
        assert np.linalg.norm(first) > 0.05  # robosuite's own first sample was zeros
        np.testing.assert_allclose(first, observed_again(env._env)["Can_to_robot0_eef_pos"])
    finally:
        env.close()


def test_experts_succeed_random_does_not(tmp_path):
    report = evaluate(
        ExpertPolicy(),
        "robosuite:Lift,Stack,PickPlaceCan",
        episodes_per_task=1,
        workers=2,
        out=tmp_path / "expert",
        videos_per_task=1,
        progress=False,
    )
    summary = json.loads((tmp_path / "expert" / "results.json").read_text())
    assert {t: v["success_rate"] for t, v in summary["tasks"].items()} == {
        "Lift": 1.0,
        "Stack": 1.0,
        "PickPlaceCan": 1.0,
    }
    assert (tmp_path / "expert" / "videos" / "Lift_seed100000.mp4").stat().st_size > 1000
    assert all(e.error is None for e in report.episodes)
    random = evaluate(
        RandomPolicy(action_dim=7),
        "robosuite:Lift",
        episodes_per_task=1,
        workers=1,
        max_steps=100,
        progress=False,
    )
    assert random.summary()["mean_success"] == 0.0


def test_a_task_without_expert_fails_its_episodes_with_the_reason():
    report = evaluate(
        ExpertPolicy(), "robosuite:NutAssemblySquare", episodes_per_task=1, progress=False
    )
    assert len(report.episodes) == 1
    assert all("no scripted expert for robosuite task" in e.error for e in report.episodes)


def test_collect_writes_expert_episodes_to_a_store(tmp_path):
    report = collect_demonstrations(
        "robosuite:Lift",
        tmp_path / "lift.zarr",
        episodes_per_task=2,
        cameras=("agentview",),
        image_size=32,
        progress=False,
    )
    assert report.kept == {"Lift": 2}
    buffer = ReplayBuffer.open(tmp_path / "lift.zarr")
    assert buffer.n_episodes == 2 and buffer.cameras == ["agentview"]
    assert buffer.shape("agentview") == (32, 32, 3)
    assert buffer.shape("action") == (7,) and buffer.shape("proprio") == (9,)
    assert buffer.fps == pytest.approx(20.0)
    assert buffer.attrs["action_space"].startswith("robosuite OSC_POSE")
    assert buffer.episode_seed.tolist() == [0, 1]
    assert buffer.episode_task(0).instruction == "lift the red cube"
    # robosuite's experts have one way per task: multimodal collection is refused up front
    with pytest.raises(ValueError, match=r"one way per task.*metaworld"):
        collect_demonstrations(
            "robosuite:Lift",
            tmp_path / "mm.zarr",
            episodes_per_task=1,
            cameras=(),
            multimodal=True,
            progress=False,
        )
    assert not (tmp_path / "mm.zarr").exists()


@pytest.mark.filterwarnings("ignore:state .proprio. dimensions")
def test_tasks_with_privileged_arrays_of_other_widths_share_one_store(tmp_path):
    """Lift records 10 object numbers, PickPlaceCan 14: the store pads them to 14 with a
    mask, the statistics read only the real columns, the auxiliary targets are 0 in the
    padding, and a policy cannot read the padded array as state."""
    store = tmp_path / "two.zarr"
    report = collect_demonstrations(
        "robosuite:Lift,PickPlaceCan",
        store,
        episodes_per_task=1,
        cameras=("agentview",),
        image_size=32,
        workers=1,
        progress=False,
    )
    assert report.kept == {"Lift": 1, "PickPlaceCan": 1}
    buffer = ReplayBuffer.open(store)
    assert buffer.shape("objects") == (14,) and buffer.shape("objects_valid") == (14,)
    lift, can = (buffer.get_episode(e) for e in (0, 1))
    assert lift["objects_valid"][:, :10].all() and not lift["objects_valid"][:, 10:].any()
    assert not lift["objects"][:, 10:].any() and can["objects_valid"].all()
    stats = load_or_compute_stats(buffer)["objects"]
    both = np.concatenate([lift["objects"][:, :10], can["objects"][:, :10]])
    np.testing.assert_allclose(stats["mean"][:10], both.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["mean"][10:], can["objects"][:, 10:].mean(0), rtol=1e-4)
    np.testing.assert_allclose(stats["std"][10:], can["objects"][:, 10:].std(0), rtol=1e-3)

    config = TrainConfig(dataset=str(store), out=str(tmp_path / "run"), auxiliary="objects")
    _, _, dataset = training_dataset(config, join_processes("cpu"))
    targets = dataset.frame_targets["auxiliary"]
    lift_frames = slice(0, len(lift["action"]))
    assert targets.shape == (buffer.n_frames, 14)
    assert not targets[lift_frames, 10:].any() and targets[lift_frames, :10].any()
    for state in ("full", "proprio,objects"):
        with pytest.raises(DatasetError, match=r"objects differs in width between the store"):
            training_dataset(replace(config, state=state), join_processes("cpu"))

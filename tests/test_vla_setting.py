"""The VLA setting: state a robot has, a suite where the instruction decides, probes that
show what a policy uses, and stores from before the split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditvla.cli import main
from ditvla.contract import PolicySpec
from ditvla.datasets.errors import DatasetError
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.envs.collect import collect_demonstrations
from ditvla.envs.evaluate import evaluate
from ditvla.envs.metaworld_env import COLOUR_REACH, MetaWorldEnv, split_state, task_set
from ditvla.policies.policy import DiTVLAPolicy
from ditvla.training.trainer import TrainConfig, train


def test_colour_reach_tasks_share_a_scene_and_differ_by_instruction():
    assert task_set("colour-reach") == list(COLOUR_REACH) and len(COLOUR_REACH) >= 3
    envs = [MetaWorldEnv(task, cameras=("behindGripper",), image_size=48) for task in COLOUR_REACH]
    try:
        observations = [env.reset(seed=3)[0] for env in envs]
        # one scene: the same frame and proprioception, only the instruction and goal differ
        for obs in observations[1:]:
            np.testing.assert_array_equal(
                obs["images"]["behindGripper"], observations[0]["images"]["behindGripper"]
            )
            np.testing.assert_array_equal(obs["state"], observations[0]["state"])
        assert len({obs["instruction"] for obs in observations}) == len(COLOUR_REACH)
        goals = [env.state_parts()["goal"] for env in envs]
        assert (
            min(np.linalg.norm(a - b) for i, a in enumerate(goals) for b in goals[i + 1 :]) >= 0.15
        )
        # the scripted expert reaches the instructed ball, and goes on to bring the
        # fingertips (where success is measured) to its centre, not just inside the
        # 5 cm success sphere (a policy imitating it a little short would hover outside)
        for env in envs:
            for seed in range(5):
                env.reset(seed=seed, options={"skip_images": True})
                success = False
                for _ in range(150):
                    _, _, success, _, _ = env.step(env.expert_action(), render=False)
                    if success:
                        break
                assert success, (env.task, seed)
                for _ in range(40):
                    env.step(env.expert_action(), render=False)
                gap = np.linalg.norm(env._env.tcp_center - env.state_parts()["goal"])
                assert gap < 0.01, (env.task, seed, gap)
    finally:
        for env in envs:
            env.close()


@pytest.fixture(scope="module")
def reach_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("vla") / "reach.zarr"
    collect_demonstrations(
        "metaworld:reach-green-ball,reach-blue-ball",
        out,
        episodes_per_task=2,
        image_size=32,
        cameras=("behindGripper",),
        progress=False,
    )
    return out


def test_auxiliary_targets_are_learned_in_training_and_never_read(reach_store, tmp_path):
    common = dict(dataset=str(reach_store), steps=2, batch_size=4, num_workers=0, progress=False)
    folder = train(TrainConfig(out=str(tmp_path / "aux"), auxiliary="goal", **common))
    config = json.loads((folder / "config.json").read_text())["policy"]
    assert config["auxiliary_keys"] == ["goal"] and config["auxiliary_dim"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "aux" / "metrics.jsonl").open()]
    assert all(m["auxiliary_loss"] > 0 for m in metrics)
    policy = DiTVLAPolicy.from_pretrained(folder)
    assert policy.spec.state_keys == ("proprio",)  # the goal is never an input
    buffer = ReplayBuffer.open(reach_store)
    episode = buffer.get_episode(0)
    chunk = policy.predict_action_chunk(
        {
            "images": {"behindGripper": episode["behindGripper"][0]},
            "state": episode["proprio"][0],
            "instruction": "reach the green ball",
        }
    )
    assert chunk.shape == (policy.config.horizon, 4)
    with pytest.raises(
        DatasetError, match=r"--auxiliary 'hand'.*privileged arrays are objects, goal"
    ):
        train(TrainConfig(out=str(tmp_path / "bad"), auxiliary="hand", **common))
    with pytest.raises(DatasetError, match=r"--auxiliary 'proprio'.*privileged arrays are"):
        train(TrainConfig(out=str(tmp_path / "bad"), auxiliary="proprio", **common))
    every = train(TrainConfig(out=str(tmp_path / "all"), auxiliary="privileged", **common))
    config = json.loads((every / "config.json").read_text())["policy"]
    assert config["auxiliary_keys"] == ["objects", "goal"] and config["auxiliary_dim"] == 31
    with pytest.raises(DatasetError, match=r"hold 32x32 frames, not 64; collect at that size"):
        train(TrainConfig(out=str(tmp_path / "big"), image_size=64, **common))


def test_the_auxiliary_prediction_can_condition_the_action_head(reach_store, tmp_path):
    # enough steps past the warm-up for the head's zero-initialized modulation to move
    common = dict(dataset=str(reach_store), steps=30, batch_size=4, num_workers=0, progress=False)
    # the attention pooling here (the mean is the default, which the other tests train)
    overrides = {"auxiliary_input": True, "auxiliary_pooling": "attention"}
    folder = train(
        TrainConfig(
            out=str(tmp_path / "in"), auxiliary="goal", policy_overrides=overrides, **common
        )
    )
    policy = DiTVLAPolicy.from_pretrained(folder)
    assert policy.head.config.state_dim == 8 + 3  # proprio, then the predicted goal
    episode = ReplayBuffer.open(reach_store).get_episode(0)
    observation = {
        "images": {"behindGripper": episode["behindGripper"][0]},
        "state": episode["proprio"][0],
        "instruction": "reach the green ball",
    }
    context = policy.encode(observation)
    assert context.estimate.shape == (1, 3)
    noise = torch.randn(1, *policy.noise_shape)
    chunk = policy.act(context, observation["state"], noise=noise)
    context.estimate = context.estimate + 3.0  # the goal read elsewhere: the head follows
    assert not torch.allclose(policy.act(context, observation["state"], noise=noise), chunk)
    with pytest.raises(ValueError, match="auxiliary_input: the action head reads"):
        train(TrainConfig(out=str(tmp_path / "x"), policy_overrides=overrides, **common))


def test_training_reads_proprioception_unless_asked(reach_store, tmp_path):
    common = dict(dataset=str(reach_store), steps=2, batch_size=4, num_workers=0, progress=False)
    policy_dir = train(TrainConfig(out=str(tmp_path / "p"), **common))
    config = json.loads((policy_dir / "config.json").read_text())["policy"]
    assert config["state_keys"] == ["proprio"] and config["state_dim"] == 8
    full = train(TrainConfig(out=str(tmp_path / "f"), state="full", **common))
    config = json.loads((full / "config.json").read_text())["policy"]
    assert config["state_keys"] == ["proprio", "objects", "goal"] and config["state_dim"] == 39
    with pytest.raises(DatasetError, match=r"no state array hand.*has proprio, objects, goal"):
        train(TrainConfig(out=str(tmp_path / "x"), state="proprio,hand", **common))


def test_evaluation_builds_the_policy_state_and_reports_it(reach_store, tmp_path):
    class Recorder:
        """Acts from nothing; remembers what it was given."""

        def __init__(self, state_keys, state_dim):
            self.spec = PolicySpec(
                cameras=("behindGripper",),
                image_size=32,
                state_dim=state_dim,
                action_dim=4,
                n_action_steps=4,
                state_keys=state_keys,
            )
            self.seen = []

        def reset(self):
            pass

        def predict_action_chunk(self, batch, **_):
            self.seen.append(batch)
            return torch.zeros(len(batch["instruction"]), 4, 4)

    policy = Recorder(("proprio", "goal"), 11)
    report = evaluate(
        policy, "metaworld:colour-reach", episodes_per_task=2, max_steps=8, progress=False
    )
    assert policy.seen[0]["state"].shape[1] == 11
    observation = report.summary()["observation"]
    assert observation == {
        "cameras": ["behindGripper"],
        "state_keys": ["proprio", "goal"],
        "privileged_state": True,
        "probe": "none",
    }
    assert "privileged simulator state" in report.markdown()
    # probes: frames blanked; every episode told another task's instruction
    blank = Recorder(("proprio",), 8)
    evaluate(
        blank,
        "metaworld:colour-reach",
        episodes_per_task=1,
        max_steps=4,
        probe="blank_images",
        progress=False,
    )
    assert all(not b["images"]["behindGripper"].any() for b in blank.seen)
    shuffled = Recorder(("proprio",), 8)
    evaluate(
        shuffled,
        "metaworld:colour-reach",
        episodes_per_task=2,
        max_steps=4,
        probe="shuffled_instructions",
        progress=False,
    )
    for batch in shuffled.seen:
        for task, said in zip(batch["task"], batch["instruction"], strict=True):
            assert said != f"reach the {task.split('-')[1]} ball" and said.startswith("reach the")
    # a state the environment cannot build is refused before any episode, naming both
    with pytest.raises(
        ValueError, match=r"reads state proprio \+ elbow.*offers proprio, objects, goal"
    ):
        evaluate(
            Recorder(("proprio", "elbow"), 9),
            "metaworld:colour-reach",
            episodes_per_task=1,
            progress=False,
        )


def test_a_store_from_before_the_split_loads_and_splits_without_losing_a_frame(tmp_path):
    old = tmp_path / "old.zarr"
    env = MetaWorldEnv("drawer-close-v3", cameras=(), state_keys=("state",))
    buffer = ReplayBuffer.create(old, fps=80, source="metaworld scripted experts (old)")
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        states, actions = [], []
        for _ in range(6):
            action = env.expert_action()
            states.append(obs["state"])
            actions.append(action)
            obs, *_ = env.step(action, render=False)
        buffer.append_episode({"state": np.stack(states), "action": np.stack(actions)})
    env.close()
    old_buffer = ReplayBuffer.open(old)
    assert old_buffer.resolve_state("full") == ["state"]
    with pytest.raises(DatasetError, match="split-state"):
        old_buffer.resolve_state("proprio")
    assert main(["dataset", "split-state", str(old)]) == 0
    split = ReplayBuffer.open(old)
    assert split.n_frames == 12 and split.state_keys == ["proprio"]
    raw = split.read_all("state")
    np.testing.assert_array_equal(split.read_all("proprio"), raw[:, [0, 1, 2, 3, 18, 19, 20, 21]])
    np.testing.assert_array_equal(split.read_all("goal"), raw[:, 36:])
    assert split_state(old) == []  # already split: nothing to do


def test_an_interrupted_array_addition_leaves_the_store_as_it_was(tmp_path, small_store):
    buffer = ReplayBuffer.open(small_store, mode="a")
    buffer._root.attrs["pending_arrays"] = ["half"]  # as a crash mid-add would leave it
    buffer._root["data"].create_array("half", shape=(16, 2), dtype=np.float32, chunks=(4, 2))
    reopened = ReplayBuffer.open(small_store, mode="a")
    assert "half" not in reopened.keys and reopened.check() == []
    reopened.add_arrays({"half": np.ones((16, 2), np.float32)}, privileged_keys=["half"])
    again = ReplayBuffer.open(small_store)
    assert again.privileged_keys == ["half"] and again.read_all("half").sum() == 32

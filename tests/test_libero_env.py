"""LIBERO's five suites from the offline packages, under the official protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ditvla.envs.libero_env import (
    SUITE_STEPS,
    LiberoEnv,
    load_init_states,
    prepare_libero,
    task_set,
)


def test_suites_and_task_names():
    assert task_set("spatial") == [f"libero_spatial/{i}" for i in range(10)]
    assert len(task_set("90")) == 90
    assert task_set("goal/3,libero_10/9") == ["libero_goal/3", "libero_10/9"]
    with pytest.raises(ValueError, match="unknown LIBERO suite 'kitchen'; valid: spatial, object"):
        task_set("kitchen")
    with pytest.raises(ValueError, match=r"libero_goal has tasks 0\.\.9"):
        task_set("goal/10")


@pytest.mark.parametrize("suite", list(SUITE_STEPS))
def test_a_task_of_each_suite_runs_from_its_init_states(suite):
    env = LiberoEnv(f"{suite}/0", cameras=("agentview", "eye_in_hand"), image_size=32)
    try:
        assert env.init_states.shape[0] == 50 and env.max_episode_steps == SUITE_STEPS[suite]
        obs, _ = env.reset(seed=100_001)  # init state 1
        assert obs["state"].shape == (8,) and obs["images"]["agentview"].shape == (32, 32, 3)
        assert obs["instruction"] == env.instruction and len(env.instruction) > 10
        # The init state was set (then the 10 no-op steps ran): the same seed restarts it.
        start = env._env.get_sim_state().copy()
        env.reset(seed=100_001)
        np.testing.assert_allclose(env._env.get_sim_state(), start, atol=1e-6)
        env.reset(seed=100_002)
        assert not np.allclose(env._env.get_sim_state(), start, atol=1e-6)
        action = np.zeros(7, np.float32)
        action[2] = 1.0  # up
        after, _, success, truncated, _ = env.step(action, render=False)
        assert after["state"][2] > obs["state"][2] and not success and not truncated
    finally:
        env.close()


def test_check_success_reads_the_goal_state():
    """libero_goal/0 is "open the middle drawer": open it in the simulator, and it succeeded."""
    env = LiberoEnv("libero_goal/0", cameras=())
    try:
        env.reset(seed=0)
        assert env.instruction == "open the middle drawer of the cabinet"
        assert not env.success()
        sim = env._env.sim
        sim.data.set_joint_qpos("wooden_cabinet_1_middle_level", -0.16)
        sim.forward()
        assert env.success()
        _, _, success, _, _ = env.step(np.zeros(7, np.float32), render=False)
        assert success
    finally:
        env.close()


def test_init_states_load_without_unpickling_code(tmp_path):
    import pickle

    prepare_libero()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "evil.init"
    bad.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError):
        load_init_states(bad)


def test_the_evaluator_runs_libero_episodes(tmp_path):
    from ditvla.envs.baselines import RandomPolicy
    from ditvla.envs.evaluate import evaluate

    report = evaluate(
        RandomPolicy(action_dim=7),
        "libero:goal/0",
        episodes_per_task=2,
        workers=2,
        max_steps=5,
        out=tmp_path,
        videos_per_task=1,
        progress=False,
    )
    assert [
        (e.seed, e.steps, e.success, e.error) for e in sorted(report.episodes, key=lambda e: e.seed)
    ] == [
        (100_000, 5, False, None),
        (100_001, 5, False, None),
    ]
    assert (tmp_path / "videos" / "libero_goal_0_seed100000.mp4").stat().st_size > 1000


def test_our_config_follows_this_install_and_a_users_own_is_kept(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
    ours = tmp_path / ".cache" / "ditvla" / "libero" / "config.yaml"
    ours.parent.mkdir(parents=True)
    ours.write_text(yaml.safe_dump({"bddl_files": "/another/venv/bddl_files"}))  # stale
    prepare_libero()
    bddl = yaml.safe_load(ours.read_text())["bddl_files"]
    assert bddl != "/another/venv/bddl_files" and (Path(bddl) / "libero_goal").is_dir()

    users = tmp_path / "mine"
    users.mkdir()
    (users / "config.yaml").write_text(yaml.safe_dump({"bddl_files": "/my/bddl", "datasets": "/d"}))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(users))
    prepare_libero()
    assert yaml.safe_load((users / "config.yaml").read_text())["bddl_files"] == "/my/bddl"


def test_collect_refuses_libero_before_writing_anything(tmp_path):
    from ditvla.envs.collect import collect_demonstrations

    with pytest.raises(ValueError, match="LIBERO has no scripted experts"):
        collect_demonstrations(
            "libero:goal/0", tmp_path / "x.zarr", episodes_per_task=1, progress=False
        )
    assert not (tmp_path / "x.zarr").exists()

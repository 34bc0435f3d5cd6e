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
    configs = tmp_path / ".cache" / "ditvla" / "libero"
    another = configs / "another_venv" / "config.yaml"  # another environment's, in use
    another.parent.mkdir(parents=True)
    another.write_text(yaml.safe_dump({"bddl_files": "/another/venv/bddl_files"}))
    ours = prepare_libero() / "config.yaml"
    assert ours.parent.parent == configs and ours != another
    assert yaml.safe_load(another.read_text()) == {"bddl_files": "/another/venv/bddl_files"}
    ours.write_text(yaml.safe_dump({"bddl_files": "/a/stale/install/bddl_files"}))
    monkeypatch.delenv("LIBERO_CONFIG_PATH")  # (prepare_libero set it to ours)
    assert prepare_libero() / "config.yaml" == ours  # the same folder for this environment
    bddl = yaml.safe_load(ours.read_text())["bddl_files"]
    assert bddl != "/a/stale/install/bddl_files" and (Path(bddl) / "libero_goal").is_dir()

    users = tmp_path / "mine"
    users.mkdir()
    (users / "config.yaml").write_text(yaml.safe_dump({"bddl_files": "/my/bddl", "datasets": "/d"}))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(users))
    prepare_libero()
    assert yaml.safe_load((users / "config.yaml").read_text())["bddl_files"] == "/my/bddl"


def test_experts_grasp_pull_and_turn_from_the_official_init_states(tmp_path):
    """One official episode each: a bottle into the basket, a bowl by its rim onto the
    plate, the middle drawer pulled open with the hand pitched, the stove's knob pushed
    round, a bowl dragged out from under the top drawer, the drawer opened and the bowl
    put in it."""
    from ditvla.envs.baselines import ExpertPolicy
    from ditvla.envs.evaluate import evaluate

    report = evaluate(
        ExpertPolicy(),
        "libero:object/4,spatial/0,goal/0,goal/7,goal/3",
        episodes_per_task=1,
        workers=2,
        progress=False,
    )
    outcome = {e.task: (e.success, e.error) for e in report.episodes}
    assert outcome == {
        task: (True, None)
        for task in (
            "libero_object/4",
            "libero_spatial/0",
            "libero_goal/0",
            "libero_goal/7",
            "libero_goal/3",
        )
    }


def test_a_bowl_in_the_open_drawer_is_grasped_within_reach_and_carried_over_the_cabinet():
    """libero_spatial/4 takes a bowl from the open top drawer to the plate beyond the
    cabinet. In init state 13 the rim point with the most room lies beyond the arm's
    reach, and in init state 5 the carry at its usual height knocked the bowl against
    the cabinet on the way (both failed before the expert chose the point nearest the
    robot and raised the carry to clear the way)."""
    env = LiberoEnv("libero_spatial/4", cameras=())
    try:
        for init_state in (13, 5):
            env.reset(seed=100_000 + init_state)
            for _ in range(env.max_episode_steps):
                _, _, success, _, _ = env.step(env.expert_action(), render=False)
                if success:
                    break
            assert success, init_state
    finally:
        env.close()


def test_collect_draws_new_placements_and_writes_what_the_converter_writes(tmp_path):
    """Two suites in one store: the converter's keys, cameras and 8-D state; object states
    of other widths padded with a mask; starts drawn from the BDDL regions by seed (the
    same seed, the same start), none of them an evaluation init state."""
    from ditvla.datasets.convert_libero import convert_libero_hdf5, zarr_to_libero_hdf5
    from ditvla.datasets.replay_buffer import ReplayBuffer
    from ditvla.envs.collect import collect_demonstrations

    report = collect_demonstrations(
        "libero:object/0,spatial/0",
        tmp_path / "demos.zarr",
        episodes_per_task=1,
        image_size=32,
        detour_steps=10,
        workers=1,
        progress=False,
    )
    assert report.kept == {"libero_object/0": 1, "libero_spatial/0": 1}
    buffer = ReplayBuffer.open(tmp_path / "demos.zarr")
    assert buffer.cameras == ["agentview", "eye_in_hand"]
    assert buffer.state_keys == ["ee_pos", "ee_ori", "gripper_states"]
    assert {"joint_states", "objects", "objects_valid", "action"} <= set(buffer.keys)
    assert buffer.shape("action") == (7,) and buffer.episode_seed.tolist() == [0, 0]
    widths = [buffer.get_episode(e)["objects_valid"][0].sum() for e in range(2)]
    assert widths[0] != widths[1] and buffer.shape("objects") == (max(widths),)
    # LIBERO's own file layout and back: what the converter reads comes back unchanged.
    zarr_to_libero_hdf5(tmp_path / "demos.zarr", tmp_path / "h5", progress=False)
    again = convert_libero_hdf5([tmp_path / "h5"], tmp_path / "again.zarr", progress=False)
    assert [again.episode_task(e).instruction for e in range(2)] == [
        buffer.episode_task(e).instruction for e in range(2)
    ]
    for episode in range(2):
        converted, collected = again.get_episode(episode), buffer.get_episode(episode)
        for key in converted:
            np.testing.assert_array_equal(converted[key], collected[key])

    env = LiberoEnv("libero_object/0", cameras=())
    try:
        sim, domain = env._env.sim, env._env.env
        columns = []
        for name in domain.objects_dict:
            start, _ = sim.model.get_joint_qpos_addr(domain.objects_dict[name].joints[-1])
            columns += [start, start + 1]  # x, y (settling moves z)
        starts = {}
        for seed in (0, 0, 1):
            env.reset(seed=seed)
            placed = sim.data.qpos[columns].copy()
            assert not starts or seed not in starts or np.allclose(starts[seed], placed)
            starts[seed] = placed
        assert not np.allclose(starts[0], starts[1], atol=1e-4)
        stored = env.init_states[:, 1:][:, columns]
        env.reset(seed=100_003)  # an evaluation seed: init state 3, after settling
        settled = sim.data.qpos[columns]
        for placed in starts.values():
            assert np.abs(stored - placed).max(axis=1).min() > 1e-4
        assert np.abs(stored[3] - settled).max() < 0.005
    finally:
        env.close()


def test_drawn_starts_put_objects_on_the_fixtures_their_bddl_names():
    """In libero_spatial/7 one bowl starts on the stove and the other on the cabinet.
    Every drawn start (each reset, not only the first: the fixtures stay placed between
    resets) satisfies the task's initial predicates, as LIBERO itself evaluates them."""
    env = LiberoEnv("libero_spatial/7", cameras=())
    try:
        domain = env._env.env
        initial = [  # on a fixture or object (LIBERO's table regions read as unmet even
            # in the stored init states)
            p
            for p in domain.parsed_problem["initial_state"]
            if p[0] == "on" and not p[2].startswith("main_table")
        ]
        assert ["on", "akita_black_bowl_1", "flat_stove_1_cook_region"] in initial
        for seed in (0, 1, 2):
            env.reset(seed=seed)
            unmet = [p for p in initial if not domain._eval_predicate(p)]
            assert not unmet, (seed, unmet)
    finally:
        env.close()


def test_a_goal_without_an_expert_is_refused_before_writing_anything(tmp_path):
    from ditvla.envs.collect import collect_demonstrations

    with pytest.raises(ValueError, match=r"no scripted expert for the LIBERO goal \(close"):
        collect_demonstrations(
            "libero:90/0", tmp_path / "x.zarr", episodes_per_task=1, progress=False
        )
    assert not (tmp_path / "x.zarr").exists()


def test_a_drawer_the_goal_opens_before_filling_it_is_opened_once():
    """LIBERO-90's 90/8 asks for the top drawer open and the bowl in it: one opening."""
    from ditvla.envs.libero_experts import PullDrawer

    env = LiberoEnv("libero_90/8", cameras=())
    try:
        env.reset(seed=100_000)
        env.expert_action()
        goal = env._env.env.parsed_problem["goal_state"]
        assert [p[0].lower() for p in goal] == ["open", "in"]
        openings = [part for part, _ in env._expert.steps if isinstance(part, PullDrawer)]
        assert len(openings) == 1
    finally:
        env.close()

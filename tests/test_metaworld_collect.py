"""Meta-World behind our schema, and scripted demonstrations into a real zarr store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.envs.collect import collect_demonstrations, detour, end_with_parent
from ditvla.envs.metaworld_env import MetaWorldEnv, task_set
from ditvla.envs.registry import parse_env
from ditvla.errors import ConfigError


def test_task_sets_and_unknown_names():
    assert len(task_set("MT10")) == 10 and len(task_set("MT50")) == 50
    assert task_set("reach-v3,door-open-v3") == ["reach-v3", "door-open-v3"]
    with pytest.raises(ValueError, match="unknown metaworld task reach-v9; valid: MT10, MT50"):
        task_set("reach-v9")
    with pytest.raises(ValueError, match="unknown environment"):
        parse_env("isaac:Lift")


def test_observation_schema_and_seeded_episodes():
    env = MetaWorldEnv("drawer-close-v3", cameras=("corner", "topview"), image_size=32)
    try:
        obs, _ = env.reset(seed=7)
        assert set(obs) == {"images", "state", "instruction"}
        assert obs["instruction"] == "close the drawer"
        # the state is what a real robot has: hand and gripper, now and a frame earlier
        assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
        parts = env.state_parts()
        assert {k: v.shape for k, v in parts.items()} == {
            "proprio": (8,),
            "objects": (28,),
            "goal": (3,),
            "state": (39,),
            "hand": (4,),
        }
        np.testing.assert_array_equal(obs["state"], parts["proprio"])
        np.testing.assert_array_equal(parts["hand"], parts["proprio"][:4])
        np.testing.assert_array_equal(parts["proprio"][:3], parts["state"][:3])
        np.testing.assert_array_equal(parts["goal"], parts["state"][36:])
        for cam in ("corner", "topview"):
            assert obs["images"][cam].shape == (32, 32, 3) and obs["images"][cam].dtype == np.uint8
        assert obs["images"]["corner"].std() > 10  # a rendered scene, not a blank frame
        again, _ = env.reset(seed=7)
        np.testing.assert_array_equal(obs["state"], again["state"])
        env.reset(seed=8)
        assert not np.array_equal(parts["goal"], env.state_parts()["goal"])  # another goal
        with pytest.raises(ValueError, match="shape"):
            env.step(np.zeros(3))
        with pytest.raises(ValueError, match="NaN"):
            env.step(np.array([0, np.nan, 0, 0]))
    finally:
        env.close()


def test_expert_demonstrations_into_zarr(tmp_path):
    out = tmp_path / "demos.zarr"
    report = collect_demonstrations(
        "metaworld:reach-v3,drawer-close-v3",
        out,
        episodes_per_task=2,
        image_size=32,
        seed_start=10,
        progress=False,
    )
    assert report.kept == {"reach-v3": 2, "drawer-close-v3": 2}
    buffer = ReplayBuffer.open(out)
    assert buffer.n_episodes == 4
    assert buffer.cameras == ["corner"]
    assert buffer.shape("corner") == (32, 32, 3) and buffer.shape("action") == (4,)
    assert buffer.episode_seed.tolist() == [10, 11, 10, 11]
    assert [buffer.episode_task(i).name for i in range(4)] == ["reach-v3"] * 2 + [
        "drawer-close-v3"
    ] * 2
    assert buffer.fps == pytest.approx(80.0)
    # proprioception and privileged state are recorded apart; the default state is proprio
    assert buffer.state_keys == ["proprio"] and buffer.privileged_keys == ["objects", "goal"]
    assert buffer.shape("proprio") == (8,) and buffer.shape("goal") == (3,)
    assert buffer.resolve_state("full") == ["proprio", "objects", "goal"]
    # Replaying a stored episode's actions from its recorded seed reproduces its states.
    episode = buffer.get_episode(2)
    episode["state"] = episode["proprio"]
    env = MetaWorldEnv("drawer-close-v3", cameras=(), image_size=32)
    try:
        obs, _ = env.reset(seed=int(buffer.episode_seed[2]))
        np.testing.assert_allclose(obs["state"], episode["state"][0], atol=1e-6)
        for action in episode["action"][:-1]:
            obs, *_ = env.step(action, render=False)
        np.testing.assert_allclose(obs["state"], episode["state"][-1], atol=1e-4)
        obs, _, success, _, _ = env.step(episode["action"][-1], render=False)
        assert success
    finally:
        env.close()


def test_parallel_collection_writes_the_same_store(tmp_path):
    stores = {}
    for workers in (1, 2):
        out = tmp_path / f"demos_{workers}.zarr"
        report = collect_demonstrations(
            "metaworld:reach-v3,door-open-v3",
            out,
            episodes_per_task=3,
            image_size=16,
            workers=workers,
            progress=False,
        )
        assert report.kept == {"reach-v3": 3, "door-open-v3": 3}
        stores[workers] = (ReplayBuffer.open(out), report)
    (serial, serial_report), (parallel, parallel_report) = stores[1], stores[2]
    assert parallel_report.attempts == serial_report.attempts
    assert parallel.episode_seed.tolist() == serial.episode_seed.tolist()
    for i in range(serial.n_episodes):
        a, b = serial.get_episode(i), parallel.get_episode(i)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_collection_worker_keeps_only_the_simulator_of_its_task(monkeypatch):
    """A worker closes a task's simulator when the next task begins (one LIBERO scene
    holds about a gigabyte: kept for every task, seven grew each worker to 7.9 GB)."""
    from ditvla.envs import collect

    def episode(task):  # no cameras, 16 px, no detour or push, no randomisation, seed 0
        options = collect.CollectConfig().episode_options
        return collect._expert_episode_in_worker("metaworld", task, (), 16, options, "", 0)

    monkeypatch.setattr(collect, "_worker_envs", {})
    arrays, _ = episode("reach-v3")
    (first,) = collect._worker_envs.values()
    closed = []
    monkeypatch.setattr(first, "close", lambda: closed.append(first))
    episode("door-open-v3")
    assert closed == [first] and [key[1] for key in collect._worker_envs] == ["door-open-v3"]
    assert len(arrays["action"]) > 0
    for env in collect._worker_envs.values():
        env.close()


def test_detours_drift_the_hand_and_record_the_experts_recovery(tmp_path):
    seed = next(s for s in range(100) if detour(s, 20)[0] >= 10)
    steps, push = detour(seed, 20)
    out = tmp_path / "detours.zarr"
    report = collect_demonstrations(
        "metaworld:reach-v3",
        out,
        episodes_per_task=2,
        cameras=(),
        seed_start=seed,
        detour_steps=20,
        workers=2,
        progress=False,
    )
    assert report.kept == {"reach-v3": 2}  # the expert recovers and succeeds
    buffer = ReplayBuffer.open(out)
    assert "detours of up to 20 steps" in buffer.attrs["source"]
    episode = buffer.get_episode(0)
    hand, actions, goal = episode["proprio"][:, :3], episode["action"], episode["goal"]

    def cosine(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    # the hand went where the push sent it, while every recorded action heads for the goal
    assert cosine(hand[steps] - hand[0], push) > 0.9
    for t in range(steps):
        assert cosine(actions[t, :3], goal[t] - hand[t]) > 0.5
    # the same seed without a detour: the same first label, another path
    plain = tmp_path / "plain.zarr"
    collect_demonstrations(
        "metaworld:reach-v3",
        plain,
        episodes_per_task=1,
        cameras=(),
        seed_start=seed,
        workers=1,
        progress=False,
    )
    straight = ReplayBuffer.open(plain).get_episode(0)
    np.testing.assert_allclose(straight["action"][0], actions[0])
    assert np.linalg.norm(straight["proprio"][steps, :3] - hand[steps]) > 0.02


def test_multimodal_experts_take_either_way_around_the_wall(tmp_path):
    out = tmp_path / "routes.zarr"
    report = collect_demonstrations(
        "metaworld:reach-wall-v3",
        out,
        episodes_per_task=6,
        cameras=(),
        multimodal=True,
        workers=2,
        progress=False,
    )
    assert report.kept == {"reach-wall-v3": 6}  # both ways succeed
    buffer = ReplayBuffer.open(out)
    assert "multimodal" in buffer.attrs["source"]
    ways = []
    for i in range(buffer.n_episodes):
        hand = buffer.get_episode(i)["proprio"][:, :3]
        left, right = hand[:, 0].min() < -0.1, hand[:, 0].max() > 0.3  # past the wall's ends
        assert left != right
        ways.append("left" if left else "right")
    assert set(ways) == {"left", "right"}  # one start, two ways: the same frame, two chunks
    starts = np.stack([buffer.get_episode(i)["proprio"][0, :3] for i in range(6)])
    assert np.ptp(starts, axis=0).max() < 0.02


def test_a_collection_resumes_into_its_store_and_refuses_another(tmp_path):
    """--resume keeps the episodes a store holds and goes on from each task's next seed:
    the same (task, seed) episodes as one uninterrupted run."""
    common = dict(image_size=16, workers=1, progress=False)
    env = "metaworld:reach-v3,door-open-v3"
    collect_demonstrations(env, tmp_path / "whole.zarr", episodes_per_task=3, **common)
    collect_demonstrations(env, tmp_path / "parts.zarr", episodes_per_task=2, **common)
    report = collect_demonstrations(
        env, tmp_path / "parts.zarr", episodes_per_task=3, resume=True, **common
    )
    assert report.kept == {"reach-v3": 3, "door-open-v3": 3}
    whole, parts = (
        ReplayBuffer.open(tmp_path / "whole.zarr"),
        ReplayBuffer.open(tmp_path / "parts.zarr"),
    )

    def by_episode(buffer):
        return {
            (buffer.episode_task(e).name, int(buffer.episode_seed[e])): buffer.get_episode(e)
            for e in range(buffer.n_episodes)
        }

    expected, resumed = by_episode(whole), by_episode(parts)
    assert resumed.keys() == expected.keys() and len(resumed) == 6
    for key, episode in expected.items():
        for name, values in episode.items():
            np.testing.assert_array_equal(resumed[key][name], values, err_msg=f"{key} {name}")
    again = collect_demonstrations(
        env, tmp_path / "parts.zarr", episodes_per_task=3, resume=True, **common
    )
    assert again.kept == report.kept and ReplayBuffer.open(tmp_path / "parts.zarr").n_episodes == 6
    with pytest.raises(ValueError, match=r"another collection; cameras: the store's \['corner'\]"):
        collect_demonstrations(
            env,
            tmp_path / "parts.zarr",
            episodes_per_task=3,
            resume=True,
            cameras=("behindGripper",),
            image_size=16,
            workers=1,
            progress=False,
        )
    with pytest.raises(ValueError, match="already exists; --resume finishes"):
        collect_demonstrations(env, tmp_path / "parts.zarr", episodes_per_task=3, **common)


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.exists():  # Linux: a zombie nobody reaped has ended too
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_collection_worker_ends_with_its_parent(tmp_path):
    """The collection's simulator workers start with end_with_parent: one whose parent is
    killed (SIGKILL, nothing cleaned up) exits on its own within seconds."""
    ready = tmp_path / "watching"
    worker = (
        f"from {end_with_parent.__module__} import end_with_parent; import time; "
        f"end_with_parent(poll_s=0.1); open({str(ready)!r}, 'w').close(); time.sleep(300)"
    )
    parent_code = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {worker!r}]); "
        "print(child.pid, flush=True); time.sleep(300)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 120.0  # the child imports the module, then watches
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists() and _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_pushes_knock_the_hand_off_its_path_in_mid_task_and_record_the_way_back(tmp_path):
    """``push_rate``: DART-style pushes during the episode; every recorded action is the
    expert's, so the store shows the hand being pushed and the expert bringing it back."""

    def collect(name, **options):
        out = tmp_path / name
        report = collect_demonstrations(
            "metaworld:reach-v3", out, episodes_per_task=2, cameras=(), seed_start=3,
            workers=1, progress=False, **options,
        )  # fmt: skip
        return report, ReplayBuffer.open(out)

    report, pushed = collect("pushed.zarr", push_rate=0.1)
    assert report.kept == {"reach-v3": 2}  # the expert recovers from every push
    assert "pushes at a rate of 0.1 per step" in pushed.attrs["source"]
    _, plain = collect("plain.zarr")

    def against_the_record(episode):
        """Steps, away from the goal, where the hand moved against the recorded action."""
        hand, actions, goal = episode["proprio"][:, :3], episode["action"], episode["goal"]
        moved = hand[1:] - hand[:-1]
        far = np.linalg.norm(goal[:-1] - hand[:-1], axis=1) > 0.03
        along = np.einsum("td,td->t", moved, actions[:-1, :3])
        return int(np.sum(far & (along < 0) & (np.linalg.norm(moved, axis=1) > 0.002)))

    for i in range(2):
        episode = pushed.get_episode(i)
        hand, actions, goal = episode["proprio"][:, :3], episode["action"], episode["goal"]
        assert against_the_record(episode) > 0 and against_the_record(plain.get_episode(i)) == 0
        far = np.linalg.norm(goal - hand, axis=1) > 0.03
        heading = np.einsum("td,td->t", actions[:, :3], goal - hand)
        assert np.all(heading[far] > 0)  # every recorded action heads for the goal
    with pytest.raises(ConfigError, match=r"push_rate must be in \[0, 1\), got 1.5"):
        collect("bad.zarr", push_rate=1.5)

"""A Meta-World task as the robot (``ditvla robot --sim metaworld:<task>``).

The simulated robot behaves like a real one where timing matters: physics advances one
control step per tick in the control loop (well under a millisecond for metaworld), and its
cameras run in their own process at ``camera_hz``, rendering a snapshot of the robot's
state — frames arrive asynchronously, one rendering time old, as from real cameras, and
rendering (milliseconds per frame on a CPU) never delays a control tick.

This module imports MuJoCo and the simulator environments: the controller imports it only
for ``--sim``, so a machine that drives a real robot needs neither.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time

import mujoco
import numpy as np

from ditvla.deploy.messages import Message
from ditvla.envs.metaworld_env import MetaWorldEnv, upright
from ditvla.envs.registry import parse_env
from ditvla.envs.rendering import fast_scene
from ditvla.errors import ConfigError

CAMERA_NICE = 10
MAX_IMAGE_SIZE = 1024


def _camera_main(conn, task: str, cameras: list[str], size: int) -> None:
    """Camera process: renders the task's cameras for each state snapshot it is sent."""
    os.nice(CAMERA_NICE)  # below the control loop
    model = MetaWorldEnv(task, cameras=()).mujoco_model
    data = mujoco.MjData(model)
    renderer = mujoco.Renderer(model, size, size)
    fast_scene(renderer.scene, skybox=False)
    try:
        while (snapshot := conn.recv()) is not None:
            data.qpos[:], data.qvel[:], data.mocap_pos[:], data.mocap_quat[:] = snapshot
            mujoco.mj_forward(model, data)
            frames = {}
            for cam in cameras:
                renderer.update_scene(data, camera=cam)
                frames[cam] = upright(cam, renderer.render())
            conn.send(frames)
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        renderer.close()


class _Cameras:
    """The simulated cameras: a process of their own (rendering holds the GIL for
    milliseconds at a time, which would delay control ticks if it ran in a thread), fed
    state snapshots at ``hz`` by the control loop, frames picked up without waiting."""

    def __init__(self, task: str, cameras: list[str], size: int, hz: float):
        self.period = 1.0 / hz
        self._conn, child = mp.get_context("spawn").Pipe()
        self._process = mp.get_context("spawn").Process(
            target=_camera_main, args=(child, task, cameras, size), daemon=True, name="sim-cameras"
        )
        self._process.start()
        self._pending = False
        self._next_capture = 0.0

    def capture(self, data: mujoco.MjData, *, wait: bool = False) -> dict | None:
        """Send a snapshot when one is due; return frames that are ready (wait: block)."""
        frames = None
        if self._pending and (wait or self._conn.poll()):
            frames, self._pending = self._recv(), False
        now = time.monotonic()
        if not self._pending and (wait or now >= self._next_capture):
            snapshot = (data.qpos, data.qvel, data.mocap_pos, data.mocap_quat)
            self._conn.send(snapshot)
            self._pending, self._next_capture = True, now + self.period
            if wait:
                frames, self._pending = self._recv(), False
        return frames

    def _recv(self) -> dict:
        if not self._conn.poll(60):
            raise RuntimeError("the sim camera process stopped answering")
        return self._conn.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()


class SimRobot:
    """A metaworld task as the robot: ``metaworld:<task>``."""

    def __init__(
        self,
        spec: str,
        *,
        cameras: list[str],
        image_size: int,
        camera_hz: float = 10.0,
        max_episode_steps: int | None = None,
        state_keys: list[str] | None = None,
    ):
        suite, tasks = parse_env(spec)
        if suite.name != "metaworld":
            raise ConfigError(f"--sim drives metaworld tasks, got {spec!r}")
        if len(tasks) != 1:
            raise ConfigError(f"--sim drives one task, got {len(tasks)} from {spec!r}")
        self.task = tasks[0]
        # the env renders nothing itself: the camera process does
        self.env = MetaWorldEnv(
            self.task, cameras=(), max_episode_steps=max_episode_steps, state_keys=state_keys
        )
        self.instruction = self.env.instruction
        self.action_dim = self.env.action_space.shape[0]
        self.action_bounds = (self.env.action_space.low, self.env.action_space.high)
        model = self.env.mujoco_model
        known = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        unknown = [cam for cam in cameras if cam not in known]
        if unknown or not 0 < image_size <= MAX_IMAGE_SIZE:
            self.env.close()
            raise ConfigError(
                f"the policy asks for camera(s) {unknown} at {image_size} px; {spec} has "
                f"{', '.join(known)}, up to {MAX_IMAGE_SIZE} px"
            )
        self.cameras = list(cameras)
        self.success = False
        self.truncated = False
        self._gripper = 0.0
        self._state: np.ndarray | None = None
        self._frames: dict[str, np.ndarray] | None = None
        self._cameras = _Cameras(self.task, self.cameras, image_size, camera_hz)

    def reset(self, seed: int) -> None:
        obs, _ = self.env.reset(seed=seed)
        self._state, self.success, self.truncated = obs["state"], False, False
        self._gripper = 0.0
        self._frames = self._cameras.capture(self.env.mujoco_data, wait=True)  # first frames

    def observe(self) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        frames = self._frames or self._cameras.capture(self.env.mujoco_data)
        self._frames = None
        return self._state, frames

    def send_action(self, action: np.ndarray) -> None:
        if self.truncated:  # the episode is over: the simulated world stands still
            return
        self._gripper = float(action[-1])
        obs, _, success, truncated, _ = self.env.step(action, render=False)
        self._state = obs["state"]
        self.success |= success
        self.truncated = truncated

    def hold(self) -> None:
        """No arm motion (zero end-effector delta), gripper as last commanded."""
        action = np.zeros(self.env.action_space.shape, np.float32)
        action[-1] = self._gripper
        self.send_action(action)

    def close(self) -> None:
        self._cameras.close()
        self.env.close()


def sim_robot_for(
    sim: str, spec: Message, *, served_at: str, camera_hz: float, max_episode_steps: int
) -> SimRobot:
    """The simulated robot a policy's ``spec`` asks for: its cameras at its image size, the
    state parts it reads; ValueError when ``sim`` cannot give them (``served_at``: the
    server's address, for the message)."""
    state_keys = spec.meta.get("state_keys", ["state"]) if spec.meta["state_dim"] else None
    try:
        parse_env(sim)[0].env_class.check_state_keys(state_keys or ())
    except ValueError as exc:
        raise ConfigError(
            f"the policy served at {served_at} reads state {' + '.join(state_keys)}: {exc}"
        ) from None
    robot = SimRobot(
        sim,
        cameras=spec.meta["cameras"],
        image_size=spec.meta["image_size"],
        camera_hz=camera_hz,
        max_episode_steps=max_episode_steps,
        state_keys=state_keys,
    )
    state_dim = robot.env.observation_space["state"].shape[0]
    if spec.meta["state_dim"] not in (0, state_dim):
        robot.close()
        raise ConfigError(
            f"the policy reads a {spec.meta['state_dim']}-D state, {sim} gives {state_dim}"
        )
    return robot

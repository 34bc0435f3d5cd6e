"""What the controller drives: a simulator stepped in real time, or a LeRobot robot.

Both give the controller the same four calls: ``observe() -> (state, images or None)``,
``send_action(action)``, ``hold()`` (no motion), ``close()``.

The simulated robot behaves like a real one where timing matters: physics advances one
control step per tick in the control loop (well under a millisecond for metaworld), and its cameras
run in their own process at ``camera_hz``, rendering a snapshot of the robot's state —
frames arrive asynchronously, one rendering time old, as from real cameras, and
rendering (milliseconds per frame on a CPU) never delays a control tick.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import pkgutil
import time
from typing import Any, Protocol

import mujoco
import numpy as np

from ditvla.envs.metaworld_env import MetaWorldEnv, upright
from ditvla.envs.registry import parse_env
from ditvla.envs.rendering import fast_scene

CAMERA_NICE = 10
MAX_IMAGE_SIZE = 1024


class Robot(Protocol):
    instruction: str
    action_dim: int

    def observe(self) -> tuple[np.ndarray, dict[str, np.ndarray] | None]: ...
    def send_action(self, action: np.ndarray) -> None: ...
    def hold(self) -> None: ...
    def close(self) -> None: ...


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
            raise ValueError(f"--sim drives metaworld tasks, got {spec!r}")
        if len(tasks) != 1:
            raise ValueError(f"--sim drives one task, got {len(tasks)} from {spec!r}")
        self.task = tasks[0]
        # the env renders nothing itself: the camera process does
        self.env = MetaWorldEnv(
            self.task, cameras=(), max_episode_steps=max_episode_steps, state_keys=state_keys
        )
        self.instruction = self.env.instruction
        self.action_dim = self.env.action_space.shape[0]
        model = self.env.mujoco_model
        known = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        unknown = [cam for cam in cameras if cam not in known]
        if unknown or not 0 < image_size <= MAX_IMAGE_SIZE:
            self.env.close()
            raise ValueError(
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


class LeRobotRobot:
    """Any LeRobot ``Robot``, driven through its own API (``--robot TYPE key=value ...``).

    The state is the robot's float observation features in their declared order, the
    images its camera features; actions map onto its action features in order. ``hold``
    sends the present positions back as the goal (position-controlled arms).
    Not exercised here: this machine has no robot attached.
    """

    def __init__(self, robot_type: str, options: dict[str, Any], instruction: str):
        import lerobot.robots as robots
        from lerobot.robots import RobotConfig, make_robot_from_config

        for module in pkgutil.iter_modules(robots.__path__):  # registers the config types
            with contextlib.suppress(ImportError):  # a robot whose extras are missing
                importlib.import_module(f"lerobot.robots.{module.name}")
        known = sorted(RobotConfig.get_known_choices())
        if robot_type not in known:
            raise ValueError(f"unknown lerobot robot {robot_type!r}; known: {', '.join(known)}")
        config = RobotConfig.get_choice_class(robot_type)(**options)
        self.robot = make_robot_from_config(config)
        self.robot.connect()
        self.instruction = instruction
        features = self.robot.observation_features
        self.state_keys = [k for k, v in features.items() if v is float]
        self.camera_keys = [k for k, v in features.items() if isinstance(v, tuple)]
        self.action_keys = list(self.robot.action_features)
        self.action_dim = len(self.action_keys)
        self._last: dict[str, Any] = {}

    def observe(self) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        self._last = self.robot.get_observation()
        state = np.asarray([self._last[k] for k in self.state_keys], np.float32)
        return state, {k: np.asarray(self._last[k]) for k in self.camera_keys}

    def send_action(self, action: np.ndarray) -> None:
        self.robot.send_action(dict(zip(self.action_keys, map(float, action), strict=True)))

    def hold(self) -> None:
        if self._last:
            self.robot.send_action({k: float(self._last[k]) for k in self.action_keys})

    def close(self) -> None:
        self.hold()
        self.robot.disconnect()

"""What every ditvla environment shares: the observation schema and the step contract.

Observation: ``{"images": {camera: uint8 (H, W, 3)}, "state": float32 (D,),
"instruction": str}``; action: float32 (A,) in [-1, 1], checked for shape and finiteness
(a bad action raises, it never reaches the simulator). ``reset(seed=s)`` starts the
episode that ``s`` fixes (demonstrations use seeds 0, 1, ...; evaluations start at
``EVAL_SEED_START``, so the two never share an episode);
``reset(options={"skip_images": True})`` and ``step(action, render=False)`` skip the
cameras (their entry is empty). An episode ends
when the task succeeds (``terminated``) or after ``max_episode_steps`` (``truncated``).

A simulator subclass implements ``_reset_simulator(seed)``, ``_step_simulator(action) ->
(reward, success)``, ``state_parts()``, ``render_camera(camera)`` and ``expert_action()``;
for perturbed evaluation (:mod:`ditvla.envs.perturbations`), ``mujoco_model``,
``mujoco_camera(camera)``, ``move_robot_start(rng, level)`` and ``scene_changed()``.
``observation["state"]`` is the parts named by ``state_keys`` (proprioception by default),
concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ditvla.contract import EVAL_SEED_START
from ditvla.errors import ConfigError

__all__ = ["EVAL_SEED_START", "SimulatorEnv"]


class SimulatorEnv(gym.Env):
    """Subclasses name their state parts: ``proprio_keys`` (what a real robot has: joint or
    end-effector pose, gripper; the default state), ``privileged_keys`` (what only the
    simulator knows: object poses, goals), and ``other_state_keys`` (other parts it can
    build — older names a saved policy may read, subsets — each marked privileged or
    not), of which ``recorded_keys`` are stored by ``ditvla collect`` too (beside the
    proprioceptive and privileged parts). ``state_keys`` picks the parts, in order, that
    make up ``observation["state"]``."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"]}
    proprio_keys: ClassVar[tuple[str, ...]] = ()
    privileged_keys: ClassVar[tuple[str, ...]] = ()
    other_state_keys: ClassVar[dict[str, bool]] = {}
    recorded_keys: ClassVar[tuple[str, ...]] = ()  # other parts a collection stores too
    _perturber: Any = None  # the scene perturbation applied at each reset (perturb())

    instruction: str
    fps: float

    @classmethod
    def offered_state_keys(cls) -> tuple[str, ...]:
        return (*cls.proprio_keys, *cls.privileged_keys, *cls.other_state_keys)

    @classmethod
    def reads_privileged_state(cls, state_keys: Sequence[str]) -> bool:
        """Whether a state made of ``state_keys`` holds anything a real robot lacks."""
        return any(
            key in cls.privileged_keys or cls.other_state_keys.get(key, False) for key in state_keys
        )

    @classmethod
    def check_state_keys(cls, state_keys: Sequence[str]) -> None:
        """ValueError naming the parts this environment offers, if it lacks one asked for."""
        missing = [key for key in state_keys if key not in cls.offered_state_keys()]
        if missing:
            raise ConfigError(
                f"{cls.__name__} cannot build the state part(s) {', '.join(missing)}; it offers "
                f"{', '.join(cls.offered_state_keys())} (proprioception: "
                f"{', '.join(cls.proprio_keys)})"
            )

    def _declare(
        self,
        *,
        cameras: Sequence[str],
        image_size: int,
        state_dims: dict[str, int],
        state_keys: Sequence[str] | None,
        action_dim: int,
        max_episode_steps: int,
    ) -> None:
        self.state_keys = tuple(self.proprio_keys if state_keys is None else state_keys)
        self.check_state_keys(self.state_keys)
        self.state_dims = dict(state_dims)  # the width of every state part offered
        state_dim = sum(state_dims[key] for key in self.state_keys)
        self.cameras = tuple(cameras)
        self.image_size = image_size
        self.max_episode_steps = max_episode_steps
        self._steps = 0
        image_space = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(
            {
                "images": spaces.Dict({cam: image_space for cam in self.cameras}),
                "state": spaces.Box(-np.inf, np.inf, (state_dim,), np.float32),
                "instruction": spaces.Text(max_length=256),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (action_dim,), np.float32)

    # ------------------------------------------------------------------ the simulator's part
    def _reset_simulator(self, seed: int) -> None:
        raise NotImplementedError

    def _step_simulator(self, action: np.ndarray) -> tuple[float, bool]:
        raise NotImplementedError

    def state_parts(self) -> dict[str, np.ndarray]:
        """Every state part this environment offers, for the current step."""
        raise NotImplementedError

    def _state(self) -> np.ndarray:
        parts = self.state_parts()
        return np.concatenate([parts[key] for key in self.state_keys]).astype(np.float32)

    def render_camera(self, camera: str) -> np.ndarray:
        """One upright uint8 (H, W, 3) frame of ``camera``."""
        raise NotImplementedError

    def expert_action(self) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------ perturbation
    @property
    def mujoco_model(self) -> Any:
        """The simulation's ``mujoco.MjModel``."""
        raise NotImplementedError

    def mujoco_camera(self, camera: str) -> str:
        """The MuJoCo name of ``camera``."""
        return camera

    def move_layout(self, rng: np.random.Generator, level: str) -> None:
        """Move the scene's objects by the ``layout`` axis's ``level`` (after a reset)."""
        raise NotImplementedError

    def move_robot_start(self, rng: np.random.Generator, level: str) -> None:
        """Move the arm's start by the ``robot`` axis's ``level`` (after a reset)."""
        raise NotImplementedError

    def scene_changed(self) -> None:
        """Recompute what depends on the model or the robot's pose after a perturbation
        (kinematics, and the observation the reset returns)."""
        raise NotImplementedError

    def perturb(self, perturbation: Any) -> None:
        """Apply ``perturbation``'s scene axes (a
        :class:`~ditvla.envs.perturbations.Perturbation`) at every reset from now on,
        drawn from each episode's seed; an empty one removes them."""
        from ditvla.envs.perturbations import ScenePerturber

        if self._perturber is not None:
            self._perturber.restore()
            self.scene_changed()
        self._perturber = ScenePerturber(self, perturbation) if perturbation.scene_axes() else None

    def vary_expert(self, seed: int) -> str:
        """Make the current episode's expert take one of several ways of doing the task,
        chosen by ``seed`` (multimodal demonstrations); returns the way's name."""
        raise ConfigError(
            f"{type(self).__name__}'s scripted experts have one way per task; "
            "multimodal collection (--multimodal) is available for metaworld"
        )

    # ------------------------------------------------------------------ gym API
    def _observation(self, with_images: bool) -> dict[str, Any]:
        images = {cam: self.render_camera(cam) for cam in self.cameras} if with_images else {}
        return {"images": images, "state": self._state(), "instruction": self.instruction}

    def render(self) -> np.ndarray | None:
        return self.render_camera(self.cameras[0]) if self.cameras else None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start the episode that ``seed`` fixes (a random one without a seed)."""
        super().reset(seed=seed)
        seed = int(seed) if seed is not None else int(self.np_random.integers(2**31))
        self._reset_simulator(seed)
        if self._perturber is not None:
            self._perturber.apply(seed)
        self._steps = 0
        with_images = not (options or {}).get("skip_images", False)
        return self._observation(with_images), {"success": False}

    def step(
        self, action: np.ndarray, *, render: bool = True
    ) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """One control step. ``render=False`` skips the cameras (their entry is empty)."""
        action = np.asarray(action, dtype=np.float32)
        expected = self.action_space.shape
        if action.shape != expected:
            raise ValueError(f"action must have shape {expected}, got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action holds NaN or infinite values")
        reward, success = self._step_simulator(np.clip(action, -1.0, 1.0))
        self._steps += 1
        truncated = self._steps >= self.max_episode_steps
        return (
            self._observation(render),
            float(reward),
            success,
            truncated and not success,
            {"success": success},
        )

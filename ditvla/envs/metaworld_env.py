"""Meta-World v3 tasks behind the ditvla observation schema.

Observation: ``{"images": {camera: uint8 (H, W, 3)}, "state": float32 (39,),
"instruction": str}``; action: float32 (4,) in [-1, 1] (end-effector xyz delta and
gripper). The 39-D state is Meta-World's own: hand position and gripper opening, object
poses, the previous frame's copy of those 18 values, and the goal position (shown, as in
the MT benchmarks).

Each episode is fixed by an integer seed: the seed draws the goal and object positions
(Meta-World's own sampling, through the env's seeded generator), so two runs with one
seed see the same episode, and seeds from disjoint ranges give disjoint episodes
(demonstrations on 0..N-1, evaluation from 100000 up).

Rendering uses the fast settings of :mod:`ditvla.envs.rendering` (no shadows,
multisampling, reflections or skybox). The corner cameras are mounted
upside down in Meta-World's model; their frames are turned upright here.
"""

from __future__ import annotations

from collections.abc import Sequence

import mujoco
import numpy as np

from ditvla.envs.rendering import fast_model, fast_scene
from ditvla.envs.schema import SimulatorEnv

# Plain-language instructions for the tasks users meet first; the rest are derived from
# the task name ("peg-unplug-side-v3" -> "peg unplug side").
INSTRUCTIONS = {
    "reach-v3": "reach the red goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
MT10 = tuple(INSTRUCTIONS)
UPSIDE_DOWN_CAMERAS = ("corner", "corner2", "corner3", "corner4")


def upright(camera: str, frame: np.ndarray) -> np.ndarray:
    """A frame of ``camera`` turned upright (the corner cameras are mounted upside down)."""
    if camera in UPSIDE_DOWN_CAMERAS:
        frame = frame[::-1, ::-1]
    return np.ascontiguousarray(frame)


STATE_DIM = 39
ACTION_DIM = 4
ACTION_SPACE = "metaworld: end-effector xyz delta + gripper effort, each in [-1, 1]"
DEFAULT_CAMERAS = ("corner",)


def all_tasks() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(ALL_V3_ENVIRONMENTS)


def instruction_for(task: str) -> str:
    return INSTRUCTIONS.get(task, task.removesuffix("-v3").replace("-", " "))


def task_set(name: str) -> list[str]:
    """Task names of a set ("MT10", "MT50") or of one task / a comma-separated list."""
    if name == "MT10":
        return list(MT10)
    if name == "MT50":
        return all_tasks()
    tasks = [t.strip() for t in name.split(",") if t.strip()]
    known = set(all_tasks())
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ValueError(
            f"unknown metaworld task {', '.join(unknown) or repr(name)}; valid: MT10, MT50, "
            + ", ".join(sorted(known))
        )
    return tasks


class MetaWorldEnv(SimulatorEnv):
    """One Meta-World v3 task with camera images, its state and an instruction.

    Args:
        task: e.g. "door-open-v3".
        cameras: Meta-World camera names to render (e.g. "corner", "corner2", "topview",
            "gripperPOV"); empty for state-only episodes (no rendering cost).
        image_size: square image side in pixels.
        max_episode_steps: truncation limit (Meta-World's own 500 by default).
    """

    def __init__(
        self,
        task: str,
        *,
        cameras: Sequence[str] = DEFAULT_CAMERAS,
        image_size: int = 64,
        max_episode_steps: int | None = None,
    ):
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML1_ARGS_KWARGS

        task_set(task)  # validates the name
        self.task = task
        self.instruction = instruction_for(task)
        env = ALL_V3_ENVIRONMENTS[task](
            render_mode="rgb_array" if cameras else None,
            camera_name=cameras[0] if cameras else None,
            width=image_size,
            height=image_size,
        )
        # What metaworld.MT1 does to set up a task, with the goal left visible in the state.
        kwargs = dict(ML1_ARGS_KWARGS[task]["kwargs"])
        kwargs.pop("task_id", None)
        env._set_task_called = True
        env._partially_observable = False
        if "sawyer_observation_space" in env.__dict__:  # cached with the goal hidden
            del env.sawyer_observation_space
        env._set_task_inner(**kwargs)
        fast_model(env.model)
        self._env = env
        self._scene_flags_set = False
        self.fps = 1.0 / env.dt
        self._declare(
            cameras=cameras,
            image_size=image_size,
            state_dim=STATE_DIM,
            action_dim=ACTION_DIM,
            max_episode_steps=max_episode_steps or env.max_path_length,
        )
        env.max_path_length = max(env.max_path_length, self.max_episode_steps)  # its own limit
        self._raw_obs: np.ndarray | None = None

    @property
    def mujoco_model(self) -> mujoco.MjModel:
        return self._env.model

    @property
    def mujoco_data(self) -> mujoco.MjData:
        return self._env.data

    # ------------------------------------------------------------------ rendering
    def render_camera(self, camera: str) -> np.ndarray:
        """One upright uint8 (H, W, 3) frame of ``camera``."""
        renderer = self._env.mujoco_renderer
        renderer.camera_id = mujoco.mj_name2id(self._env.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if not self._scene_flags_set:
            fast_scene(renderer._get_viewer("rgb_array").scn, skybox=False)
            self._scene_flags_set = True
        return upright(camera, renderer.render("rgb_array"))

    # ------------------------------------------------------------------ simulator
    def _reset_simulator(self, seed: int) -> None:
        env = self._env
        env.seed(seed)  # draws the goal and object positions
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        self._raw_obs, _ = env.reset()

    def _step_simulator(self, action: np.ndarray) -> tuple[float, bool]:
        self._raw_obs, reward, _, _, info = self._env.step(action)
        return reward, bool(info.get("success", 0.0))

    def _state(self) -> np.ndarray:
        return self._raw_obs.astype(np.float32)

    def expert_action(self) -> np.ndarray:
        """Meta-World's scripted expert's action for the current state."""
        if not hasattr(self, "_expert"):
            from metaworld.policies import ENV_POLICY_MAP

            self._expert = ENV_POLICY_MAP[self.task]()
        return np.clip(self._expert.get_action(self._raw_obs), -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        self._env.close()


ENV_CLASS = MetaWorldEnv

"""robosuite 1.5 Panda tasks behind the ditvla observation schema, with scripted experts.

Tasks: Lift, Stack, PickPlaceCan, NutAssemblySquare (Panda arm, robosuite's default
operational-space controller in delta mode). Observation: ``{"images": {camera: uint8
(H, W, 3)}, "state": float32 (9,), "instruction": str}``; action: float32 (7,) in
[-1, 1] — end-effector position delta (1 = 5 cm), axis-angle rotation delta (1 = 0.5 rad)
and the gripper (-1 open, +1 closed). The state is the robot's own proprioception, as in
robomimic's image policies: end-effector position (3), quaternion (4) and the two finger
joints (2). Object poses are not in the state; the scripted experts read them from the
simulator (privileged information).

Each episode is fixed by an integer seed: robosuite's placement samplers draw from
NumPy's global generator, which is seeded for the reset and restored afterwards.

Rendering: cameras are rendered only when asked, with the fast settings (no shadows,
reflections or multisampling — robosuite's context is remade after the model has them),
and turned upright (robosuite's offscreen frames are in OpenGL's bottom-up order).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ditvla.envs.rendering import FastOffscreenRenderer
from ditvla.envs.schema import SimulatorEnv
from ditvla.errors import ConfigError

INSTRUCTIONS = {
    "Lift": "lift the red cube",
    "Stack": "stack the red cube on the green cube",
    "PickPlaceCan": "pick up the can and place it in its bin",
    "NutAssemblySquare": "fit the square nut onto the square peg",
}
TASKS = tuple(INSTRUCTIONS)
DEFAULT_CAMERAS = ("agentview", "robot0_eye_in_hand")
PROPRIO_DIM = 9
ACTION_DIM = 7
ACTION_SPACE = (
    "robosuite OSC_POSE delta: end-effector xyz (1 = 5 cm), axis-angle (1 = 0.5 rad), "
    "gripper (-1 open, +1 closed), each in [-1, 1]"
)
MAX_EPISODE_STEPS = 500
# Position delta that an action of 1 asks for (robosuite's OSC_POSE output_max).
POSITION_SCALE = 0.05


def task_set(name: str) -> list[str]:
    """Task names of ``all`` or of one task / a comma-separated list."""
    if name == "all":
        return list(TASKS)
    tasks = [t.strip() for t in name.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(
            f"unknown robosuite task {', '.join(unknown) or repr(name)}; valid: all, "
            + ", ".join(TASKS)
        )
    return tasks


def instruction_for(task: str) -> str:
    return INSTRUCTIONS[task]


def _quiet_robosuite() -> None:
    """robosuite logs every controller file it loads (at INFO) for each environment."""
    from robosuite.utils.log_utils import ROBOSUITE_DEFAULT_LOGGER

    ROBOSUITE_DEFAULT_LOGGER.setLevel(logging.WARNING)


class RobosuiteEnv(SimulatorEnv):
    """One robosuite task with camera images, proprioception and an instruction.

    Args:
        task: one of ``TASKS``.
        cameras: robosuite camera names (e.g. "agentview", "robot0_eye_in_hand",
            "frontview"); empty for state-only episodes.
        image_size: square image side in pixels.
        max_episode_steps: truncation limit (500 control steps = 25 s by default).
        state_keys: the state parts that make up ``observation["state"]``: ``proprio``
            (eef position, quaternion, fingers: 9-D; the default), ``objects`` (robosuite's
            object observations, privileged), ``state`` (the same as proprio, as older stores
            name it).
    """

    proprio_keys = ("proprio",)
    privileged_keys = ("objects",)
    other_state_keys: ClassVar[dict[str, bool]] = {"state": False}

    def __init__(
        self,
        task: str,
        *,
        cameras: Sequence[str] = DEFAULT_CAMERAS,
        image_size: int = 64,
        max_episode_steps: int | None = None,
        state_keys: Sequence[str] | None = None,
    ):
        task_set(task)  # validates the name
        import robosuite

        _quiet_robosuite()
        self.task = task
        self.instruction = INSTRUCTIONS[task]
        self.check_state_keys(self.proprio_keys if state_keys is None else state_keys)
        self.cameras = tuple(cameras)
        self.max_episode_steps = max_episode_steps or MAX_EPISODE_STEPS
        self._env = robosuite.make(
            task,
            robots="Panda",
            has_renderer=False,
            has_offscreen_renderer=bool(self.cameras),
            use_camera_obs=False,
            use_object_obs=True,
            reward_shaping=False,
            horizon=self.max_episode_steps,
            ignore_done=True,
            hard_reset=False,  # keeps the model (and the fast render context) across resets
        )
        objects = self._env.observation_spec()["object-state"].shape[0]
        self._declare(
            cameras=cameras,
            image_size=image_size,
            state_dims={"proprio": PROPRIO_DIM, "state": PROPRIO_DIM, "objects": objects},
            state_keys=state_keys,
            action_dim=ACTION_DIM,
            max_episode_steps=self.max_episode_steps,
        )
        known = set(self._env.sim.model.camera_names)
        unknown = [c for c in self.cameras if c not in known]
        if unknown:
            raise ConfigError(f"unknown robosuite camera {unknown}; valid: {sorted(known)}")
        self._renderer = FastOffscreenRenderer(self._env.sim)
        self.fps = float(self._env.control_freq)
        self._expert: _PickPlaceExpert | None = None
        self._raw: dict[str, np.ndarray] = {}

    def render_camera(self, camera: str) -> np.ndarray:
        """One upright uint8 (H, W, 3) frame of ``camera``."""
        return np.ascontiguousarray(self._renderer.render(camera, self.image_size)[::-1])

    # ------------------------------------------------------------------ perturbation
    @property
    def mujoco_model(self) -> Any:
        return self._env.sim.model._model

    def move_layout(self, rng: np.random.Generator, level: str) -> None:
        move_free_objects(self._env, rng, level)

    def move_robot_start(self, rng: np.random.Generator, level: str) -> None:
        move_arm_joints(self._env, rng, level)

    def scene_changed(self) -> None:
        self._raw = observed_again(self._env)

    # ------------------------------------------------------------------ simulator
    def _reset_simulator(self, seed: int) -> None:
        saved = np.random.get_state()
        np.random.seed(seed)  # robosuite's placement samplers use the global generator
        try:
            self._env.rng = np.random.default_rng(seed)
            self._env.reset()
            # robosuite's first sample of some observables is zeros (PickPlace's
            # object-to-hand pose): computed afresh, the episode's first frame is right
            self._raw = observed_again(self._env)
        finally:
            np.random.set_state(saved)
        self._expert = None

    def _step_simulator(self, action: np.ndarray) -> tuple[float, bool]:
        self._raw, reward, _, _ = self._env.step(action.astype(np.float64))
        return reward, bool(self._env._check_success())

    def state_parts(self) -> dict[str, np.ndarray]:
        raw = self._raw
        proprio = np.concatenate(
            [raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"]]
        ).astype(np.float32)
        objects = np.asarray(raw["object-state"], np.float32)
        return {"proprio": proprio, "state": proprio, "objects": objects}

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state (privileged object poses)."""
        if self._expert is None:
            self._expert = _PickPlaceExpert.for_task(self)
        return self._expert.action(self._raw)

    def close(self) -> None:
        self._renderer.close()
        self._env.close()


# ---------------------------------------------------------------------- scripted expert
def move_arm_joints(env: Any, rng: np.random.Generator, level: str) -> None:
    """A robosuite environment's arm joints each moved by a uniform offset within the
    ``robot`` axis's level (the perturbation of a start; robosuite and LIBERO)."""
    from ditvla.envs.perturbations import ROBOT_JOINTS

    sim, robot = env.sim, env.robots[0]
    columns = [sim.model.get_joint_qpos_addr(joint) for joint in robot.robot_joints]
    offsets = rng.uniform(-ROBOT_JOINTS[level], ROBOT_JOINTS[level], len(columns))
    sim.data.qpos[columns] += offsets
    sim.data.qvel[:] = 0.0
    sim.forward()
    # the arm's controllers start from the moved pose (their goal and nullspace posture),
    # as at robosuite's own reset, instead of pulling the arm back
    for name, controller in robot.composite_controller.part_controllers.items():
        if name in robot.arms:
            controller.update_initial_joints(sim.data.qpos[controller.qpos_index])


INTERSECTING = -0.002  # m: a contact this deep means two objects placed inside each other
LAYOUT_DRAWS = 10  # tries per object before it stays where it was
PARKED_BEYOND = 5.0  # m from the origin: an object out of the scene (robosuite parks at 10)


def move_free_objects(env: Any, rng: np.random.Generator, level: str) -> None:
    """A robosuite environment's free objects (each body on a free joint: robosuite's and
    LIBERO's movable objects, but not those parked out of the scene, as robosuite's
    single-object tasks park the others)
    each moved horizontally by the ``layout`` axis's level, in a direction of its own; a
    draw that would put it inside something else is drawn again, and after
    :data:`LAYOUT_DRAWS` tries the object stays where it was."""
    import mujoco

    from ditvla.envs.perturbations import horizontal_move

    model, data = env.sim.model._model, env.sim.data._data
    free = [j for j in range(model.njnt) if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_FREE]
    in_scene = [
        j
        for j in free
        if np.linalg.norm(data.qpos[model.jnt_qposadr[j] : model.jnt_qposadr[j] + 3])
        < PARKED_BEYOND
    ]
    for joint in in_scene:
        body, column = model.jnt_bodyid[joint], model.jnt_qposadr[joint]
        start = data.qpos[column : column + 3].copy()
        for _ in range(LAYOUT_DRAWS):
            data.qpos[column : column + 3] = start + horizontal_move(rng, level)
            mujoco.mj_forward(model, data)
            if not _intersects(model, data, body):
                break
        else:
            data.qpos[column : column + 3] = start
    data.qvel[:] = 0.0
    mujoco.mj_forward(model, data)


def _intersects(model: Any, data: Any, body: int) -> bool:
    """Whether any geom of ``body`` (or of bodies it carries) lies inside another body's."""
    ours = model.body_rootid[body]
    for contact in data.contact[: data.ncon]:
        roots = {model.body_rootid[model.geom_bodyid[g]] for g in (contact.geom1, contact.geom2)}
        if ours in roots and len(roots) == 2 and contact.dist < INTERSECTING:
            return True
    return False


def observed_again(env: Any) -> dict[str, np.ndarray]:
    """A robosuite environment's observations recomputed after its model or state was
    changed outside a step (kinematics first)."""
    env.sim.forward()
    return env._get_observations(force_update=True)


class _PickPlaceExpert:
    """Pick an object and (optionally) put it down at a target, from privileged poses.

    Phases: hover over the object with the gripper open, descend, close, lift, carry to
    above the target, lower, open, back off. Position control is proportional on the
    end-effector error; no rotation is commanded (the objects need none to be grasped).
    """

    GAIN = 10.0  # action per metre of error (1 = 5 cm delta; 10 -> half the error per step)
    HOVER = 0.10
    CLOSE_STEPS = 12
    OPEN_STEPS = 10

    def __init__(
        self,
        object_key: str,
        *,
        target: np.ndarray | None = None,
        carry_height: float = 0.12,
        release_height: float = 0.03,
        lift_height: float = 0.15,
    ):
        self.object_key = object_key
        self.target = target
        self.carry_height = carry_height
        self.release_height = release_height
        self.lift_height = lift_height
        self.phase = "hover"
        self.counter = 0
        self.carry_z: float | None = None
        self.last_z: float | None = None

    @classmethod
    def for_task(cls, env: RobosuiteEnv) -> _PickPlaceExpert:
        inner = env._env
        if env.task == "Lift":
            return cls("cube_pos")
        if env.task == "Stack":
            # cubeA (0.02 half size) onto cubeB (0.025): release just above B's top face.
            top_of_b = inner.sim.data.body_xpos[inner.cubeB_body_id].copy()
            return cls("cubeA_pos", target=top_of_b, release_height=0.025 + 0.02 + 0.01)
        if env.task == "PickPlaceCan":
            target = inner.target_bin_placements[inner.object_to_id["can"]].copy()
            return cls("Can_pos", target=target, carry_height=0.20, release_height=0.10)
        raise ConfigError(
            f"no scripted expert for robosuite task {env.task!r}; experts exist for "
            "Lift, Stack and PickPlaceCan"
        )

    def _move(self, eef: np.ndarray, goal: np.ndarray, gripper: float) -> np.ndarray:
        action = np.zeros(ACTION_DIM, np.float32)
        action[:3] = np.clip((goal - eef) * self.GAIN, -1.0, 1.0)
        action[6] = gripper
        return action

    def action(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        eef = raw["robot0_eef_pos"]
        obj = raw[self.object_key]
        grasp = obj  # the object's centre
        open_, closed = -1.0, 1.0
        if self.phase == "hover":
            goal = grasp + np.array([0.0, 0.0, self.HOVER])
            if np.linalg.norm((goal - eef)[:2]) < 0.01 and abs(goal[2] - eef[2]) < 0.03:
                self.phase = "descend"
            return self._move(eef, goal, open_)
        if self.phase == "descend":
            # Fingertips can touch down (the table, a bin floor) before the grasp point.
            stalled = self.last_z is not None and abs(self.last_z - eef[2]) < 0.001
            self.counter = self.counter + 1 if stalled else 0
            self.last_z = eef[2]
            close_enough = np.linalg.norm((grasp - eef)[:2]) < 0.015 and self.counter >= 5
            if np.linalg.norm(grasp - eef) < 0.01 or close_enough:
                self.phase, self.counter = "close", 0
            return self._move(eef, grasp, open_)
        if self.phase == "close":
            self.counter += 1
            if self.counter >= self.CLOSE_STEPS:
                self.phase = "lift"
            return self._move(eef, grasp, closed)
        if self.phase == "lift":
            if self.carry_z is None:
                height = self.carry_height if self.target is not None else self.lift_height
                self.carry_z = eef[2] + height
            goal = np.array([eef[0], eef[1], self.carry_z])
            if abs(self.carry_z - eef[2]) < 0.02 and self.target is not None:
                self.phase = "carry"
            return self._move(eef, goal, closed)
        # Carrying: the object hangs off-centre in the fingers, so the object (not the
        # hand) is steered onto the target.
        offset = eef - obj
        if self.phase == "carry":
            goal = np.array([self.target[0] + offset[0], self.target[1] + offset[1], self.carry_z])
            if np.linalg.norm((goal - eef)[:2]) < 0.01:
                self.phase = "lower"
            return self._move(eef, goal, closed)
        if self.phase == "lower":
            goal = self.target + np.array([0.0, 0.0, self.release_height])
            if abs(obj[2] - goal[2]) < 0.01:
                self.phase, self.counter = "release", 0
            return self._move(eef, goal + offset, closed)
        if self.phase == "release":
            self.counter += 1
            if self.counter >= self.OPEN_STEPS:
                self.phase = "retreat"
            return self._move(eef, eef, open_)
        # retreat: straight up, open
        return self._move(eef, eef + np.array([0.0, 0.0, 0.05]), open_)


ENV_CLASS = RobosuiteEnv

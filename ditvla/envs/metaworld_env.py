"""Meta-World v3 tasks behind the ditvla observation schema.

Observation: ``{"images": {camera: uint8 (H, W, 3)}, "state": float32 (D,),
"instruction": str}``; action: float32 (4,) in [-1, 1] (end-effector xyz delta and
gripper). The state is proprioception by default (hand position and gripper opening, now
and one frame earlier: 8-D); Meta-World's privileged object poses and goal are parts of
their own (see :class:`MetaWorldEnv`).

Besides Meta-World's 50 tasks, the ``colour-reach`` set is a suite where the instruction
decides: three tasks ("reach the green / blue / yellow ball") share one scene per seed.

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
from pathlib import Path
from typing import ClassVar

import mujoco
import numpy as np

from ditvla.envs.rendering import fast_model, fast_scene, free_render_context
from ditvla.envs.schema import SimulatorEnv
from ditvla.errors import ConfigError

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


# Meta-World's 39-D observation: hand xyz (0:3), gripper opening (3), object poses (4:18),
# the previous frame's copy of those 18 values (18:36), the goal (36:39).
PROPRIO_INDEX = np.r_[0:4, 18:22]  # hand and gripper, now and one frame earlier: 8-D
OBJECTS_INDEX = np.r_[4:18, 22:36]  # object poses, now and one frame earlier: 28-D
GOAL_INDEX = np.r_[36:39]
HAND_INDEX = np.r_[0:4]  # hand and gripper now: proprioception without the previous frame
STATE_DIMS = {"proprio": 8, "objects": 28, "goal": 3, "state": 39, "hand": 4}
ACTION_DIM = 4
ACTION_SPACE = "metaworld: end-effector xyz delta + gripper effort, each in [-1, 1]"
DEFAULT_CAMERAS = ("corner",)


# The instruction-decides tasks: one scene — Meta-World's reach table with three coloured
# balls, the seed permuting their colours over three places — and three instructions;
# only the instruction says which ball to reach, only the camera where it is (the robot
# itself is red, so no ball is).
BALL_COLOURS = {
    "green": (0.1, 0.75, 0.1, 1.0),
    "blue": (0.1, 0.3, 1.0, 1.0),
    "yellow": (1.0, 0.85, 0.05, 1.0),
}
COLOUR_REACH = tuple(f"reach-{colour}-ball" for colour in BALL_COLOURS)
TASK_SETS = {"MT10": MT10, "colour-reach": COLOUR_REACH}

# Multimodal demonstrations (``ditvla collect --multimodal``): each episode's expert first
# passes the via-points of one way of doing its task, chosen by the episode's seed, and
# then the task's own expert finishes. Where an obstacle stands between two ways, their
# mean runs into it: reach-wall's hand goes around the wall's left or right end, low
# (the wall spans x -0.02..0.22 at y 0.75, 0.12 high; the hand starts above its middle).
ROUTES = {
    "reach-wall-v3": {
        "left": ((-0.15, 0.62, 0.07), (-0.15, 0.84, 0.07)),
        "right": ((0.35, 0.62, 0.07), (0.35, 0.84, 0.07)),
    },
}
# Every other task: an approach from the left or the right, the hand first moving 10 cm
# sideways and 5 cm up from where it starts.
APPROACH_OFFSETS = {"left": (-0.1, 0.0, 0.05), "right": (0.1, 0.0, 0.05)}
VIA_POINT_REACHED = 0.04  # metres from a via-point that count as passing it
VIA_POINT_GAIN = 10.0  # the proportional gain towards a via-point, as Meta-World's experts
HAND_SETTLE_STEPS = 50  # mocap steps that bring the hand to a moved start (as _reset_hand)


def all_tasks() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(ALL_V3_ENVIRONMENTS)


def instruction_for(task: str) -> str:
    if task in COLOUR_REACH:
        return f"reach the {task.split('-')[1]} ball"
    return INSTRUCTIONS.get(task, task.removesuffix("-v3").replace("-", " "))


def task_set(name: str) -> list[str]:
    """Task names of a set ("MT10", "MT50", "colour-reach") or of tasks, comma-separated
    (sets may be among them: "colour-reach,drawer-close-v3")."""
    if name == "MT50":
        return all_tasks()
    tasks: list[str] = []
    for item in (t.strip() for t in name.split(",") if t.strip()):
        tasks.extend(TASK_SETS.get(item, (item,)))
    known = {*all_tasks(), *COLOUR_REACH}
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ConfigError(
            f"unknown metaworld task {', '.join(unknown) or repr(name)}; valid: MT10, MT50, "
            f"colour-reach ({', '.join(COLOUR_REACH)}), " + ", ".join(sorted(all_tasks()))
        )
    return tasks


def split_state(store: str | Path) -> list[str]:
    """Split the 39-D ``state`` of a Meta-World store written before proprioception and
    privileged state were recorded apart: adds ``proprio``, ``objects`` and ``goal`` beside
    it (every frame; ``state`` stays). Returns the arrays added (none if already split)."""
    from ditvla.datasets.replay_buffer import DatasetError, ReplayBuffer

    buffer = ReplayBuffer.open(store, mode="a")
    if buffer.state_is_split:
        return []
    if buffer.shape("state") != (STATE_DIMS["state"],):
        raise DatasetError(
            f"{store}: data/state has frames of shape {buffer.shape('state')}, Meta-World's "
            f"is ({STATE_DIMS['state']},)"
        )
    raw = buffer.read_all("state").astype(np.float32)
    parts = {"proprio": raw[:, PROPRIO_INDEX], "objects": raw[:, OBJECTS_INDEX]}
    parts["goal"] = raw[:, GOAL_INDEX]
    buffer.add_arrays(
        parts, state_keys=list(MetaWorldEnv.proprio_keys), privileged_keys=["objects", "goal"]
    )
    return list(parts)


def colour_reach_class():
    """Meta-World's reach task with three coloured balls; the instructed one is the goal."""
    from metaworld.envs.sawyer_reach_v3 import SawyerReachEnvV3

    class ColourReachEnv(SawyerReachEnvV3):
        BALL_RADIUS = 0.035
        # Three places on the table; the seed permutes the colours over them and moves
        # each ball up to JITTER per axis (success is within 0.05 of the instructed one).
        PLACES = np.array([[-0.22, 0.72, 0.2], [0.08, 0.88, 0.07], [0.24, 0.7, 0.22]])
        JITTER = 0.02
        BALL_LOW = PLACES.min(0) - JITTER
        BALL_HIGH = PLACES.max(0) + JITTER

        def __init__(self, colour: str, **kwargs):
            from gymnasium.spaces import Box

            self.colour = colour
            super().__init__(**kwargs)
            # the observation clips the goal to this space: the balls' whole range
            self.goal_space = Box(self.BALL_LOW, self.BALL_HIGH, dtype=np.float64)

        def _initialize_simulation(self):
            spec = mujoco.MjSpec.from_file(self.fullpath)
            for site in spec.sites:
                if site.name == "goal":
                    site.rgba = [0, 0, 0, 0]  # the task's own goal marker, hidden
            for geom in spec.geoms:
                if geom.name == "objGeom":  # the red puck of reach-v3: out of the way, grey
                    geom.rgba = [0.5, 0.5, 0.5, 1]
            for name, rgba in BALL_COLOURS.items():
                spec.worldbody.add_site(
                    name=f"ball_{name}",
                    type=mujoco.mjtGeom.mjGEOM_SPHERE,
                    size=[self.BALL_RADIUS, 0, 0],
                    rgba=list(rgba),
                    pos=[0, 0.8, 0.2],
                )
            model = spec.compile()
            model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
            model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
            return model, mujoco.MjData(model)

        def reset_model(self):
            super().reset_model()
            places = self.PLACES[self.np_random.permutation(len(self.PLACES))]
            balls = places + self.np_random.uniform(-self.JITTER, self.JITTER, places.shape)
            for name, position in zip(BALL_COLOURS, balls, strict=True):
                self.model.site(f"ball_{name}").pos = position
            self._target_pos = balls[list(BALL_COLOURS).index(self.colour)].copy()
            self.model.site("goal").pos = self._target_pos
            self.maxReachDist = np.linalg.norm(self.init_tcp - self._target_pos)
            return self._get_obs()

        def expert_goal(self, observation: np.ndarray) -> np.ndarray:
            """Where Meta-World's reach expert should steer the hand: it steers the hand
            body (``observation[:3]``) to the goal, but success is measured at the
            fingertips (``tcp_center``), 4.5 cm below it, so the expert's own episodes
            would end with the fingertips just inside the 5 cm success sphere and a policy
            imitating it a little short would hover outside. The goal the expert reads is
            moved by the fingertips' offset, bringing them to the ball's centre."""
            return observation[GOAL_INDEX] + observation[:3] - self.tcp_center

    return ColourReachEnv


class MetaWorldEnv(SimulatorEnv):
    """One Meta-World v3 task with camera images, its state and an instruction.

    State parts: ``proprio`` (hand position and gripper opening, now and one frame
    earlier, as Meta-World stacks them: 8-D; the default), ``objects`` (object poses, now
    and one frame earlier: 28-D) and ``goal`` (3-D), privileged; ``state`` is Meta-World's
    own 39-D vector, as stores and policies from before the split hold it.

    Args:
        task: e.g. "door-open-v3".
        cameras: Meta-World camera names to render (e.g. "corner", "corner2", "topview",
            "gripperPOV"); empty for state-only episodes (no rendering cost).
        image_size: square image side in pixels.
        max_episode_steps: truncation limit (Meta-World's own 500 by default).
        state_keys: the state parts that make up ``observation["state"]``.
    """

    proprio_keys = ("proprio",)
    privileged_keys = ("objects", "goal")
    other_state_keys: ClassVar[dict[str, bool]] = {"state": True, "hand": False}

    def __init__(
        self,
        task: str,
        *,
        cameras: Sequence[str] = DEFAULT_CAMERAS,
        image_size: int = 64,
        max_episode_steps: int | None = None,
        state_keys: Sequence[str] | None = None,
    ):
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML1_ARGS_KWARGS

        task_set(task)  # validates the name
        self.task = task
        self.instruction = instruction_for(task)
        options = dict(
            render_mode="rgb_array" if cameras else None,
            camera_name=cameras[0] if cameras else None,
            width=image_size,
            height=image_size,
        )
        if task in COLOUR_REACH:
            env = colour_reach_class()(task.split("-")[1], **options)
            self._meta_task = "reach-v3"
        else:
            env = ALL_V3_ENVIRONMENTS[task](**options)
            self._meta_task = task
        # What metaworld.MT1 does to set up a task, with the goal left visible in the state.
        kwargs = dict(ML1_ARGS_KWARGS[self._meta_task]["kwargs"])
        kwargs.pop("task_id", None)
        env._set_task_called = True
        env._partially_observable = False
        if "sawyer_observation_space" in env.__dict__:  # cached with the goal hidden
            del env.sawyer_observation_space
        env._set_task_inner(**kwargs)
        fast_model(env.model)
        self._env = env
        self._via_points: list[np.ndarray] = []
        self._scene_flags_set = False
        self.fps = 1.0 / env.dt
        self._declare(
            cameras=cameras,
            image_size=image_size,
            state_dims=STATE_DIMS,
            state_keys=state_keys,
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
        viewer = renderer._get_viewer("rgb_array")
        if not self._scene_flags_set:
            fast_scene(viewer.scn, skybox=False)
            self._scene_flags_set = True
        # this simulator's GL context, whichever another simulator of the process made
        # current since (a few microseconds against milliseconds for the frame)
        viewer.make_context_current()
        return upright(camera, renderer.render("rgb_array"))

    # ------------------------------------------------------------------ simulator
    def _reset_simulator(self, seed: int) -> None:
        env = self._env
        env.seed(seed)  # draws the goal and object positions
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        self._raw_obs, _ = env.reset()
        self._via_points = []

    def _step_simulator(self, action: np.ndarray) -> tuple[float, bool]:
        self._raw_obs, reward, _, _, info = self._env.step(action)
        return reward, bool(info.get("success", 0.0))

    def state_parts(self) -> dict[str, np.ndarray]:
        raw = self._raw_obs.astype(np.float32)
        return {
            "proprio": raw[PROPRIO_INDEX],
            "objects": raw[OBJECTS_INDEX],
            "goal": raw[GOAL_INDEX],
            "state": raw,
            "hand": raw[HAND_INDEX],
        }

    def expert_action(self) -> np.ndarray:
        """Meta-World's scripted expert's action for the current state (after the via-points
        of the episode's route, if :meth:`vary_expert` chose one)."""
        if not hasattr(self, "_expert"):
            from metaworld.policies import ENV_POLICY_MAP

            self._expert = ENV_POLICY_MAP[self._meta_task]()
        observation = self._raw_obs
        if hasattr(self._env, "expert_goal"):
            observation = observation.copy()
            observation[GOAL_INDEX] = self._env.expert_goal(observation)
        action = np.clip(self._expert.get_action(observation), -1.0, 1.0)
        hand = self._raw_obs[:3]
        while self._via_points and np.linalg.norm(hand - self._via_points[0]) < VIA_POINT_REACHED:
            self._via_points.pop(0)
        if self._via_points:  # the expert's gripper, a move towards the via-point
            action[:3] = np.clip(VIA_POINT_GAIN * (self._via_points[0] - hand), -1.0, 1.0)
        return action.astype(np.float32)

    def vary_expert(self, seed: int) -> str:
        """Make this episode's expert take one of its task's ways, chosen by ``seed``: a
        route of :data:`ROUTES`, or an approach from one side. Call after ``reset``."""
        rng = np.random.default_rng([seed, 0x40DE])
        hand = self._raw_obs[:3].astype(np.float64)
        routes = ROUTES.get(self.task) or {
            side: (tuple(hand + offset),) for side, offset in APPROACH_OFFSETS.items()
        }
        name = sorted(routes)[int(rng.integers(len(routes)))]
        self._via_points = [np.asarray(point, np.float64) for point in routes[name]]
        return name

    # ------------------------------------------------------------------ perturbation
    def move_robot_start(self, rng: np.random.Generator, level: str) -> None:
        """The hand's start moved by the level's distance in a random direction (the arm
        follows Meta-World's mocap target, as at its own reset)."""
        from ditvla.envs.perturbations import ROBOT_HAND

        env = self._env
        direction = rng.normal(size=3)
        start = env.tcp_center + ROBOT_HAND[level] * direction / np.linalg.norm(direction)
        mocap = env.model.body_mocapid[env.data.body("mocap").id]
        for _ in range(HAND_SETTLE_STEPS):
            env.data.mocap_pos[mocap][:] = start
            env.do_simulation([-1, 1], env.frame_skip)

    def move_layout(self, rng: np.random.Generator, level: str) -> None:
        """Each position the reset drew (objects, goals, fixtures: Meta-World's random
        vector, in threes), or each colour-reach ball, moved by the level's distance; the
        task is reset again on the moved vector, so its rewards and success follow."""
        from ditvla.envs.perturbations import horizontal_move

        env = self._env
        if hasattr(env, "colour"):  # colour reach: the balls are its objects and goal
            for name in BALL_COLOURS:
                env.model.site(f"ball_{name}").pos += horizontal_move(rng, level)
            env._target_pos = env.model.site(f"ball_{env.colour}").pos.copy()
            env.model.site("goal").pos = env._target_pos
            env.maxReachDist = np.linalg.norm(env.init_tcp - env._target_pos)
            return
        drawn = np.array(env._last_rand_vec, dtype=np.float64)
        if len(drawn) % 3:
            raise ConfigError(
                f"{self.task}'s reset draws {len(drawn)} numbers, not positions: no layout axis"
            )
        env._last_rand_vec = kept_apart(drawn.reshape(-1, 3), rng, level).reshape(-1)
        env._freeze_rand_vec = True
        try:
            self._raw_obs, _ = env.reset()
        finally:
            env._freeze_rand_vec = False

    def scene_changed(self) -> None:
        env = self._env
        mujoco.mj_forward(env.model, env.data)
        env._prev_obs = env._get_curr_obs_combined_no_goal()  # as Meta-World's reset
        self._raw_obs = env._get_obs().astype(np.float64)

    def close(self) -> None:
        for viewer in self._env.mujoco_renderer._viewers.values():
            free_render_context(viewer.opengl_context, viewer.con)
        self._env.close()


ENV_CLASS = MetaWorldEnv


# Meta-World's resets draw again until an object and its goal are far enough apart
# horizontally (10, 15 or 25 cm, by task). On the frozen vector the layout axis resets on,
# a new draw returns the same numbers: a move that brings the two nearer than that loops
# for ever (reach-v3's seed 100002 at layout=medium did, and the evaluator lost a worker).
KEEP_APART = 0.25  # m, the largest of those distances


def kept_apart(positions: np.ndarray, rng: np.random.Generator, level: str) -> np.ndarray:
    """Each (x, y, z) position moved by the layout level's distance in its own horizontal
    direction, drawn again (from ``rng``, at most 100 times) until no two positions are
    horizontally nearer than they were or than :data:`KEEP_APART`, whichever is less; if
    no draw does, all move by one draw together, which keeps every distance."""
    from ditvla.envs.perturbations import horizontal_move

    def apart(points: np.ndarray) -> np.ndarray:
        return np.linalg.norm(points[:, None, :2] - points[None, :, :2], axis=-1)

    needed = np.minimum(apart(positions), KEEP_APART) - 1e-9
    for _ in range(100):
        moved = positions + np.stack([horizontal_move(rng, level) for _ in positions])
        if (apart(moved) >= needed).all():
            return moved
    return positions + horizontal_move(rng, level)

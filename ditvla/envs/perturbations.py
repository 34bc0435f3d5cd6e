"""Perturbed evaluation: ``ditvla eval --perturb AXIS=LEVEL[,AXIS=LEVEL...]``.

A success rate measured on the scenes, camera poses and words a policy was trained on
says little about what it meets next. Each axis below has three named levels; the
evaluation runs the same episodes (task, seed) and the same initial noise as an
unperturbed run, with the perturbation drawn from the episode's seed, so that two
policies, or one policy perturbed and not, are compared episode by episode.

Where the simulator owns an axis, the simulator applies it, the same way in every suite
(Meta-World, robosuite and LIBERO are all MuJoCo), after the episode's reset:

- ``camera``: every camera the policy reads moved by a distance in a random direction and
  turned by an angle about a random axis (in its own frame; the wrist camera relative to
  the hand);
- ``lighting``: every light and the headlight dimmed by a fraction, and each light's
  direction turned by an angle;
- ``table``: the surface the objects stand on (the table's materials, or the floor's in
  scenes without a table) tinted towards a random colour by a fraction;
- ``background``: the floor and the walls tinted the same way (the walls alone where the
  floor is the surface the objects stand on);
- ``layout``: every object placed a distance away from where the episode's seed put it, in
  a random horizontal direction of its own: Meta-World moves each position its reset draws
  (objects, goals, the articulated fixtures; the colour-reach balls), robosuite and LIBERO
  each free object (a draw that would make objects intersect is drawn again, and the
  object stays put when no draw fits);
- ``robot``: the arm's start moved: robosuite and LIBERO add a random offset to each arm
  joint; Meta-World's arm follows a mocap target, so its hand's start is moved instead.

What the policy receives is perturbed by the evaluator:

- ``pixels``: Gaussian noise on every frame the policy reads (camera sensor noise);
- ``state``: Gaussian noise on the state the policy reads (encoder noise);
- ``instruction``: the instruction reworded (:mod:`ditvla.envs.rewordings`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import mujoco
import numpy as np

from ditvla.errors import ConfigError

LEVELS = ("small", "medium", "large")

# the value of each level, and what it means (for --help, reports and docs)
CAMERA = {"small": (0.01, 1.0), "medium": (0.025, 3.0), "large": (0.05, 6.0)}  # m, degrees
LIGHTING = {"small": (0.2, 10.0), "medium": (0.4, 20.0), "large": (0.6, 40.0)}  # dim, degrees
TINT = {"small": 0.2, "medium": 0.45, "large": 0.8}  # how far towards the random colour
LAYOUT = {"small": 0.02, "medium": 0.04, "large": 0.08}  # m, each object
ROBOT_JOINTS = {"small": 0.03, "medium": 0.08, "large": 0.15}  # rad, uniform +- per joint
ROBOT_HAND = {"small": 0.01, "medium": 0.025, "large": 0.05}  # m (Meta-World)
PIXEL_NOISE = {"small": 4.0, "medium": 8.0, "large": 16.0}  # sigma in 0..255 levels
STATE_NOISE = {"small": 0.002, "medium": 0.005, "large": 0.01}  # sigma in state units

AXES: dict[str, dict[str, str]] = {
    "camera": {
        level: f"moved {d * 100:g} cm and turned {a:g} deg" for level, (d, a) in CAMERA.items()
    },
    "lighting": {
        level: f"{dim:.0%} dimmer, directions turned {a:g} deg"
        for level, (dim, a) in LIGHTING.items()
    },
    "table": {level: f"tinted {t:.0%} towards a random colour" for level, t in TINT.items()},
    "background": {level: f"tinted {t:.0%} towards a random colour" for level, t in TINT.items()},
    "layout": {
        level: f"each object moved {d * 100:g} cm in a random horizontal direction"
        for level, d in LAYOUT.items()
    },
    "robot": {
        level: f"arm joints +-{ROBOT_JOINTS[level]:g} rad (Meta-World: hand moved "
        f"{ROBOT_HAND[level] * 100:g} cm)"
        for level in LEVELS
    },
    "pixels": {level: f"Gaussian noise, sigma {s:g} of 255" for level, s in PIXEL_NOISE.items()},
    "state": {level: f"Gaussian noise, sigma {s:g}" for level, s in STATE_NOISE.items()},
    "instruction": {
        "small": "the same words, cased and punctuated otherwise",
        "medium": "one word or phrase replaced by a synonym",
        "large": "every known synonym replaced, in another sentence frame",
        "file": "a rewording from the file given with --rewordings",
    },
}
SCENE_AXES = ("camera", "lighting", "table", "background", "layout", "robot")
RECEIVED_AXES = ("pixels", "state", "instruction")

# materials, by name, of what the table and the background axes tint (read from the
# suites' scene files): the table's first (Meta-World's `wall_metal` is its rim; LIBERO's
# `living_room_table`, the study's `desk`), then the room; task objects never
TABLE_MATERIALS = ("table", "desk", "wall_metal")
BACKGROUND_MATERIALS = ("floor", "wall", "living_room")
OBJECT_MATERIALS = ("wall_brick",)  # Meta-World's wall tasks: the obstacle


# what the scene axes change in a model, kept at first and restored before every episode
LIGHT_INTENSITIES = ("diffuse", "ambient", "specular")
PERTURBED_ARRAYS = (
    "cam_pos",
    "cam_quat",
    "cam_pos0",  # tracking cameras are placed from these two
    "cam_mat0",
    "light_dir",
    *(f"light_{key}" for key in LIGHT_INTENSITIES),
    "mat_rgba",
)


def surface_of(name: str) -> str | None:
    """Whether a material (by name) is the table's, the background's or neither's."""
    name = name.lower()
    if any(key in name for key in OBJECT_MATERIALS):
        return None
    if any(key in name for key in TABLE_MATERIALS):
        return "table"
    if any(key in name for key in BACKGROUND_MATERIALS):
        return "background"
    return None


def describe_axes() -> str:
    """Every axis and level with its meaning (for --help and errors)."""
    return "; ".join(
        f"{axis}=" + "|".join(f"{level} ({meaning})" for level, meaning in levels.items())
        for axis, levels in AXES.items()
    )


@dataclass(frozen=True)
class Perturbation:
    """The axes an evaluation perturbs, each at one level."""

    levels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Perturbation:
        """``"camera=medium,lighting=small"``; ConfigError naming the valid axes or levels."""
        levels: dict[str, str] = {}
        for item in (part.strip() for part in text.split(",") if part.strip()):
            axis, _, level = item.partition("=")
            axis, level = axis.strip(), level.strip()
            if axis not in AXES:
                raise ConfigError(
                    f"unknown perturbation axis {axis!r} in {text!r}; axes: {', '.join(AXES)}"
                )
            if level not in AXES[axis]:
                raise ConfigError(
                    f"unknown level {level!r} for {axis}; levels: "
                    + ", ".join(f"{name} ({meaning})" for name, meaning in AXES[axis].items())
                )
            if axis in levels:
                raise ConfigError(f"perturbation axis {axis} given twice in {text!r}")
            levels[axis] = level
        return cls(tuple((axis, levels[axis]) for axis in AXES if axis in levels))

    def __bool__(self) -> bool:
        return bool(self.levels)

    def level(self, axis: str) -> str | None:
        return dict(self.levels).get(axis)

    def scene_axes(self) -> tuple[str, ...]:
        return tuple(axis for axis, _ in self.levels if axis in SCENE_AXES)

    def name(self) -> str:
        """``axis=level,...`` in the order of :data:`AXES` (the report's name for it, the
        same however the axes were ordered when given); "" when none."""
        return ",".join(f"{axis}={level}" for axis, level in self.levels)


def check_policy_reads(perturbation: Perturbation, cameras: Any, state_dim: int) -> None:
    """ConfigError for axes that would perturb nothing the policy reads."""
    seen = [
        a for a in ("camera", "lighting", "table", "background", "pixels") if perturbation.level(a)
    ]
    if seen and not cameras:
        raise ConfigError(f"the policy reads no camera: {', '.join(seen)} would change nothing")
    if perturbation.level("state") and not state_dim:
        raise ConfigError("the policy reads no state: the state axis would change nothing")


def episode_rng(seed: int, axis: str) -> np.random.Generator:
    """The generator an episode draws an axis's perturbation from: fixed by the seed, and
    apart for each axis (adding an axis does not change another's draw)."""
    return np.random.default_rng([seed, sum(axis.encode()), len(axis)])


def horizontal_move(rng: np.random.Generator, level: str) -> np.ndarray:
    """One object's move of the ``layout`` axis: (dx, dy, 0), the level's distance in a
    random horizontal direction."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    return LAYOUT[level] * np.array([np.cos(angle), np.sin(angle), 0.0])


def _unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=3)
    return vector / np.linalg.norm(vector)


def _turned(quat: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    """``quat`` turned by ``degrees`` about ``axis`` in its own frame."""
    turn, out = np.zeros(4), np.zeros(4)
    mujoco.mju_axisAngle2Quat(turn, axis, np.deg2rad(degrees))
    mujoco.mju_mulQuat(out, quat, turn)
    return out


def _rotated(vector: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    quat, out = np.zeros(4), np.zeros(3)
    mujoco.mju_axisAngle2Quat(quat, axis, np.deg2rad(degrees))
    mujoco.mju_rotVecQuat(out, vector, quat)
    return out


class ScenePerturber:
    """Applies the scene axes of a :class:`Perturbation` to one MuJoCo model, per episode:
    the model's nominal values are kept and restored before each episode's draw, so
    episodes never add up. ``env`` is a :class:`~ditvla.envs.schema.SimulatorEnv`."""

    def __init__(self, env: Any, perturbation: Perturbation):
        # not a strong reference: a simulator and its perturber would keep each other (and
        # a LIBERO scene's gigabyte) after closing, until the garbage collector came by
        self.env, self.perturbation = weakref.proxy(env), perturbation
        model = env.mujoco_model
        self.cameras: dict[str, int] = {}
        for camera in env.cameras:
            name = env.mujoco_camera(camera)
            index = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
            if index < 0:  # -1 would index the model's last camera
                raise ConfigError(f"the scene has no camera {name!r} to perturb")
            self.cameras[camera] = index
        used = {int(m) for m in model.geom_matid if m >= 0}
        names = {m: model.material(m).name.lower() for m in used}
        table = [m for m, name in names.items() if surface_of(name) == "table"]
        background = [m for m, name in names.items() if surface_of(name) == "background"]
        if not table:  # objects on the floor (LIBERO-Object): the floor is their surface
            table = [m for m in background if "floor" in names[m]]
            background = [m for m in background if m not in table]
        self.materials = {"table": table, "background": background}
        self.nominal = {key: getattr(model, key).copy() for key in PERTURBED_ARRAYS}
        self.nominal_headlight = {
            key: getattr(model.vis.headlight, key).copy() for key in LIGHT_INTENSITIES
        }

    def restore(self) -> None:
        model = self.env.mujoco_model
        for key, values in self.nominal.items():
            getattr(model, key)[:] = values
        for key, values in self.nominal_headlight.items():
            setattr(model.vis.headlight, key, values)

    def apply(self, seed: int) -> None:
        """This episode's draw of every scene axis (after the simulator's reset)."""
        self.restore()
        model = self.env.mujoco_model
        for axis in self.perturbation.scene_axes():
            level, rng = self.perturbation.level(axis), episode_rng(seed, axis)
            if axis == "camera":  # each camera its own draw, whichever others are read
                distance, degrees = CAMERA[level]
                for name, camera in self.cameras.items():
                    draw = episode_rng(seed, f"camera {name}")
                    shift, turn = distance * _unit(draw), _unit(draw)
                    model.cam_pos[camera] += shift
                    model.cam_quat[camera] = _turned(model.cam_quat[camera], turn, degrees)
                    # a tracking camera is placed from its reference pose instead
                    model.cam_pos0[camera] += shift
                    quat = np.zeros(4)
                    mujoco.mju_mat2Quat(quat, model.cam_mat0[camera])
                    mujoco.mju_quat2Mat(model.cam_mat0[camera], _turned(quat, turn, degrees))
            elif axis == "lighting":
                dim, degrees = LIGHTING[level]
                for key in LIGHT_INTENSITIES:
                    getattr(model, f"light_{key}")[:] *= 1.0 - dim
                    headlight = model.vis.headlight
                    setattr(headlight, key, getattr(headlight, key) * (1.0 - dim))
                for light in range(model.nlight):
                    model.light_dir[light] = _rotated(model.light_dir[light], _unit(rng), degrees)
            elif axis in ("table", "background"):
                colour, amount = rng.uniform(0.0, 1.0, 3), TINT[level]
                for material in self.materials[axis]:
                    rgb = model.mat_rgba[material, :3]
                    model.mat_rgba[material, :3] = (1.0 - amount) * rgb + amount * colour
            elif axis == "layout":  # before the robot axis: Meta-World resets again
                self.env.move_layout(rng, level)
            elif axis == "robot":
                self.env.move_robot_start(rng, level)
        self.env.scene_changed()


def noisy_frames(frames: np.ndarray, rng: np.random.Generator, level: str) -> np.ndarray:
    """uint8 frames with Gaussian sensor noise of the level's sigma, clipped to 0..255."""
    noise = rng.normal(0.0, PIXEL_NOISE[level], frames.shape)
    return np.clip(frames.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def noisy_state(state: np.ndarray, rng: np.random.Generator, level: str) -> np.ndarray:
    return (state + rng.normal(0.0, STATE_NOISE[level], state.shape)).astype(state.dtype)


class ReceivedPerturbation:
    """One episode's perturbation of what the policy receives (the pixels, state and
    instruction axes), drawn from the episode's seed: the noise goes on step by step from
    the episode's own generators, the rewording is chosen once."""

    def __init__(
        self,
        perturbation: Perturbation,
        task: str,
        seed: int,
        instruction: str,
        rewordings: dict[str, list[str]] | None = None,
    ):
        from ditvla.envs.rewordings import reworded

        self.pixels, self.state = perturbation.level("pixels"), perturbation.level("state")
        self.pixels_rng, self.state_rng = episode_rng(seed, "pixels"), episode_rng(seed, "state")
        self.instruction = instruction
        level = perturbation.level("instruction")
        if level == "file":
            choices = (rewordings or {}).get(task)
            self.instruction = choices[seed % len(choices)] if choices else instruction
        elif level is not None:
            self.instruction = reworded(instruction, level, seed)

    def frame(self, frame: np.ndarray) -> np.ndarray:
        return frame if self.pixels is None else noisy_frames(frame, self.pixels_rng, self.pixels)

    def state_of(self, state: np.ndarray) -> np.ndarray:
        return state if self.state is None else noisy_state(state, self.state_rng, self.state)

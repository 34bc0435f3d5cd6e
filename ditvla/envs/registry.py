"""The simulators behind ``--env SUITE:TASKS``: names, task sets, and how to build one.

Every environment speaks the observation schema of DESIGN.md (images by camera name,
``state``, ``instruction``) and has ``reset(seed=, options={"skip_images": ...})``,
``step(action, render=)``, ``expert_action()``, ``instruction``, ``cameras``, ``fps``.
Simulator packages are imported only when their suite is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ditvla.datasets.convert_libero import LIBERO_ACTION_SPACE


@dataclass(frozen=True)
class Suite:
    """One simulator family."""

    name: str
    action_dim: int
    default_cameras: tuple[str, ...]
    action_space: str  # stored in a dataset's attributes
    task_names: str  # for help texts
    _module: str
    _env_class: str

    def _load(self) -> Any:
        import importlib

        return importlib.import_module(self._module)

    def tasks(self, name: str) -> list[str]:
        """The tasks ``name`` stands for; ValueError naming the valid ones if unknown."""
        return self._load().task_set(name)

    def make(
        self,
        task: str,
        *,
        cameras: Sequence[str] | None = None,
        image_size: int = 64,
        max_episode_steps: int | None = None,
    ) -> Any:
        env_class: Callable[..., Any] = getattr(self._load(), self._env_class)
        return env_class(
            task,
            cameras=self.default_cameras if cameras is None else tuple(cameras),
            image_size=image_size,
            max_episode_steps=max_episode_steps,
        )


SUITES = {
    "metaworld": Suite(
        "metaworld",
        action_dim=4,
        default_cameras=("corner",),
        action_space="metaworld: end-effector xyz delta + gripper effort, each in [-1, 1]",
        task_names="metaworld:<task>[,<task>...], metaworld:MT10, metaworld:MT50",
        _module="ditvla.envs.metaworld_env",
        _env_class="MetaWorldEnv",
    ),
    "robosuite": Suite(
        "robosuite",
        action_dim=7,
        default_cameras=("agentview", "robot0_eye_in_hand"),
        action_space=(
            "robosuite OSC_POSE delta: end-effector xyz (1 = 5 cm), axis-angle (1 = 0.5 rad), "
            "gripper (-1 open, +1 closed), each in [-1, 1]"
        ),
        task_names="robosuite:Lift|Stack|PickPlaceCan|NutAssemblySquare[,...], robosuite:all",
        _module="ditvla.envs.robosuite_env",
        _env_class="RobosuiteEnv",
    ),
    "libero": Suite(
        "libero",
        action_dim=7,
        default_cameras=("agentview", "eye_in_hand"),
        action_space=LIBERO_ACTION_SPACE,  # as in converted LIBERO datasets
        task_names="libero:spatial|object|goal|10|90[/<task index>][,...]",
        _module="ditvla.envs.libero_env",
        _env_class="LiberoEnv",
    ),
}


def suite_of(spec: str) -> Suite:
    """The suite of ``"SUITE:TASKS"``; ValueError listing the suites if unknown."""
    name, _, _ = spec.partition(":")
    if name not in SUITES:
        raise ValueError(
            f"unknown environment {spec!r}; expected one of: "
            + "; ".join(s.task_names for s in SUITES.values())
        )
    return SUITES[name]


def parse_env(spec: str) -> tuple[Suite, list[str]]:
    """``"metaworld:MT10"`` -> (the metaworld suite, [task, ...]); ValueError if unknown."""
    suite = suite_of(spec)
    _, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"no task in {spec!r}; expected {suite.task_names}")
    return suite, suite.tasks(name)

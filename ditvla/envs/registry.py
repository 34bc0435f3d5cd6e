"""The simulators behind ``--env SUITE:TASKS``: names, task sets, and how to build one.

Every environment speaks the observation schema of ``envs/schema.py`` (images by camera name,
``state``, ``instruction``) and has ``reset(seed=, options={"skip_images": ...})``,
``step(action, render=)``, ``expert_action()``, ``instruction``, ``cameras``, ``fps``.
Simulator packages are imported only when their suite is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ditvla.errors import ConfigError


@dataclass(frozen=True)
class Suite:
    """One simulator family. Its facts (action width and meaning, default cameras, task
    sets, the environment class) live in its module and are read from there on use."""

    name: str
    task_names: str  # for help texts
    _module: str

    def _load(self) -> ModuleType:
        return importlib.import_module(self._module)

    @property
    def action_dim(self) -> int:
        return self._load().ACTION_DIM

    @property
    def action_space(self) -> str:
        """What the actions mean (stored in a dataset's attributes)."""
        return self._load().ACTION_SPACE

    @property
    def default_cameras(self) -> tuple[str, ...]:
        return self._load().DEFAULT_CAMERAS

    @property
    def env_class(self) -> Any:
        """The environment class; its state parts (``proprio_keys``, ``privileged_keys``,
        ``check_state_keys``, ``reads_privileged_state``) are known before one is built."""
        return self._load().ENV_CLASS

    def instruction(self, task: str) -> str:
        """The language instruction an episode of ``task`` gives."""
        return self._load().instruction_for(task)

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
        state_keys: Sequence[str] | None = None,
    ) -> Any:
        """One task's environment; ``state_keys`` default to its proprioception."""
        module = self._load()
        return module.ENV_CLASS(
            task,
            cameras=module.DEFAULT_CAMERAS if cameras is None else tuple(cameras),
            image_size=image_size,
            max_episode_steps=max_episode_steps,
            state_keys=state_keys,
        )


SUITES = {
    "metaworld": Suite(
        "metaworld",
        task_names="metaworld:<task>[,<task>...], metaworld:MT10, metaworld:MT50",
        _module="ditvla.envs.metaworld_env",
    ),
    "robosuite": Suite(
        "robosuite",
        task_names="robosuite:Lift|Stack|PickPlaceCan|NutAssemblySquare[,...], robosuite:all",
        _module="ditvla.envs.robosuite_env",
    ),
    "libero": Suite(
        "libero",
        task_names="libero:spatial|object|goal|10|90[/<task index>][,...]",
        _module="ditvla.envs.libero_env",
    ),
}


def suite_of(spec: str) -> Suite:
    """The suite of ``"SUITE:TASKS"``; ValueError listing the suites if unknown."""
    name, _, _ = spec.partition(":")
    if name not in SUITES:
        raise ConfigError(
            f"unknown environment {spec!r}; expected one of: "
            + "; ".join(s.task_names for s in SUITES.values())
        )
    return SUITES[name]


def parse_env(spec: str) -> tuple[Suite, list[str]]:
    """``"metaworld:MT10"`` -> (the metaworld suite, [task, ...]); ValueError if unknown."""
    suite = suite_of(spec)
    _, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"no task in {spec!r}; expected {suite.task_names}")
    return suite, suite.tasks(name)

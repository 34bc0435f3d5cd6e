"""Any LeRobot robot as the controller's robot (``ditvla robot --robot TYPE``).

LeRobot is imported when such a robot is built, never by the controller itself: a machine
that runs a simulated robot, or only the server, does not need it (it comes with the
``ditvla[lerobot]`` extra).
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from typing import Any

import numpy as np

from ditvla.deploy.errors import RobotUnavailable
from ditvla.errors import ConfigError


class LeRobotRobot:
    """Any LeRobot ``Robot``, driven through its own API (``--robot TYPE key=value ...``).

    Built (its type and options checked) at once, connected by :meth:`connect` once a
    policy server has answered. The state is the robot's float observation features in
    their declared order, the images its camera features; actions map onto its action
    features in order. ``hold`` sends the present positions back as the goal
    (position-controlled arms). Not exercised here: this machine has no robot attached.
    """

    def __init__(self, robot_type: str, options: dict[str, Any], instruction: str):
        try:
            import lerobot.robots as robots
            from lerobot.robots import RobotConfig, make_robot_from_config
        except ImportError as exc:
            raise RobotUnavailable(
                f"--robot {robot_type} drives a LeRobot robot, and LeRobot is not installed "
                f"({exc}); install it with `pip install 'ditvla[lerobot]'`"
            ) from None
        for module in pkgutil.iter_modules(robots.__path__):  # registers the config types
            with contextlib.suppress(ImportError):  # a robot whose extras are missing
                importlib.import_module(f"lerobot.robots.{module.name}")
        known = sorted(RobotConfig.get_known_choices())
        if robot_type not in known:
            raise ConfigError(f"unknown lerobot robot {robot_type!r}; known: {', '.join(known)}")
        config = RobotConfig.get_choice_class(robot_type)(**options)
        self.robot = make_robot_from_config(config)
        self.instruction = instruction
        self.action_bounds = None  # LeRobot's action features declare no range
        self._last: dict[str, Any] = {}

    def connect(self) -> LeRobotRobot:
        """Connect to the robot and read its features; returns itself."""
        self.robot.connect()
        features = self.robot.observation_features
        self.state_keys = [k for k, v in features.items() if v is float]
        self.camera_keys = [k for k, v in features.items() if isinstance(v, tuple)]
        self.action_keys = list(self.robot.action_features)
        self.action_dim = len(self.action_keys)
        return self

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

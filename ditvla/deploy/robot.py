"""What the controller drives: the four calls every robot gives it.

A protocol, apart from the robots themselves, so that the controller (and a machine that
runs only the controller) imports neither a simulator nor LeRobot: the simulated robot
(:mod:`ditvla.deploy.sim_robot`) and the LeRobot adapter (:mod:`ditvla.deploy.lerobot_robot`)
are imported only when ``ditvla robot --sim`` or ``--robot`` asks for them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Robot(Protocol):
    """``observe() -> (state (D,), camera frames {name: uint8 (S, S, 3)} or None when no
    new ones)``, ``send_action(action (A,))``, ``hold()`` (no motion), ``close()`` (held,
    then released). ``action_bounds``: the robot's own limits ``(low (A,), high (A,))``,
    which the controller holds chunks to when neither the server nor its options give
    any; None for a robot that declares none."""

    instruction: str
    action_dim: int
    action_bounds: tuple[np.ndarray, np.ndarray] | None

    def observe(self) -> tuple[np.ndarray, dict[str, np.ndarray] | None]: ...
    def send_action(self, action: np.ndarray) -> None: ...
    def hold(self) -> None: ...
    def close(self) -> None: ...

"""The controller's clock: what time it is, and how to wait for a tick's deadline.

A clock of its own (``now()``, ``sleep_until(t)``) rather than calls to :mod:`time` in
the loop, so that a test can run the control loop tick by tick on a clock it advances
itself — the loop's decisions (what to execute, when the watchdog fires, which chunk is
too old) then do not depend on how fast the machine is.

The real clock sleeps, then spins the last 0.5 ms under SCHED_FIFO, or 2 ms without
real-time priority, when a woken process may wait for a busy core (see
:func:`control_clock`).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Protocol

SPIN_S = 0.002  # without real-time priority a woken process may wait for a busy core
REALTIME_SPIN_S = 0.0005
REALTIME_PRIORITY = 50


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic axis."""
        ...

    def sleep_until(self, deadline: float) -> None:
        """Return at ``deadline`` (at once when it has passed)."""
        ...


class MonotonicClock:
    """``time.monotonic``; waits sleep until ``spin_s`` before the deadline, then spin."""

    def __init__(self, spin_s: float = SPIN_S):
        self.spin_s = spin_s

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, deadline: float) -> None:
        while (remaining := deadline - time.monotonic()) > self.spin_s:
            time.sleep(remaining - self.spin_s)
        while time.monotonic() < deadline:
            pass


def use_realtime_priority() -> bool:
    """Put this process under SCHED_FIFO (as robot control loops run); False if not allowed.

    On a loaded machine a normal-priority process that wakes for its tick can wait for a
    core for several milliseconds; a real-time one preempts the others at once. Needs root
    or CAP_SYS_NICE (or an rtprio limit in /etc/security/limits.conf)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
        return True
    except (PermissionError, AttributeError, OSError):
        return False


def control_clock(realtime: bool) -> MonotonicClock:
    """The control loop's clock: with ``realtime``, this process under SCHED_FIFO where the
    OS permits (a note on stderr where not) and a shorter spin."""
    if realtime and use_realtime_priority():
        return MonotonicClock(REALTIME_SPIN_S)
    if realtime:
        print(
            "note: real-time priority not permitted (needs root, CAP_SYS_NICE or an rtprio "
            "limit); tick jitter will be higher on a loaded machine",
            file=sys.stderr,
        )
    return MonotonicClock(SPIN_S)

"""Named points where a test can make this process die at once, as a SIGKILL would.

For tests only: nothing happens unless the environment variable ``DITVLA_CRASH_AT`` is
set when this module is imported. A test that checks what a crash leaves behind (a
store mid-append, a run mid-checkpoint) sets it for a child process instead of killing
the child at a random time: a random kill lands where the test wants only by luck, and
how often depends on the machine's speed.

``DITVLA_CRASH_AT=<name>`` ends the process the first time the code passes
``crash_point("<name>")``; ``<name>:<n>`` the n-th time (``checkpoint.written:2``: right
after the second checkpoint). The process ends through ``os._exit(CRASH_EXIT_STATUS)``:
no cleanup, no ``finally`` blocks, no flushing of Python's file buffers, so what is on
disk is what a kill at that point would leave. The status tells the test that the crash
landed where it asked (a process that finished or failed otherwise exits differently).

The points are named where they stand in the code (``grep -rn crash_point ditvla``).
Passing one costs a comparison with the name read at import.
"""

from __future__ import annotations

import os

CRASH_AT_ENV = "DITVLA_CRASH_AT"
CRASH_EXIT_STATUS = 86


def _parse_crash_at(value: str) -> tuple[str, int] | None:
    """``(name, n)`` from ``DITVLA_CRASH_AT``'s value, None when it is empty."""
    if not value:
        return None
    name, _, count = value.partition(":")
    if not name or (count and not (count.isdigit() and int(count) >= 1)):
        raise ValueError(
            f"{CRASH_AT_ENV}={value!r}: expected NAME or NAME:N with N a positive integer "
            "(the n-th time the process passes crash_point(NAME))"
        )
    return name, int(count or 1)


_target = _parse_crash_at(os.environ.get(CRASH_AT_ENV, ""))
_passes = 0


def crash_point(name: str) -> None:
    """End the process here if ``DITVLA_CRASH_AT`` names this point (and this pass)."""
    global _passes
    if _target is None or name != _target[0]:
        return
    _passes += 1
    if _passes == _target[1]:
        os._exit(CRASH_EXIT_STATUS)

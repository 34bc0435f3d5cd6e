"""Ports on loopback for the benches that start servers as separate processes.

The runtime benches run `ditvla serve`, `ditvla robot` and peers' servers side by side
on one machine; each asks the system for a free port so that runs never collide with
each other or with a server left over from an earlier run.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""What the probing benches read out of a policy: privileged arrays (object poses, the
goal), whole or a range of their columns, named on the command line as
``objects:0:3,goal``."""

from __future__ import annotations


def parse_targets(text: str) -> list[tuple[str, str, slice]]:
    """``objects:0:3,goal`` -> [(label, array, columns)]: an array, or a column range of it."""
    targets = []
    for item in text.split(","):
        name, *bounds = item.strip().split(":")
        columns = slice(int(bounds[0]), int(bounds[1])) if bounds else slice(None)
        targets.append((item.strip(), name, columns))
    return targets

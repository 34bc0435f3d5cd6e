"""What `pip install ditvla` brings: a machine that only serves a policy (the policy,
`ditvla serve`, the controller) gets no simulator and no dataset library; the extras
bring them, and `all` (what `make test` installs) brings everything.

The closure is computed from the requirements pyproject.toml declares and the metadata of
the distributions installed here: the same resolution pip makes, offline.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# what a robot computer should not have to install
SIMULATORS_AND_DATA = ("mujoco", "metaworld", "robosuite", "zarr", "h5py", "lerobot")


def own_requirements(extras: set[str] = frozenset()) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return requirements


def dependency_closure(extras: set[str] = frozenset()) -> set[str]:
    """Every distribution `pip install ditvla[extras]` would install (by name)."""
    seen: dict[str, set[str]] = {}
    todo = [Requirement(text) for text in own_requirements(extras)]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen and requirement.extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(requirement.extras)
        if name == "ditvla":  # an extra naming others: read them from the source
            todo += [Requirement(t) for t in own_requirements(set(requirement.extras))]
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:  # for another platform: nothing to follow
            continue
        for text in requires:
            sub = Requirement(text)
            wanted = {"", *requirement.extras}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(sub)
    return set(seen)


def test_plain_install_brings_no_simulator_or_dataset_library():
    plain = dependency_closure()
    assert {"torch", "transformers", "pyzmq", "safetensors"} <= plain
    assert not [name for name in SIMULATORS_AND_DATA if name in plain]


def test_the_extras_bring_them_and_all_brings_everything():
    assert {"zarr", "h5py", "s3fs"} <= dependency_closure({"data"})
    assert {"mujoco", "metaworld", "robosuite", "av"} <= dependency_closure({"sim"})
    assert "lerobot" in dependency_closure({"lerobot"})
    everything = dependency_closure({"all"})
    assert set(SIMULATORS_AND_DATA) <= everything
    assert {"bddl", "matplotlib", "tensorboard"} <= everything


def loaded_by(code: str) -> list[str]:
    """The simulator and dataset libraries a fresh interpreter has loaded after ``code``."""
    found = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [name for name in SIMULATORS_AND_DATA if name in found]


def test_serving_commands_load_no_simulator_or_dataset_library():
    for command in ("serve", "robot", "keygen"):
        code = (
            "from ditvla.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass"
        )
        assert loaded_by(code) == [], command

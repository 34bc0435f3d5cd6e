"""The house rules a user (and the next maintainer) relies on: parts that stand alone,
and a command line that offers every setting from its one home."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ditvla.cli import build_parser

PACKAGE = Path(__file__).resolve().parents[1] / "ditvla"
HEAVY = ("zarr", "h5py", "mujoco", "zmq")


PLUGIN = PACKAGE.parent / "plugins" / "lerobot_policy_ditvla" / "lerobot_policy_ditvla"


def all_imports(folder: Path) -> dict[str, set[str]]:
    """Every module each file under ``folder`` imports (at any depth of the file)."""
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(folder))] = names
    return found


def imported_modules(part: str) -> dict[str, set[str]]:
    """Every ``ditvla.*`` module each file of a part imports (at any depth of the file)."""
    return {
        Path(name).name: {n for n in names if n.startswith("ditvla.")}
        for name, names in all_imports(PACKAGE / part).items()
    }


def test_the_lerobot_plugin_adapts_and_ditvla_never_imports_lerobot_policies():
    """The plugin maps LeRobot onto ditvla's policy (no model code of its own); ditvla
    knows no plugin, and its policies no LeRobot."""
    for name, names in all_imports(PACKAGE).items():
        assert not any(n.startswith("lerobot_policy_ditvla") for n in names), name
        if name.startswith("policies"):
            assert not any(n.split(".")[0] == "lerobot" for n in names), name
    allowed = {
        "ditvla.contract",
        "ditvla.errors",
        "ditvla.policies.config",
        "ditvla.policies.policy",
        "ditvla.training.trainer",
        "ditvla.training.sharding",
    }
    for name, names in all_imports(PLUGIN).items():
        assert {n for n in names if n.startswith("ditvla")} <= allowed, name
    modules = [
        node.name
        for path in PLUGIN.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(base) in ("nn.Module", "PreTrainedPolicy") for base in node.bases)
    ]
    assert modules == ["DitvlaPolicy"]


def test_policies_import_no_other_part():
    for name, modules in imported_modules("policies").items():
        other = [m for m in modules if m.split(".")[1] in ("datasets", "envs", "deploy")]
        assert not other, f"policies/{name} imports {other}"


@pytest.mark.parametrize("part", ["envs", "deploy"])
def test_envs_and_deploy_reach_a_policy_only_through_the_contract(part):
    for name, modules in imported_modules(part).items():
        policies = [m for m in modules if m.startswith("ditvla.policies")]
        assert not policies, f"{part}/{name} imports {policies}"


def test_deploy_reads_no_dataset():
    for name, modules in imported_modules("deploy").items():
        assert not [m for m in modules if m.startswith("ditvla.datasets")], name


def loaded_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [m for m in HEAVY if m in out]


def test_a_policy_loads_without_data_simulator_or_transport_libraries():
    assert loaded_after("import ditvla.policies.policy") == []


def test_keygen_help_needs_no_data_or_simulator_library():
    code = "from ditvla.cli import main\ntry:\n    main(['keygen', '--help'])\nexcept SystemExit:\n    pass"
    assert loaded_after(code) == []


def subcommand(name: str):
    return build_parser(name)._subparsers._group_actions[0].choices[name]


def option_strings(name: str) -> set[str]:
    return {s for action in subcommand(name)._actions for s in action.option_strings}


def test_train_offers_every_field_of_the_training_and_policy_configs():
    from ditvla.policies.config import PolicyConfig
    from ditvla.training.trainer import TrainConfig

    offered = option_strings("train")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "policy_overrides":
            continue  # the --policy.* options
        flag = "--policy.preset" if field.name == "preset" else f"--{field.name.replace('_', '-')}"
        assert flag in offered, flag

    def policy_flags(cls, prefix):
        for field in dataclasses.fields(cls):
            if field.name in getattr(cls, "filled_in", ()):
                continue
            value = getattr(cls(), field.name)
            if dataclasses.is_dataclass(value):
                yield from policy_flags(type(value), f"{prefix}{field.name}.")
            else:
                yield f"--{prefix}{field.name.replace('_', '-')}"

    for flag in policy_flags(PolicyConfig, "policy."):
        assert flag in offered, flag
    assert "--policy.head.width" in offered and "--policy.foresight.kind" in offered


def test_option_help_shows_the_config_default():
    help_text = subcommand("train").format_help()
    assert "optimizer steps (default: 2000)" in " ".join(help_text.split())


MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 80


def test_no_class_or_function_outgrows_a_reading():
    """One job per class, functions that read as their steps: no class over 250 lines and
    no function over 80 in the package (a longer one is several waiting to be named)."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_FUNCTION_LINES
            else:
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} {lines}")
    assert not too_long


def test_the_controller_and_the_server_import_no_simulator_dataset_or_lerobot_library():
    """A robot computer runs `ditvla robot` and `ditvla serve` without simulators,
    dataset libraries or LeRobot installed (the simulated robot and the LeRobot adapter
    are imported only when asked for)."""
    code = (
        "import sys, ditvla.deploy.controller, ditvla.deploy.server; print([m for m in "
        "('mujoco', 'metaworld', 'robosuite', 'zarr', 'h5py', 'lerobot') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"

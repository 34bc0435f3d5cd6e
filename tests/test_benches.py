"""The benches are code too: every module of ``bench`` imports, and every bench answers
``--help`` without doing any of its work, so a refactor of ditvla cannot silently break
the benches behind the figures in docs/.

Benches are found by listing ``bench/*.py``: a module that runs as a script (it has an
``if __name__ == "__main__":`` block) is a bench, the others are the helpers benches
share; a new bench cannot be forgotten.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(path.stem for path in (ROOT / "bench").glob("*.py") if path.stem != "__init__")
BENCHES = [
    name
    for name in MODULES
    if 'if __name__ == "__main__":' in (ROOT / "bench" / f"{name}.py").read_text()
]


def test_the_bench_folder_holds_benches_and_helpers():
    assert len(BENCHES) >= 10, f"benches found in {ROOT / 'bench'}: {BENCHES}"
    assert set(MODULES) - set(BENCHES), "the shared helpers were not found"


@pytest.mark.parametrize("name", MODULES)
def test_every_module_of_the_bench_package_imports(name):
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__ and module.__doc__.strip(), f"bench/{name}.py has no docstring"
    if name not in BENCHES:  # a helper is not itself a bench
        assert not hasattr(module, "main"), f"bench/{name}.py has a main but no __main__ block"


@pytest.mark.parametrize("name", MODULES)
def test_benches_import_only_helpers_not_each_other(name):
    tree = ast.parse((ROOT / "bench" / f"{name}.py").read_text())
    imported = {
        node.module.removeprefix("bench.")
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench.")
    }
    assert not imported & set(BENCHES), (
        f"bench/{name}.py imports the bench(es) {imported & set(BENCHES)}"
    )


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_prints_its_help_and_exits(name, capsys):
    module = importlib.import_module(f"bench.{name}")
    assert "argv" in inspect.signature(module.main).parameters
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith(f"usage: python -m bench.{name} ")
    assert module.__doc__.strip().splitlines()[0] in help_text  # the description


def test_a_bench_runs_as_a_module_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "bench.lerobot_plugin", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m bench.lerobot_plugin ")
    assert "lerobot-train --policy.type=ditvla" in result.stdout


@pytest.mark.parametrize(
    ("randomize", "named"),
    [("camera=huge", "small (moved 1 cm"), ("pixels=small", "perturb what a policy receives")],
)
def test_the_libero_bench_refuses_a_bad_randomisation_before_any_work(
    randomize, named, tmp_path, capsys
):
    from bench import libero

    with pytest.raises(SystemExit) as exited:
        libero.main(["--suite", "goal", "--randomize", randomize, "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing made, the experts never ran


def test_a_randomised_libero_run_has_a_folder_of_its_own():
    from bench.libero import randomized_suffix

    assert randomized_suffix("") == ""
    assert randomized_suffix("camera=small, layout=small") == "_camera-small_layout-small"

"""The README's LeRobot lines, run as a user runs them.

The block of commands is read from README.md (the one that runs ``lerobot-train``) and
each line runs as its own process, in order, in a fresh folder: Meta-World
demonstrations, a LeRobot dataset, LeRobot's training loop, ``ditvla eval`` of the
checkpoint. Only the sizes are made small, by options appended to each line (a later
option wins), so that a README line that stops working fails here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from lerobot_policy_ditvla.configuration_ditvla import state_keys_of

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent

# The first words of each README line -> the options that make it small and quick.
SMALL = {
    ("ditvla", "collect"): ["--episodes-per-task", "2", "--image-size", "32", "--workers", "1"],
    ("ditvla", "convert"): [],
    ("lerobot-train",): ["--steps=2", "--batch_size=2", "--num_workers=0", "--policy.device=cpu"],
    ("ditvla", "eval"): [
        *("--episodes-per-task", "1", "--max-steps", "10"),
        *("--workers", "1", "--videos-per-task", "0"),
    ],
}


def readme_lerobot_commands() -> list[list[str]]:
    """The commands of the README's bash block that runs ``lerobot-train``, one per line
    (backslash continuations joined, comments dropped)."""
    blocks = [part.split("```")[0] for part in README.read_text().split("```bash\n")[1:]]
    block = next(b for b in blocks if "lerobot-train" in b)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def small(command: list[str]) -> list[str]:
    for prefix, options in SMALL.items():
        if tuple(command[: len(prefix)]) == prefix:
            return [str(BIN / command[0]), *command[1:], *options]
    raise AssertionError(f"a README line this test has no small settings for: {command}")


def test_the_readme_lerobot_lines_train_and_evaluate(tmp_path):
    commands = readme_lerobot_commands()
    assert [c[:2] for c in commands] == [
        ["ditvla", "collect"],
        ["ditvla", "convert"],
        ["lerobot-train", "--policy.type=ditvla"],
        ["ditvla", "eval"],
    ]
    outputs = []
    for command in commands:
        result = subprocess.run(
            small(command), cwd=tmp_path, capture_output=True, text=True, env=os.environ
        )
        assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
        outputs.append(result.stdout)

    # the dataset says what observation.state is, and the trained policy read exactly that
    dataset = Path(tmp_path, commands[1][commands[1].index("--out") + 1])
    features = json.loads((dataset / "meta" / "info.json").read_text())["features"]
    assert state_keys_of(features["observation.state"]) == ["proprio"]
    assert "state proprio (proprioception only)" in outputs[-1]
    results = json.loads((tmp_path / "outputs" / "eval" / "results.json").read_text())
    assert results["tasks"]["reach-v3"]["episodes"] == 1
    assert results["observation"]["state_keys"] == ["proprio"]

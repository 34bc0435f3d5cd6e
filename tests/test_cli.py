"""The ditvla command as a user runs it: help, dataset info, errors without tracebacks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from ditvla.cli import build_parser, main
from ditvla.envs.perturbations import AXES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ditvla.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "MUJOCO_GL": "egl"},
    )


def test_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("demo", "collect", "dataset", "convert"):
        assert command in out.stdout
    help_text = build_parser().parse_args(["convert", "libero", "x", "--out", "y"])
    assert help_text.func.__name__ == "run_convert_libero"


def test_every_command_prints_its_help():
    """Every command's and subcommand's --help renders (argparse formats each option's
    help with %: a config docstring's "48%" once broke ``ditvla train --help``)."""

    def parsers(parser):
        yield parser
        for action in parser._subparsers._group_actions if parser._subparsers else ():
            for sub in action.choices.values():
                yield from parsers(sub)

    helps = [parser.format_help() for parser in parsers(build_parser())]
    assert len(helps) > 10 and all("usage:" in text for text in helps)
    train = next(text for text in helps if text.startswith("usage: ditvla train "))
    assert "--instruction-noise" in train and "96.0%" in train


def test_option_help_keeps_a_field_docs_text_past_a_colon_in_it():
    """A field's text that goes on over lines holding a colon ("one unit per VLM
    transformer block: ...") is one entry, not a new field named by the words before it."""
    from ditvla.cli.config_options import field_docs
    from ditvla.training.trainer import TrainConfig

    docs = field_docs(TrainConfig)
    assert set(docs) <= {field.name for field in dataclasses.fields(TrainConfig)}
    assert "its checkpoints hold the whole weights" in docs["sharding"]
    assert docs["kept_features_gib"].endswith("0 turns it off.")


def test_dataset_info_prints_episodes_keys_tasks_and_stats(small_store, capsys):
    assert main(["dataset", "info", str(small_store), "--check"]) == 0
    out = capsys.readouterr().out
    assert "3 episodes" in out
    assert "16 frames" in out
    assert "data/front" in out and "(16, 16, 3)" in out and "uint8" in out
    assert "task0: 'do thing 0'" in out
    assert "q99" in out
    assert "check: 0 problems" in out


def test_dataset_info_check_fails_on_damage(small_store, capsys):
    (small_store / "data" / "wrist" / "c" / "2" / "0" / "0" / "0").unlink()
    assert main(["dataset", "info", str(small_store), "--check", "--no-stats"]) == 1
    assert "chunk file" in capsys.readouterr().out


def test_dataset_pack_writes_a_copy_with_many_frames_per_object(small_store, tmp_path, capsys):
    out = tmp_path / "packed.zarr"
    args = ["dataset", "pack", str(small_store), "--out", str(out), "--frames-per-object", "4"]
    assert main(args) == 0
    assert "16 frames; 4 frames per object: 4 objects per camera" in capsys.readouterr().out
    assert main(["dataset", "info", str(out), "--check", "--no-stats"]) == 0
    refused = run_cli(*args)
    assert refused.returncode == 2 and "already exists (pass --overwrite" in refused.stderr


def test_errors_are_one_line_without_traceback(tmp_path):
    out = run_cli("dataset", "info", str(tmp_path / "nothing.zarr"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "nothing.zarr: no such file or directory" in out.stderr
    out = run_cli("collect", "--env", "metaworld:not-a-task", "--out", str(tmp_path / "x.zarr"))
    assert out.returncode == 2
    assert "unknown metaworld task not-a-task; valid: MT10, MT50" in out.stderr
    assert "reach-v3" in out.stderr


@pytest.mark.slow
def test_demo_quick_runs_every_stage_and_writes_a_report(tmp_path):
    out = run_cli("demo", "--quick", "--robustness", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-2000:]
    demo = tmp_path / "demo"
    report = json.loads((demo / "report.json").read_text())
    assert set(report["tasks"]) == {
        "reach-green-ball",
        "reach-blue-ball",
        "reach-yellow-ball",
        "button-press-topdown-v3",
        "drawer-close-v3",
        "door-open-v3",
        "window-open-v3",
    }
    # the VLA setting: cameras, instruction and proprioception, nothing privileged
    assert report["observation"] == {
        "cameras": ["corner3", "behindGripper"],
        "state_keys": ["proprio"],
        "privileged_state": False,
    }
    for task in report["tasks"].values():
        assert task["episodes"] == 1 and 0.0 <= task["success_rate"] <= 1.0
    assert 0.0 <= report["mean_success"] <= 1.0 and report["minutes"] > 0
    assert set(report["stage_minutes"]) == {"collect", "train", "eval"}
    for command in (
        "ditvla collect --env metaworld:",
        "ditvla train --dataset",
        "ditvla eval --policy",
        "--detour-steps 20",  # the recipe: detours, cameras moved per demonstration,
        "--randomize camera=medium",  # the goal as a training-only target, a made-up
        "--auxiliary goal",  # word in half the samples' instructions
        "--instruction-noise 0.5",
        "ditvla calibrate-steps --policy",
    ):
        assert command in out.stdout
    # the policy ships with the steps calibrate-steps measured, and eval used them
    policy_config = json.loads((demo / "train" / "policy" / "config.json").read_text())
    assert policy_config["policy"]["backbone"]["vision_encoder"] == "efficientnet-lite0"
    assert policy_config["policy"]["num_inference_steps"] == report["num_inference_steps"]
    assert policy_config["step_calibration"]["chosen_steps"] == report["num_inference_steps"]
    text = (demo / "report.md").read_text()
    assert text.startswith("# ditvla demo report") and "proprioception only" in text
    assert "its scene randomised (camera=medium)" in text
    assert "made up with probability 0.5 (never one that tells it from the others)" in text
    n_action_steps = policy_config["policy"]["n_action_steps"]  # the report says what ran
    assert "its eyes the frozen ImageNet-pretrained efficientnet-lite0" in text
    assert f"16-action chunks, {n_action_steps} executed per chunk" in text
    assert (demo / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(demo.glob("*.mp4"))) == 7
    # --robustness: the same episodes under every axis at its moderate level
    profile = report["robustness"]
    assert set(profile) == {"none", *(f"{axis}=medium" for axis in AXES)}
    assert all(0.0 <= arm["mean_success"] <= 1.0 for arm in profile.values())
    assert "## Robustness" in text and "| instruction=medium |" in text

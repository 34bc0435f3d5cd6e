"""The dual-system runtime with real processes: `ditvla serve` + `ditvla robot --sim`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ditvla.policies.policy import DiTVLAPolicy, PolicyConfig

CLI = [sys.executable, "-m", "ditvla.cli"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = PolicyConfig.preset(
        "tiny", cameras=["corner"], image_size=32, state_dim=39, action_dim=4
    )
    folder = tmp_path_factory.mktemp("runtime") / "policy"
    DiTVLAPolicy(config).save_pretrained(folder)
    return folder


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def robot(address, out, *extra):
    return subprocess.Popen(
        [
            *CLI,
            "robot",
            "--sim",
            "metaworld:drawer-close-v3",
            "--server",
            address,
            "--out",
            str(out),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process, timeout=180) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def ticks(out) -> list[dict]:
    import csv

    with open(out / "ticks.csv") as f:
        return list(csv.DictReader(f))


def test_act_inpainting_keeps_the_frozen_actions(policy_dir):
    policy = DiTVLAPolicy.from_pretrained(policy_dir)
    obs = {"images": {"corner": np.zeros((32, 32, 3), np.uint8)}, "instruction": "close the drawer"}
    context = policy.encode(obs)
    state = np.zeros(39, np.float32)
    target = np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype(np.float32)
    weights = np.r_[np.ones(5), np.zeros(11)].astype(np.float32)
    noise = torch.randn(1, 16, 4)
    chunk = policy.act(context, state, noise=noise, inpaint=(target, weights))[0]
    free = policy.act(context, state, noise=noise)[0]
    np.testing.assert_allclose(chunk[:5].numpy(), target[:5], atol=1e-4)
    assert not np.allclose(free[:5].numpy(), target[:5], atol=1e-2)
    with pytest.raises(ValueError, match="inpaint"):
        policy.act(context, state, inpaint=(target[:4], weights))


@pytest.mark.slow
def test_serve_and_robot_processes(policy_dir, tmp_path):
    address = free_address()
    server = subprocess.Popen(
        [*CLI, "serve", "--policy", str(policy_dir), "--address", address, "--merge", "rtc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # 1. an episode streams chunks from both systems and is executed on the tick axis
        first = tmp_path / "first"
        finished(robot(address, first, "--episodes", "1", "--max-steps", "120", "--merge", "rtc"))
        summary = json.loads((first / "summary.json").read_text())
        rows = ticks(first)
        assert summary["ticks"] == len(rows) > 0 and summary["chunks"] > 0
        assert summary["rejected_messages"] == 0 and summary["missed_deadlines"] >= 0
        assert sum(r["executed"] == "action" for r in rows) > len(rows) // 2
        assert summary["system1_hz"] > 0 and summary["system2_hz"] > 0

        # 2. System 2 killed: the server restarts it and chunks flow again
        children = subprocess.run(
            ["pgrep", "-P", str(server.pid)], capture_output=True, text=True
        ).stdout.split()
        assert children, "System 2 runs in its own process"
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        second = tmp_path / "second"
        # holds while the new process starts (the old context goes stale), then acts again
        finished(robot(address, second, "--episodes", "1", "--max-steps", "1500"))
        rows = ticks(second)
        assert rows[50]["executed"] != "action"
        assert any(r["executed"] == "action" for r in rows[-100:]), "no actions after the restart"

        # 3. SIGTERM to the controller: it stops at once with the robot held, summary written
        fourth = tmp_path / "fourth"
        controller = robot(address, fourth, "--duration-s", "60")
        time.sleep(4)
        controller.send_signal(signal.SIGTERM)
        finished(controller, timeout=30)
        assert json.loads((fourth / "summary.json").read_text())["ticks"] < 60 * 50
        # 4. the server dies mid-run: the robot holds (watchdog), ends cleanly, keeps its metrics
        third = tmp_path / "third"
        controller = robot(address, third, "--duration-s", "8", "--max-steps", "1000")
        time.sleep(5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        finished(controller)
        rows = ticks(third)
        assert rows[-1]["executed"] in ("watchdog", "hold")
        assert sum(r["executed"] in ("watchdog", "hold") for r in rows) >= 50

    finally:
        server.kill()
        server.wait()

"""Real-time chunking at few denoising steps, through the runtime.

For a trained policy and a Meta-World task, every pair of merge rule (``latest``, ``rtc``)
and denoising step count (default 10, 2, 1) runs `ditvla serve` and `ditvla robot --sim`
as separate processes at 50 Hz, over the same episodes (seeds 100000 up). The controller
records how far the executed action moves at each tick; the bench reports, per arm:

- the mean jump at a switch to a new chunk (L2, in the action's units) against the mean
  change between ticks within a chunk: what real-time chunking's inpainting is there to
  shrink;
- success over the episodes (95% Wilson interval) and the chunk latency (observation to
  action, p50).

With 1 or 2 steps the inpainting guide has one or two chances to act: at 1 step the chunk
is the model's one estimate of the clean actions, blended with the planned ones by the RTC
weights (the model never sees the frozen prefix); at 2 steps the second step sees the
blended estimate, noised half-way, and can make the rest of the chunk follow it.

    python -m bench.chunk_switching --policy outputs/mm/teacher/policy \\
        --sim metaworld:reach-wall-v3 [--episodes 10] [--steps 10,2,1] [--student DIR]

Last line: ``rtc through the runtime: jump at a switch latest -> rtc: <k> steps a -> b
(success ...), ...``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.loopback import free_port
from ditvla.envs.evaluate import wilson_interval

CLI = [sys.executable, "-m", "ditvla.cli"]
MERGES = ("latest", "rtc")


def run_arm(policy: Path, steps: int, merge: str, args, folder: Path) -> dict:
    """One server + one robot process; the robot's summary with the server's counters."""
    address = f"tcp://127.0.0.1:{free_port()}"
    stats = folder / "server.json"
    server = subprocess.Popen(
        [
            *CLI,
            *("serve", "--policy", str(policy), "--address", address, "--merge", merge),
            *("--num-inference-steps", str(steps), "--quiet", "--stats-json", str(stats)),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        robot = subprocess.run(
            [
                *CLI,
                *("robot", "--sim", args.sim, "--server", address, "--merge", merge),
                *("--episodes", str(args.episodes), "--max-steps", str(args.max_steps)),
                *("--hz", str(args.hz), "--out", str(folder / "robot")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if robot.returncode:
            raise RuntimeError(f"ditvla robot failed:\n{robot.stderr[-3000:]}")
    finally:
        server.terminate()
        server.wait()
    summary = json.loads((folder / "robot" / "summary.json").read_text())
    summary["server"] = json.loads(stats.read_text()) if stats.exists() else {}
    return summary


def describe(name: str, summary: dict) -> dict:
    wins = sum(e["success"] for e in summary["episodes"])
    n = len(summary["episodes"])
    low, high = wilson_interval(wins, n)
    row = {
        "arm": name,
        "success": wins / n,
        "interval": [low, high],
        "episodes": n,
        "jump_at_switch": summary["action_jump_at_switch"],
        "change_within_chunk": summary["action_change_within_chunk"],
        "latency_p50_ms": summary["latency_p50_ms"],
        "held_ticks": summary["held_ticks"],
        "ticks": summary["ticks"],
    }
    print(
        f"{name:<22} success {100 * row['success']:5.1f}% [{100 * low:.0f}-{100 * high:.0f}] "
        f"| jump at switch {row['jump_at_switch']:.4f} vs within a chunk "
        f"{row['change_within_chunk']:.4f} | obs->action p50 {row['latency_p50_ms']:.0f} ms "
        f"| held {row['held_ticks']}/{row['ticks']}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chunk_switching",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--sim", required=True, help="metaworld:<task>")
    parser.add_argument("--student", type=Path, help="a few-step student (ditvla distill)")
    parser.add_argument("--steps", default="10,2,1", help="denoising step counts to run")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=500, help="ticks per episode")
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=Path("outputs/chunk_switching"))
    args = parser.parse_args(argv)

    plan = [(args.policy, int(k), f"{k} steps") for k in args.steps.split(",")]
    if args.student is not None:
        plan.append((args.student, 1, "student 1 step"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy, steps, label in plan:
            for merge in MERGES:
                folder = Path(tmp) / f"{label}-{merge}".replace(" ", "_")
                rows.append(
                    describe(f"{label}, {merge}", run_arm(policy, steps, merge, args, folder))
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    pairs = []
    for latest, rtc in zip(rows[::2], rows[1::2], strict=True):
        label = latest["arm"].rsplit(",", 1)[0]
        pairs.append(
            f"{label} {latest['jump_at_switch']:.3f} -> {rtc['jump_at_switch']:.3f} (success "
            f"{100 * latest['success']:.0f}% -> {100 * rtc['success']:.0f}%)"
        )
    print("rtc through the runtime: jump at a switch latest -> rtc: " + ", ".join(pairs))


if __name__ == "__main__":
    main()

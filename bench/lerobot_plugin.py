"""ditvla trained by LeRobot's own loop (``lerobot-train --policy.type=ditvla``) against
``ditvla train``: the same demonstrations, steps, batch, learning rate and schedule.

1. Scripted Meta-World demonstrations (collected when missing), written as a LeRobot v3
   dataset by ``ditvla convert to-lerobot`` (PNG frames, lossless).
2. ``lerobot-train --policy.type=ditvla`` on the LeRobot dataset and ``ditvla train`` on
   the zarr store, one after the other, each timed end to end (process start to saved
   policy). LeRobot's loop keeps no EMA, so ``ditvla train`` runs with ``--ema-decay 0``.
3. Both policies evaluated by ditvla's evaluator on the same episodes (seeds 100000 up,
   the same initial noise), reading the same cameras, proprioception and instruction.

    python bench/lerobot_plugin.py [--steps 1500] [--episodes 20] [--out outputs/lerobot_plugin]

Last line: ``lerobot plugin: lerobot-train <x>% (<t1> s), ditvla train <y>% (<t2> s):
lerobot-train takes <r>x the time``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TASKS = "metaworld:drawer-close-v3,button-press-topdown-v3,reach-v3"
CAMERAS = ("corner3", "behindGripper")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--demos-per-task", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=20, help="evaluation episodes per task")
    parser.add_argument("--out", default="outputs/lerobot_plugin")
    args = parser.parse_args()

    from ditvla.cli import main as ditvla
    from ditvla.contract import load_policy
    from ditvla.envs.collect import collect_demonstrations
    from ditvla.envs.evaluate import evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store, lerobot_root = out / "demos.zarr", out / "demos_lerobot"
    if not store.exists():
        collect_demonstrations(
            TASKS, store, episodes_per_task=args.demos_per_task, image_size=64, cameras=CAMERAS
        )
    if not lerobot_root.exists():
        ditvla(
            ["convert", "to-lerobot", str(store), "--out", str(lerobot_root), "--storage", "image"]
        )
    binaries = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    start = time.perf_counter()
    lerobot_run = out / "lerobot_train"
    subprocess.run(
        [
            str(binaries / "lerobot-train"),
            "--policy.type=ditvla",
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            '--policy.state_keys=["proprio"]',
            f"--policy.optimizer_lr={args.lr}",
            f"--dataset.repo_id=local/{lerobot_root.name}",
            f"--dataset.root={lerobot_root}",
            f"--steps={args.steps}",
            f"--batch_size={args.batch_size}",
            f"--save_freq={args.steps}",
            "--log_freq=100",
            "--num_workers=2",
            "--wandb.enable=false",
            f"--output_dir={lerobot_run}",
        ],
        check=True,
        env=env,
    )
    lerobot_seconds = time.perf_counter() - start
    lerobot_policy = lerobot_run / "checkpoints" / "last" / "pretrained_model"

    start = time.perf_counter()
    ditvla_run = out / "ditvla_train"
    subprocess.run(
        [
            str(binaries / "ditvla"),
            "train",
            "--dataset",
            str(store),
            "--out",
            str(ditvla_run),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--ema-decay",
            "0",
            "--num-workers",
            "2",
        ],
        check=True,
        env=env,
    )
    ditvla_seconds = time.perf_counter() - start

    results = {}
    for name, folder in (
        ("lerobot-train", lerobot_policy),
        ("ditvla train", ditvla_run / "policy"),
    ):
        report = evaluate(load_policy(folder), TASKS, episodes_per_task=args.episodes)
        results[name] = report.summary()
        print(f"{name}:\n{report.markdown()}\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "seconds": {
                    "lerobot-train": round(lerobot_seconds, 1),
                    "ditvla train": round(ditvla_seconds, 1),
                },
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    x = results["lerobot-train"]["mean_success"] * 100
    y = results["ditvla train"]["mean_success"] * 100
    print(
        f"lerobot plugin: lerobot-train {x:.1f}% ({lerobot_seconds:.0f} s), ditvla train "
        f"{y:.1f}% ({ditvla_seconds:.0f} s): lerobot-train takes "
        f"{lerobot_seconds / ditvla_seconds:.2f}x the time"
    )


if __name__ == "__main__":
    main()

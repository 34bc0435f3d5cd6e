"""ditvla trained by LeRobot's own loop (``lerobot-train --policy.type=ditvla``) against
``ditvla train``: the same demonstrations, steps, batch, learning rate and schedule.

1. Scripted Meta-World demonstrations (collected when missing), written as a LeRobot v3
   dataset by ``ditvla convert to-lerobot`` (PNG frames, lossless).
2. ``lerobot-train --policy.type=ditvla`` on the LeRobot dataset and ``ditvla train`` on
   the zarr store, one after the other, each timed end to end (process start to saved
   policy). LeRobot's loop keeps no EMA, so ``ditvla train`` runs with ``--ema-decay 0``.
3. Both policies evaluated by ditvla's evaluator on the same episodes (seeds 100000 up,
   the same initial noise), reading the same cameras, proprioception and instruction.

    python -m bench.lerobot_plugin [--steps 1500] [--episodes 20] [--out outputs/lerobot_plugin]

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


def build_parser() -> argparse.ArgumentParser:
    """The bench's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.lerobot_plugin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--demos-per-task", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=20, help="evaluation episodes per task")
    parser.add_argument("--out", default="outputs/lerobot_plugin")
    return parser


def demonstrations(args, out: Path) -> tuple[Path, Path]:
    """The scripted demonstrations as a zarr store and as a LeRobot v3 dataset (PNG
    frames), each made when missing."""
    from ditvla.cli import main as ditvla
    from ditvla.envs.collect import collect_demonstrations

    store, lerobot_root = out / "demos.zarr", out / "demos_lerobot"
    if not store.exists():
        collect_demonstrations(
            TASKS, store, episodes_per_task=args.demos_per_task, image_size=64, cameras=CAMERAS
        )
    if not lerobot_root.exists():
        ditvla(
            ["convert", "to-lerobot", str(store), "--out", str(lerobot_root), "--storage", "image"]
        )
    return store, lerobot_root


def timed_run(command: list[str]) -> float:
    """Seconds ``command`` took, process start to exit (offline: no hub)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def lerobot_train(args, lerobot_root: Path, run: Path) -> list[str]:
    """``lerobot-train --policy.type=ditvla`` on the LeRobot dataset, into ``run``."""
    return [
        str(Path(sys.executable).parent / "lerobot-train"),
        "--policy.type=ditvla",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        f"--policy.optimizer_lr={args.lr}",
        f"--dataset.repo_id=local/{lerobot_root.name}",
        f"--dataset.root={lerobot_root}",
        f"--steps={args.steps}",
        f"--batch_size={args.batch_size}",
        f"--save_freq={args.steps}",
        "--log_freq=100",
        "--num_workers=2",
        "--wandb.enable=false",
        f"--output_dir={run}",
    ]


def ditvla_train(args, store: Path, run: Path) -> list[str]:
    """``ditvla train`` on the zarr store with the same steps, batch and learning rate,
    and no EMA (LeRobot's loop keeps none), into ``run``."""
    return [
        str(Path(sys.executable).parent / "ditvla"),
        *("train", "--dataset", str(store), "--out", str(run), "--steps", str(args.steps)),
        *("--batch-size", str(args.batch_size), "--lr", str(args.lr), "--ema-decay", "0"),
        *("--num-workers", "2", "--overwrite"),  # each run of the bench trains again
    ]


def evaluate_both(args, policies: dict[str, Path]) -> dict[str, dict]:
    """Each trained policy evaluated by ditvla's evaluator on the same episodes."""
    from ditvla.contract import load_policy
    from ditvla.envs.evaluate import evaluate

    results = {}
    for name, folder in policies.items():
        report = evaluate(load_policy(folder), TASKS, episodes_per_task=args.episodes)
        results[name] = report.summary()
        print(f"{name}:\n{report.markdown()}\n")
    return results


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store, lerobot_root = demonstrations(args, out)
    lerobot_run, ditvla_run = out / "lerobot_train", out / "ditvla_train"
    seconds = {
        "lerobot-train": timed_run(lerobot_train(args, lerobot_root, lerobot_run)),
        "ditvla train": timed_run(ditvla_train(args, store, ditvla_run)),
    }
    results = evaluate_both(
        args,
        {
            "lerobot-train": lerobot_run / "checkpoints" / "last" / "pretrained_model",
            "ditvla train": ditvla_run / "policy",
        },
    )
    record = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    record["seconds"] = {name: round(s, 1) for name, s in seconds.items()}
    record["results"] = results
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    x = results["lerobot-train"]["mean_success"] * 100
    y = results["ditvla train"]["mean_success"] * 100
    lerobot_seconds, ditvla_seconds = seconds["lerobot-train"], seconds["ditvla train"]
    print(
        f"lerobot plugin: lerobot-train {x:.1f}% ({lerobot_seconds:.0f} s), ditvla train "
        f"{y:.1f}% ({ditvla_seconds:.0f} s): lerobot-train takes "
        f"{lerobot_seconds / ditvla_seconds:.2f}x the time"
    )


if __name__ == "__main__":
    main()

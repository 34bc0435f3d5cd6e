"""Ablation of the motion-foresight head on the demo tasks: foresight=off vs motion.

One set of demonstrations (the demo's: five Meta-World tasks, its episode count and image
size), two policies trained with the demo's settings and the same seed — one without the
foresight head, one with it — evaluated on the same episodes (seeds 100000 and up).
Writes a markdown table (default docs/foresight_ablation.md) and prints it.

    python bench/foresight_ablation.py [--eval-episodes 20] [--out outputs/foresight_ablation]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from ditvla.contract import load_policy
from ditvla.demo import DEMO_TASKS, FULL
from ditvla.envs.collect import collect_demonstrations
from ditvla.envs.evaluate import evaluate
from ditvla.training.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/foresight_ablation")
    parser.add_argument("--eval-episodes", type=int, default=20, help="per task (20)")
    parser.add_argument("--weight", type=float, default=0.1, help="foresight loss weight (0.1)")
    parser.add_argument("--table", default="docs/foresight_ablation.md")
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    out = Path(args.out)
    env_spec = FULL.env
    store = out / "demos.zarr"
    if not store.exists():
        collect_demonstrations(env_spec, store, FULL.collect)
    rows = {}
    for kind in ("off", "motion"):
        started = time.perf_counter()
        final = train(
            replace(
                FULL.train,
                dataset=str(store),
                out=str(out / kind),
                save_every=FULL.train.steps,
                policy_overrides={"foresight": {"kind": kind, "weight": args.weight}},
            )
        )
        train_minutes = (time.perf_counter() - started) / 60
        report = evaluate(
            load_policy(final),
            env_spec,
            FULL.evaluate,
            episodes_per_task=args.eval_episodes,
            out=str(out / kind / "eval"),
            videos_per_task=0,
        )
        rows[kind] = (report.summary(), train_minutes)

    lines = [
        "# Motion-foresight ablation on the demo tasks",
        "",
        f"`python bench/foresight_ablation.py --eval-episodes {args.eval_episodes}` on the 2-core "
        f"CPU: {FULL.collect.episodes_per_task} demonstrations per task at "
        f"{FULL.collect.image_size}x{FULL.collect.image_size}, tiny preset, {FULL.train.steps} "
        f"steps at batch {FULL.train.batch_size}, lr {FULL.train.lr:g}, seed 0; "
        f"foresight: DIS flow of the corner camera, k=4, 16x16 motion image, weight {args.weight}. "
        f"{args.eval_episodes} episodes per task on seeds 100000 and up (95% Wilson intervals).",
        "",
        "| task | foresight=off | foresight=motion |",
        "|---|---|---|",
    ]
    for task in DEMO_TASKS:
        cells = []
        for kind in ("off", "motion"):
            t = rows[kind][0]["tasks"][task]
            lo, hi = t["ci95"]
            cells.append(f"{t['success_rate']:.0%} [{lo:.0%}, {hi:.0%}]")
        lines.append(f"| {task} | {cells[0]} | {cells[1]} |")
    lines.append(
        f"| **mean** | **{rows['off'][0]['mean_success']:.1%}** | "
        f"**{rows['motion'][0]['mean_success']:.1%}** |"
    )
    lines.append(
        f"| training minutes | {rows['off'][1]:.1f} | {rows['motion'][1]:.1f} (incl. flow targets) |"
    )
    table = "\n".join(lines) + "\n"
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(table)
    (out / "summary.json").write_text(json.dumps({k: v[0] for k, v in rows.items()}, indent=2))
    print(table)
    print(
        f"mean success: foresight off {rows['off'][0]['mean_success']:.1%} vs motion "
        f"{rows['motion'][0]['mean_success']:.1%}"
    )


if __name__ == "__main__":
    main()

"""Ablation of the foresight head in the demo's setting: off vs motion vs latent.

One set of demonstrations (the demo's: its task set, cameras, episode count and image
size), one policy per arm trained with the demo's recipe and the same seed — without the
foresight head, with the motion head, with the latent head (each with the settings
given) — evaluated on the same episodes and initial noise (seeds 100000 and up). The
policy reads what the demo's recipe reads (`--state` to change it). Writes a markdown
section to docs/foresight_ablation.md (replacing one of the same title) and prints it.

    python -m bench.foresight_ablation [--eval-episodes 20] [--arms off,motion,latent]
        [--weight 0.1] [--k 4] [--state proprio]

Last line: ``foresight <arm> <x>% vs off <y>% ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from ditvla.contract import load_policy
from ditvla.demo import FULL
from ditvla.envs.collect import collect_demonstrations
from ditvla.envs.evaluate import describe_observation, evaluate
from ditvla.training.trainer import train


def build_parser() -> argparse.ArgumentParser:
    """The bench's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.foresight_ablation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="outputs/foresight_ablation")
    parser.add_argument("--eval-episodes", type=int, default=20, help="per task (20)")
    parser.add_argument("--arms", default="off,motion,latent", help="foresight kinds to train")
    parser.add_argument("--weight", type=float, default=0.1, help="foresight loss weight")
    parser.add_argument("--k", type=int, default=4, help="frames ahead")
    parser.add_argument("--state", default=FULL.train.state, help="the state the policy reads")
    parser.add_argument("--table", default="docs/foresight_ablation.md")
    return parser


def train_and_evaluate(args, store: Path, kind: str) -> tuple[dict, float | None]:
    """One arm: the demo's recipe with foresight ``kind`` (resumed where an earlier run
    left it), evaluated; its summary and its training minutes (None when resumed)."""
    started = time.perf_counter()
    foresight = {"kind": kind, "weight": args.weight, "k": args.k}
    arm_out = Path(args.out) / f"{kind}_w{args.weight:g}_k{args.k}_{args.state}"
    resumed = (arm_out / "checkpoints").exists()  # an interrupted or finished arm goes on
    final = train(
        replace(
            FULL.train,
            dataset=str(store),
            out=str(arm_out),
            resume=resumed,
            state=args.state,
            save_every=FULL.train.steps,
            policy_overrides={**FULL.train.policy_overrides, "foresight": foresight},
        )
    )
    train_minutes = None if resumed else (time.perf_counter() - started) / 60
    report = evaluate(
        load_policy(final),
        FULL.env,
        FULL.evaluate,
        episodes_per_task=args.eval_episodes,
        videos_per_task=0,
    )
    print(f"foresight {kind}:\n{report.markdown()}", flush=True)
    return report.summary(), train_minutes


def markdown_section(args, rows: dict[str, tuple[dict, float | None]]) -> tuple[str, str]:
    """The run's section of the table (its title, and the section under it): the command,
    the setting, and each task's success per arm."""
    first = next(iter(rows.values()))[0]
    title = f"## {describe_observation(first['observation'])}: weight {args.weight:g}, k {args.k}"
    lines = [
        title,
        "",
        f"`python -m bench.foresight_ablation --eval-episodes {args.eval_episodes} --arms "
        f"{args.arms} --weight {args.weight:g} --k {args.k} --state {args.state}` on the 2-core "
        f"CPU: the demo's demonstrations ({FULL.collect.episodes_per_task} per task at "
        f"{FULL.collect.image_size}x{FULL.collect.image_size}) and recipe ({FULL.train.steps} "
        f"steps at batch {FULL.train.batch_size}, lr {FULL.train.lr:g}, seed 0). "
        f"{args.eval_episodes} episodes per task on seeds 100000 and up, the same episodes and "
        "noise for every arm (95% Wilson intervals). Motion: DIS flow of the foresight "
        "camera, 16x16 motion image; latent: the frozen encoder's 4x4 pooled features.",
        "",
        "| task | " + " | ".join(f"foresight={k}" for k in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for task in first["tasks"]:
        cells = []
        for summary, _ in rows.values():
            t = summary["tasks"][task]
            cells.append(f"{t['success_rate']:.0%} [{t['ci95'][0]:.0%}, {t['ci95'][1]:.0%}]")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean** | "
        + " | ".join(f"**{s['mean_success']:.1%}**" for s, _ in rows.values())
        + " |"
    )
    minutes = [f"{m:.1f}" if m is not None else "resumed" for _, m in rows.values()]
    lines.append("| training minutes | " + " | ".join(minutes) + " |")
    return title, "\n".join(lines) + "\n"


def write_section(table: Path, title: str, section: str) -> None:
    """``section`` appended to ``table``, in place of an earlier one of the same title."""
    text = table.read_text() if table.exists() else "# Foresight ablations\n"
    if title in text:  # the same setting measured again: replace its section
        start = text.index(title)
        end = text.find("\n## ", start + 1)
        text = text[:start] + text[end + 1 :] if end >= 0 else text[:start]
    table.write_text(text.rstrip() + "\n\n" + section)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    out = Path(args.out)
    store = out / "demos.zarr"
    if not store.exists():
        collect_demonstrations(FULL.env, store, FULL.collect)
    rows = {kind: train_and_evaluate(args, store, kind) for kind in args.arms.split(",")}
    title, section = markdown_section(args, rows)
    write_section(Path(args.table), title, section)
    (out / "summary.json").write_text(json.dumps({k: v[0] for k, v in rows.items()}, indent=2))
    print(section)
    print(
        "foresight "
        + " vs ".join(
            f"{kind} {summary['mean_success']:.1%}" for kind, (summary, _) in rows.items()
        )
    )


if __name__ == "__main__":
    main()

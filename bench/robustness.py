"""Robustness: a policy's success per perturbation axis and level, against unperturbed.

For a trained policy and the store it was trained on:

1. ``ditvla eval`` unperturbed, then once per axis and level (``--perturb AXIS=LEVEL``,
   :mod:`ditvla.envs.perturbations`): the same episodes (task, seed) and the same initial
   noise every time, so each axis is compared with unperturbed episode by episode;
2. LeRobot's SmolVLA, built offline at the tiny preset's sizes, trained on the same store
   for ``--smolvla-minutes`` (give the policy's own training time, for the same
   wall-clock; 12 by default, the demo's) and evaluated the same way (``--skip-smolvla``
   leaves it out).

Writes ``OUT/results.json``, ``OUT/profile.md`` (the table) and ``OUT/profile.png`` (the
plot: success per axis at each level, a line for unperturbed).

    python -m bench.robustness --policy DIR --store DATA.zarr --env metaworld:TASKS
        [--episodes 20] [--levels medium] [--axes camera,lighting,...]
        [--instruction-tasks TASKS] [--smolvla-minutes 12] [--skip-smolvla] [--resume]

``--instruction-tasks``: the tasks on which the words decide (the demo's colour-reach
tasks); the rewritten-instruction figure is their mean (default: every task).
``--resume``: a profile stopped part-way goes on, each of ditvla's arms keeping the
episodes its folder holds (the same settings; ``ditvla eval --resume``); SmolVLA is
trained again, so its arms run again. Without it, a run replaces the last one's folders.

Last line: ``robustness: unperturbed <u>%, worst axis <axis> <w>% (moderate), rewritten
instructions <p>% vs <q>% as trained; lerobot smolvla unperturbed <s>%, worst <sw>%``
(moderate is the medium level; the instruction figures are at the medium level too).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench.store_runs import trained_smolvla


def profile(
    policy, env: str, axes: list[str], levels: list[str], episodes: int, out: Path, resume: bool
):
    """Each arm's (``""``: unperturbed) evaluation report, by arm; ``resume``: each arm
    keeps the episodes its folder holds and runs the others (else they are replaced)."""
    from ditvla.envs.evaluate import EvalConfig
    from ditvla.envs.robustness import robustness_profile

    config = EvalConfig(
        episodes_per_task=episodes, videos_per_task=0, resume=resume, overwrite=not resume
    )
    reports: dict = {}
    for level in levels:
        reports |= robustness_profile(
            policy,
            env,
            config,
            axes=tuple(axes),
            level=level,
            out=out,
            unperturbed=reports.get(""),
        )
    for arm, report in reports.items():
        print(f"{arm or 'unperturbed'}: {report.summary()['mean_success']:.1%}", flush=True)
    return reports


def mean_over(summary: dict, tasks: list[str] | None) -> float:
    rates = [
        t["success_rate"] for name, t in summary["tasks"].items() if not tasks or name in tasks
    ]
    return sum(rates) / len(rates)


def table(reports: dict[str, dict], names: list[str]) -> str:
    """The policies' profiles side by side (reports by policy name, then by arm)."""
    from ditvla.envs.evaluate import wilson_interval
    from ditvla.envs.robustness import success

    header = "| perturbation | " + " | ".join(names) + " |"
    rows = [header, "|---" * (len(names) + 1) + "|"]
    for arm in reports[names[0]]:
        cells = []
        for name in names:
            wins, n = success(reports[name][arm])
            lo, hi = wilson_interval(wins, n)
            cells.append(f"{wins / n:.1%} ({lo:.0%}-{hi:.0%}, {n} episodes)")
        rows.append(f"| {arm or 'none'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict[str, dict], axes: list[str], levels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(1.2 * len(axes) + 3, 4))
    width = 0.8 / (len(results) * len(levels))
    for i, (name, arms) in enumerate(results.items()):
        for j, level in enumerate(levels):
            offset = (i * len(levels) + j) * width
            rates = [arms.get(f"{axis}={level}", {}).get("mean_success", 0) for axis in axes]
            ax.bar([k + offset for k in range(len(axes))], rates, width, label=f"{name} {level}")
        ax.axhline(arms[""]["mean_success"], ls="--", lw=1, color=f"C{i}", label=f"{name} none")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(axes))], axes)
    ax.set_ylabel("success")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    from ditvla.envs.perturbations import AXES, LEVELS
    from ditvla.envs.robustness import MODERATE

    parser = argparse.ArgumentParser(
        prog="python -m bench.robustness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", required=True, help="the trained policy's folder")
    parser.add_argument("--store", required=True, help="the store it was trained on")
    parser.add_argument("--env", required=True, help="SUITE:TASKS to evaluate on")
    parser.add_argument("--out", default="outputs/robustness")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task")
    parser.add_argument("--levels", default=MODERATE, help="comma-separated: small,medium,large")
    parser.add_argument("--axes", default=",".join(AXES), help="comma-separated axes")
    parser.add_argument("--instruction-tasks", default="", help="where the words decide")
    parser.add_argument("--smolvla-minutes", type=float, default=12.0)
    parser.add_argument("--skip-smolvla", action="store_true")
    parser.add_argument(
        "--resume", action="store_true", help="keep the episodes ditvla's arms already ran"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ditvla.contract import load_policy

    axes = [a for a in args.axes.split(",") if a]
    levels = [level for level in args.levels.split(",") if level]
    unknown = [level for level in levels if level not in LEVELS]
    if unknown or not levels:
        parser.error(f"--levels: {', '.join(unknown) or 'none'}; valid: {', '.join(LEVELS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = {
        "ditvla": profile(
            load_policy(args.policy), args.env, axes, levels, args.episodes, out, args.resume
        )
    }
    if not args.skip_smolvla:
        budget = args.smolvla_minutes * 60
        with trained_smolvla(Path(args.store), args.policy, budget) as (smolvla, _):
            reports["lerobot smolvla"] = profile(
                smolvla, args.env, axes, levels, args.episodes, out / "smolvla", resume=False
            )
    results = {
        name: {arm: report.summary() for arm, report in arms.items()}
        for name, arms in reports.items()
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = table(reports, list(reports))
    (out / "profile.md").write_text(markdown + "\n")
    plot(results, axes, levels, out / "profile.png")
    print(markdown)

    def worst(arms: dict) -> tuple[str, float]:
        moderate = {a: s["mean_success"] for a, s in arms.items() if a.endswith(f"={MODERATE}")}
        axis = min(moderate, key=moderate.get, default="none")
        return axis.split("=")[0], moderate.get(axis, float("nan"))

    ours = results["ditvla"]
    axis, low = worst(ours)
    said = [t for t in args.instruction_tasks.split(",") if t] or None
    reworded = ours.get(f"instruction={MODERATE}")
    words = (
        f"{mean_over(reworded, said):.1%} vs {mean_over(ours[''], said):.1%} as trained"
        if reworded
        else "not measured"
    )
    peer = "not run"
    if "lerobot smolvla" in results:
        theirs = results["lerobot smolvla"]
        peer = f"unperturbed {theirs['']['mean_success']:.1%}, worst {worst(theirs)[1]:.1%}"
    print(
        f"robustness: unperturbed {ours['']['mean_success']:.1%}, worst axis {axis} {low:.1%} "
        f"(moderate), rewritten instructions {words}; lerobot smolvla {peer}"
    )


if __name__ == "__main__":
    main()

"""Does the policy act from pixels, proprioception and words? The demo's VLA setting, probed.

1. The demo's demonstrations (``ditvla demo``'s task set and cameras; collected when
   missing) and the demo's training run: the policy reads camera frames, the
   instruction and proprioception only (no object poses, no goal). Its wall-clock is the
   budget.
2. Evaluated on the same episodes (seeds 100000 up) three times: as is; with every camera
   frame blanked; with each episode's instruction swapped for another task's of the set
   (fixed by the episode's seed). The instruction-decides suite (colour-reach: one scene,
   three instructions) is reported apart.
3. LeRobot's SmolVLA, built offline at the tiny preset's sizes, everything trained, with
   its own processors and optimizer/scheduler presets, trained on the same store and the
   same observations for the same wall-clock, evaluated by the same evaluator on the same
   episodes.

Writes ``docs/vla_setting.md`` (table) and ``OUT/results.json``.

    python -m bench.vla_setting [--episodes 50] [--out outputs/vla_setting]

Last line: ``vla setting: success <x>%, blank images <y>%, shuffled instructions <z>%
(instruction-decides suite: <w>% vs shuffled <v>%); lerobot smolvla <s>%``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.lerobot_adapter import LeRobotAdapter
from bench.lerobot_batches import batches_for_lerobot
from bench.lerobot_training import train_for
from bench.smolvla_peer import tiny_smolvla


def suite_mean(summary: dict, tasks) -> float:
    return float(np.mean([summary["tasks"][t]["success_rate"] for t in tasks]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.vla_setting",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="outputs/vla_setting")
    parser.add_argument("--store", help="the demo's demonstrations (collected when missing)")
    parser.add_argument("--episodes", type=int, default=50, help="per task")
    parser.add_argument("--policy", help="a finished demo-recipe policy (then --budget-s)")
    parser.add_argument("--budget-s", type=float, help="the training seconds it took")
    parser.add_argument("--skip-smolvla", action="store_true")
    parser.add_argument("--table", default="docs/vla_setting.md")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ditvla.contract import load_policy
    from ditvla.demo import FULL
    from ditvla.envs.collect import collect_demonstrations
    from ditvla.envs.evaluate import describe_observation, evaluate
    from ditvla.envs.metaworld_env import COLOUR_REACH
    from ditvla.training.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(args.store) if args.store else out / "demos.zarr"
    if not store.exists():
        collect_demonstrations(FULL.env, store, FULL.collect)
    if args.policy:
        policy_dir, budget = Path(args.policy), args.budget_s
    else:
        start = time.perf_counter()
        policy_dir = train(replace(FULL.train, dataset=str(store), out=str(out / "ditvla")))
        budget = time.perf_counter() - start
    print(f"ditvla: trained in {budget / 60:.1f} min (the budget)", flush=True)
    policy = load_policy(policy_dir)
    evaluation = replace(FULL.evaluate, episodes_per_task=args.episodes, videos_per_task=0)
    results = {"budget_s": budget}
    for probe in ("none", "blank_images", "shuffled_instructions"):
        report = evaluate(policy, FULL.env, evaluation, probe=probe)
        results[probe] = report.summary()
        print(f"ditvla, probe {probe}:\n{report.markdown()}", flush=True)

    if not args.skip_smolvla:
        spec = policy.spec
        with tempfile.TemporaryDirectory() as folder:
            data = load_data_spec(store, spec)
            smolvla, pre, post = tiny_smolvla(
                Path(folder), data, horizon=spec.horizon, n_action_steps=spec.n_action_steps
            )
            results["smolvla_training"] = train_for(
                smolvla,
                pre,
                batches_for_lerobot(store, spec, batch_size=FULL.train.batch_size),
                budget,
                name="lerobot smolvla",
            )
            adapter = LeRobotAdapter(smolvla, pre, post, spec, reads_task=True)
            report = evaluate(adapter, FULL.env, evaluation)
            results["smolvla"] = report.summary()
            print(f"lerobot smolvla:\n{report.markdown()}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    x = results["none"]["mean_success"]
    y = results["blank_images"]["mean_success"]
    z = results["shuffled_instructions"]["mean_success"]
    w = suite_mean(results["none"], COLOUR_REACH)
    v = suite_mean(results["shuffled_instructions"], COLOUR_REACH)
    s = results["smolvla"]["mean_success"] if "smolvla" in results else float("nan")
    command = shlex.join(["python", "-m", "bench.vla_setting", *argv])
    observation = describe_observation(results["none"]["observation"])
    write_table(Path(args.table), results, args, observation, command)
    print(
        f"vla setting: success {x:.1%}, blank images {y:.1%}, shuffled instructions {z:.1%} "
        f"(instruction-decides suite: {w:.1%} vs shuffled {v:.1%}); lerobot smolvla {s:.1%}"
    )


def load_data_spec(store: Path, spec):
    from ditvla.datasets.torch_dataset import ReplayBufferDataset

    return ReplayBufferDataset(store, cameras=spec.cameras, state_keys=spec.state_keys).data_spec()


def write_table(path: Path, results: dict, args, observation: str, command: str) -> None:
    """The arms' table under the command that measured it, written to ``path`` and printed."""
    arms = [
        ("ditvla", results["none"]),
        ("ditvla, blank images", results["blank_images"]),
        ("ditvla, shuffled instructions", results["shuffled_instructions"]),
    ]
    if "smolvla" in results:
        arms.append(("lerobot smolvla, same budget", results["smolvla"]))
    from ditvla.demo import DEMO_TASKS

    tasks = sorted(results["none"]["tasks"], key=DEMO_TASKS.index)  # in the demo's order
    lines = [
        "# The VLA setting: pixels, proprioception and words",
        "",
        f"`{command}` on the 2-core CPU. The policy "
        f"read: {observation}. Training budget {results['budget_s'] / 60:.1f} minutes (the "
        f"demo's run); {args.episodes} episodes per task on seeds 100000 and up, the same "
        "episodes and initial noise for every arm (95% Wilson intervals).",
        "",
        "| task | " + " | ".join(name for name, _ in arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for task in tasks:
        cells = []
        for _, summary in arms:
            t = summary["tasks"][task]
            cells.append(f"{t['success_rate']:.0%} [{t['ci95'][0]:.0%}, {t['ci95'][1]:.0%}]")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean** | " + " | ".join(f"**{s['mean_success']:.1%}**" for _, s in arms) + " |"
    )
    if "smolvla_training" in results:
        t = results["smolvla_training"]
        lines += [
            "",
            f"SmolVLA trained {t['steps']} steps in {t['seconds'] / 60:.1f} minutes (final loss "
            f"{t['loss_last']:.3f}).",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

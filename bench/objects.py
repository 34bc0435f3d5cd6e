"""Seeing small things: pick, place and push from pixels, against LeRobot's SmolVLA.

Every policy reads two cameras, the instruction and proprioception only (no object
poses, no goal: those are privileged simulator state, used at training time as the
auxiliary head's targets and never read when acting). For each suite:

1. scripted demonstrations (collected, or finished when interrupted; a store of another
   collection is refused): Meta-World MT10 (200 per task, with detours: four times the
   demo's count, the one lever that moved push and pick-place in
   docs/benchmarks.md "Seeing small things"), robosuite Lift (40) and PickPlaceCan (100:
   at 40 it stayed at 75%), a store per task;
2. ``ditvla train`` with the recipe this bench measures (:data:`RECIPE`: the demo's
   settings, every privileged array as an auxiliary target; and :data:`OBJECT_LEVERS`:
   the target's prediction conditions the action head, pooled by attention; the tiny
   preset's own eyes, the frozen ImageNet-pretrained EfficientNet-Lite0) on each store,
   its wall-clock recorded (the budget: at most 30 minutes per suite on the 2-core CPU);
3. ``ditvla eval``, 20 episodes per task on seeds 100000 and up;
4. LeRobot's SmolVLA, built offline at the tiny preset's sizes and trained on the MT10 store
   for the same wall-clock, evaluated by the same evaluator on the same episodes.

Writes ``OUT/results.json`` (as each part ends, with its wall-clock: collection, training
and evaluation) and a table per suite. ``--keep`` reuses the parts ``OUT/results.json``
already holds and runs only the others, so the suites can run apart (one a day, or one per
core) and still end in one report; the minutes on the last line add up every part's
recorded wall-clock.

    python -m bench.objects [--out outputs/objects] [--suites mt10,robosuite] [--skip-smolvla] [--keep]

Last line: ``objects from pixels: mt10 <m>% (push <p>%, pick-place <q>%), robosuite lift
<l>%, can <c>%; lerobot smolvla mt10 <s>%; <minutes> min``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.store_runs import (
    OBJECT_LEVERS,
    RECIPE,
    Store,
    Suite,
    collected,
    smolvla_arm,
    success,
    train_and_evaluate,
)

META_WORLD_CAMERAS = ("corner3", "behindGripper")
ROBOSUITE_CAMERAS = ("agentview", "robot0_eye_in_hand")
SUITES = {
    "mt10": Suite(
        "mt10",
        (Store("mt10", "metaworld:MT10", 200, META_WORLD_CAMERAS, 64, detour_steps=20),),
        train={**RECIPE, "steps": 8000, "policy_overrides": OBJECT_LEVERS},
    ),
    "robosuite": Suite(
        "robosuite",
        (
            Store("lift", "robosuite:Lift", 40, ROBOSUITE_CAMERAS, 128),
            # 100: 85% (64-95) where 40 gave 75% (docs/benchmarks.md)
            Store("can", "robosuite:PickPlaceCan", 100, ROBOSUITE_CAMERAS, 128),
        ),
        train={**RECIPE, "steps": 4000, "policy_overrides": OBJECT_LEVERS},
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.objects",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="outputs/objects")
    parser.add_argument("--suites", default="mt10,robosuite", help="mt10, robosuite")
    parser.add_argument("--episodes", type=int, default=20, help="evaluation episodes per task")
    parser.add_argument("--skip-smolvla", action="store_true")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="reuse the parts (a store's policy, the SmolVLA arm) that OUT/results.json "
        "holds; run only the others",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = kept_results(out / "results.json") if args.keep else {}
    for name in args.suites.split(","):
        suite = SUITES[name]
        for store in suite.stores:
            if store.name not in results:
                start = time.perf_counter()
                path = collected(store, out)
                result = train_and_evaluate(store, path, suite, out, args.episodes)
                results[store.name] = {**result, "wall_s": time.perf_counter() - start}
                save_results(out / "results.json", results)
            if store.name == "mt10" and not args.skip_smolvla and "smolvla" not in results:
                start = time.perf_counter()
                result = smolvla_arm(
                    out / f"{store.name}.zarr",
                    results["mt10"]["policy"],
                    store.env,
                    results["mt10"]["train_s"],
                    args.episodes,
                )
                results["smolvla"] = {**result, "wall_s": time.perf_counter() - start}
                save_results(out / "results.json", results)
    minutes = sum(part.get("wall_s", 0.0) for part in results.values()) / 60
    parts = []
    if "mt10" in results:
        mt10 = results["mt10"]
        parts.append(
            f"mt10 {success(mt10):.1%} (push {success(mt10, 'push-v3'):.0%}, pick-place "
            f"{success(mt10, 'pick-place-v3'):.0%})"
        )
    if "lift" in results:
        parts.append(
            f"robosuite lift {success(results['lift']):.0%}, can {success(results['can']):.0%}"
        )
    smolvla = f"{success(results['smolvla']):.1%}" if "smolvla" in results else "not run"
    print(
        f"objects from pixels: {', '.join(parts)}; lerobot smolvla mt10 {smolvla}; {minutes:.0f} min"
    )


def kept_results(path: Path) -> dict:
    """The parts an earlier run recorded in ``path`` (none if it does not exist)."""
    if not path.exists():
        return {}
    results = json.loads(path.read_text())
    print(f"kept from {path}: {', '.join(results) or 'nothing'}", flush=True)
    return results


def save_results(path: Path, results: dict) -> None:
    """Write ``results`` whole to a temporary file, then into place: an interrupted run
    leaves the last complete file, which ``--keep`` reads."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(path)


if __name__ == "__main__":
    main()

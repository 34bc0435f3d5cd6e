"""LIBERO end to end on this CPU: scripted experts, training, the official protocol.

For one suite (object, spatial or goal):

1. the scripted experts under the official protocol (``ditvla eval --policy expert``, the
   50 stored init states per task): what the demonstrations can be at best;
2. demonstrations from the experts (collected, or an interrupted collection finished; a
   store of another collection is refused), each episode's start drawn
   from the task's BDDL regions with its seed, never one of the 50 evaluation starts;
   detours at the start and pushes in mid-task (``ditvla collect --detour-steps 10
   --push-rate 0.05``), each recovered from by the expert; with ``--randomize``, each
   demonstration's cameras and placements randomised from its seed (in
   ``OUT/<suite>_<axis>-<level>...``);
   two cameras (agentview, eye_in_hand) at 64 px, the 8-D proprioception, the
   instruction, LIBERO's object states recorded as privileged arrays;
3. ``ditvla train`` (float32) with :data:`RECIPE` and :data:`OBJECT_LEVERS`, as ``bench.objects``
   trains MT10 (the tiny preset and its frozen eyes, the demo's settings, the object states
   as the auxiliary head's targets, read at training time and never acting; the auxiliary
   prediction conditions the head, pooled by attention);
4. ``ditvla eval`` under the official protocol (50 episodes per task on the init states);
5. LeRobot's SmolVLA, built offline at the tiny preset's sizes and trained on the same
   store for the same wall-clock, evaluated by the same evaluator on the same episodes.

The policy reads the two cameras, proprioception only (ee_pos, ee_ori, gripper_states)
and the instruction. Writes ``OUT/results.json``.

    python -m bench.libero --suite object [--out outputs/libero] [--tasks 0,3]
        [--demos 50] [--steps 8000] [--episodes 50] [--randomize camera=small,layout=small]
        [--skip-smolvla]

Last line: ``libero <suite>: ditvla <x>% (weakest task <m>%), lerobot smolvla <s>%,
experts <e>%; <minutes> min``.
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
    collect_config,
    collected,
    smolvla_arm,
    success,
    train_and_evaluate,
)
from ditvla.errors import ConfigError

CAMERAS = ("agentview", "eye_in_hand")
IMAGE_SIZE = 64
DETOUR_STEPS = 10
# pushes in mid-task, each recovered from by the expert: on LIBERO-Object the policy went
# from 80.0% to 98.0% over 200 paired episodes (docs/libero.md, "Pushes in mid-task")
PUSH_RATE = 0.05


def expert_success(env: str, out: Path, episodes: int) -> dict:
    """The scripted experts under the official protocol."""
    from ditvla.envs.baselines import ExpertPolicy
    from ditvla.envs.evaluate import evaluate

    report = evaluate(
        ExpertPolicy(), env, out=out / "experts", episodes_per_task=episodes, overwrite=True
    )
    print(f"experts:\n{report.markdown()}", flush=True)
    return {"eval": report.summary()}


def randomized_suffix(randomize: str) -> str:
    """``_camera-small_layout-small`` for ``camera=small,layout=small`` (in either order):
    a randomised run's folder beside the plain one's, so that neither replaces the other."""
    from ditvla.envs.perturbations import Perturbation

    name = Perturbation.parse(randomize).name()
    return "".join(f"_{level.replace('=', '-')}" for level in name.split(",") if level)


def weakest(result: dict) -> tuple[str, float]:
    tasks = result["eval"]["tasks"]
    name = min(tasks, key=lambda t: tasks[t]["success_rate"])
    return name, tasks[name]["success_rate"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.libero",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", required=True, choices=("object", "spatial", "goal"))
    parser.add_argument("--out", default="outputs/libero")
    parser.add_argument("--tasks", default="", help="task indices (default: all ten)")
    parser.add_argument("--demos", type=int, default=50, help="demonstrations per task")
    parser.add_argument("--steps", type=int, default=8000, help="training steps")
    parser.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task")
    parser.add_argument(
        "--randomize",
        default="",
        metavar="AXIS=LEVEL[,...]",
        help="domain randomisation at collection, as `ditvla collect --randomize` (what "
        "it bought on LIBERO-Spatial: docs/robustness.md); the store and results are named "
        "after it; default: none",
    )
    parser.add_argument("--skip-smolvla", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = [f"{args.suite}/{i.strip()}" for i in args.tasks.split(",") if i.strip()]
    env = "libero:" + (",".join(tasks) if tasks else args.suite)
    store = Store(
        f"libero_{args.suite}",
        env,
        args.demos,
        CAMERAS,
        IMAGE_SIZE,
        detour_steps=DETOUR_STEPS,
        push_rate=PUSH_RATE,
        randomize=args.randomize,
    )
    suite = Suite(
        args.suite,
        (store,),
        # float32: every LIBERO policy measured in docs/libero.md trained in it (bfloat16,
        # `auto`'s choice on CPUs with AVX512-BF16, is unmeasured here)
        train={
            **RECIPE,
            "steps": args.steps,
            "policy_overrides": OBJECT_LEVERS,
            "precision": "float32",
        },
    )
    try:  # a bad --randomize fails now, not after the experts' evaluation
        collect_config(store)
    except ConfigError as error:
        parser.error(str(error))
    out = Path(args.out) / (args.suite + randomized_suffix(args.randomize))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"randomize": args.randomize, "experts": expert_success(env, out, args.episodes)}
    path = collected(store, out)
    results["ditvla"] = train_and_evaluate(store, path, suite, out, args.episodes)
    if not args.skip_smolvla:
        results["smolvla"] = smolvla_arm(
            path, results["ditvla"]["policy"], env, results["ditvla"]["train_s"], args.episodes
        )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    minutes = (time.perf_counter() - start) / 60
    task, rate = weakest(results["ditvla"])
    smolvla = f"{success(results['smolvla']):.1%}" if "smolvla" in results else "not run"
    print(
        f"libero {args.suite}: ditvla {success(results['ditvla']):.1%} (weakest task {task} "
        f"{rate:.0%}), lerobot smolvla {smolvla}, experts {success(results['experts']):.1%}; "
        f"{minutes:.0f} min"
    )


if __name__ == "__main__":
    main()

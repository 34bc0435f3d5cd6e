"""Seeing small things: pick, place and push from pixels, against LeRobot's SmolVLA.

Every policy reads two cameras, the instruction and proprioception only (no object
poses, no goal: those are privileged simulator state, used at training time as the
auxiliary head's targets and never read when acting). For each suite:

1. scripted demonstrations (collected when missing): Meta-World MT10 (200 per task, with
   detours: four times the demo's count, the one lever that moved push and pick-place in
   docs/benchmarks.md "Seeing small things"), robosuite Lift and PickPlaceCan (40 per task,
   a store per task: their privileged arrays differ in size);
2. ``ditvla train`` with the recipe this bench measures (:data:`RECIPE`: the demo's
   settings, every privileged array as an auxiliary target) on each store, its wall-clock
   recorded (the budget: at most 30 minutes per suite on the 2-core CPU);
3. ``ditvla eval``, 20 episodes per task on seeds 100000 and up;
4. LeRobot's SmolVLA, built offline at the tiny preset's sizes and trained on the MT10 store
   for the same wall-clock, evaluated by the same evaluator on the same episodes.

Writes ``OUT/results.json`` and a table per suite.

    python -m bench.objects [--out outputs/objects] [--suites mt10,robosuite] [--skip-smolvla]

Last line: ``objects from pixels: mt10 <m>% (push <p>%, pick-place <q>%), robosuite lift
<l>%, can <c>%; lerobot smolvla mt10 <s>%; <minutes> min``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.lerobot_adapter import LeRobotAdapter
from bench.lerobot_batches import batches_for_lerobot
from bench.lerobot_training import train_for
from bench.smolvla_peer import tiny_smolvla


@dataclass(frozen=True)
class Store:
    """One store of demonstrations and the environment its policy is evaluated on."""

    name: str
    env: str
    episodes_per_task: int
    cameras: tuple[str, ...]
    image_size: int
    detour_steps: int = 0


@dataclass(frozen=True)
class Suite:
    name: str
    stores: tuple[Store, ...]
    train: dict = field(default_factory=dict)  # TrainConfig fields over ditvla's defaults


# the demo's training settings, with every privileged array the store records (object
# poses, the goal) as the auxiliary head's targets: read at training time, never acting
RECIPE = {"batch_size": 32, "lr": 1e-3, "auxiliary": "privileged"}
META_WORLD_CAMERAS = ("corner3", "behindGripper")
ROBOSUITE_CAMERAS = ("agentview", "robot0_eye_in_hand")
SUITES = {
    "mt10": Suite(
        "mt10",
        (Store("mt10", "metaworld:MT10", 200, META_WORLD_CAMERAS, 64, detour_steps=20),),
        train={**RECIPE, "steps": 8000},
    ),
    "robosuite": Suite(
        "robosuite",
        (
            Store("lift", "robosuite:Lift", 40, ROBOSUITE_CAMERAS, 128),
            Store("can", "robosuite:PickPlaceCan", 40, ROBOSUITE_CAMERAS, 128),
        ),
        train={**RECIPE, "steps": 4000},
    ),
}


def collected(store: Store, out: Path) -> Path:
    from ditvla.envs.collect import CollectConfig, collect_demonstrations

    path = out / f"{store.name}.zarr"
    if not path.exists():
        config = CollectConfig(
            episodes_per_task=store.episodes_per_task,
            cameras=store.cameras,
            image_size=store.image_size,
            detour_steps=store.detour_steps,
        )
        collect_demonstrations(store.env, path, config)
    return path


def train_and_evaluate(store: Store, path: Path, suite: Suite, out: Path, episodes: int) -> dict:
    """``ditvla train`` (defaults + the suite's fields) and ``ditvla eval`` of one store."""
    from ditvla.contract import load_policy
    from ditvla.envs.evaluate import evaluate
    from ditvla.training.trainer import TrainConfig, train

    config = TrainConfig(dataset=str(path), out=str(out / store.name), num_workers=0, **suite.train)
    start = time.perf_counter()
    policy_dir = train(config)
    seconds = time.perf_counter() - start
    print(f"{store.name}: trained in {seconds / 60:.1f} min", flush=True)
    report = evaluate(
        load_policy(policy_dir),
        store.env,
        out=out / f"{store.name}_eval",
        episodes_per_task=episodes,
        videos_per_task=1,
    )
    print(report.markdown(), flush=True)
    return {"train_s": seconds, "policy": str(policy_dir), "eval": report.summary()}


def smolvla_arm(path: Path, policy_dir: str, env: str, budget_s: float, episodes: int) -> dict:
    """SmolVLA at the tiny preset's sizes, trained on the same store for ``budget_s``."""
    from ditvla.contract import load_policy
    from ditvla.datasets.torch_dataset import ReplayBufferDataset
    from ditvla.envs.evaluate import evaluate
    from ditvla.training.trainer import TrainConfig

    spec = load_policy(policy_dir).spec
    data = ReplayBufferDataset(path, cameras=spec.cameras, state_keys=spec.state_keys).data_spec()
    with tempfile.TemporaryDirectory() as folder:
        smolvla, pre, post = tiny_smolvla(
            Path(folder), data, horizon=spec.horizon, n_action_steps=spec.n_action_steps
        )
        batches = batches_for_lerobot(path, spec, batch_size=TrainConfig.batch_size)
        training = train_for(smolvla, pre, batches, budget_s, name="lerobot smolvla")
        adapter = LeRobotAdapter(smolvla, pre, post, spec, reads_task=True)
        report = evaluate(adapter, env, episodes_per_task=episodes, videos_per_task=0)
    print(f"lerobot smolvla:\n{report.markdown()}", flush=True)
    return {"training": training, "eval": report.summary()}


def success(result: dict, task: str | None = None) -> float:
    summary = result["eval"]
    return summary["mean_success"] if task is None else summary["tasks"][task]["success_rate"]


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
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    start = time.perf_counter()
    for name in args.suites.split(","):
        suite = SUITES[name]
        for store in suite.stores:
            path = collected(store, out)
            results[store.name] = train_and_evaluate(store, path, suite, out, args.episodes)
            if store.name == "mt10" and not args.skip_smolvla:
                results["smolvla"] = smolvla_arm(
                    path,
                    results["mt10"]["policy"],
                    store.env,
                    results["mt10"]["train_s"],
                    args.episodes,
                )
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    minutes = (time.perf_counter() - start) / 60
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


if __name__ == "__main__":
    main()

"""Shared steps of the simulator benches (objects, libero): collect a store (or finish an
interrupted collection; a store of another collection is refused), train a policy on it
with ``ditvla train`` and evaluate it with ``ditvla eval``, and train LeRobot's SmolVLA on
the same store for the same wall-clock."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.lerobot_adapter import LeRobotAdapter
from bench.lerobot_batches import batches_for_lerobot
from bench.lerobot_training import train_for
from bench.smolvla_peer import tiny_smolvla

if TYPE_CHECKING:
    from ditvla.envs.collect import CollectConfig


@dataclass(frozen=True)
class Store:
    """One store of demonstrations and the environment its policy is evaluated on."""

    name: str
    env: str
    episodes_per_task: int
    cameras: tuple[str, ...]
    image_size: int
    detour_steps: int = 0
    push_rate: float = 0.0
    randomize: str = ""  # domain randomisation at collection (``ditvla collect --randomize``)


@dataclass(frozen=True)
class Suite:
    name: str
    stores: tuple[Store, ...]
    train: dict = field(default_factory=dict)  # TrainConfig fields over ditvla's defaults


# the demo's training settings, with every privileged array the store records (object
# poses, the goal) as the auxiliary head's targets: read at training time, never acting
RECIPE = {"batch_size": 32, "lr": 1e-3, "auxiliary": "privileged"}

# the levers measured to help in docs/benchmarks.md "Seeing small things": the auxiliary
# head's prediction conditions the action head (r8), the head pools by attention (r11)
OBJECT_LEVERS = {
    "auxiliary_input": True,
    "auxiliary_pooling": "attention",
}


def collect_config(store: Store) -> CollectConfig:
    """The store's collection settings, checked (a bad ``randomize`` fails here)."""
    from ditvla.envs.collect import CollectConfig

    return CollectConfig(
        episodes_per_task=store.episodes_per_task,
        cameras=store.cameras,
        image_size=store.image_size,
        detour_steps=store.detour_steps,
        push_rate=store.push_rate,
        randomize=store.randomize,
        resume=True,  # a store of this collection is finished or kept; another is refused
    )


def collected(store: Store, out: Path) -> Path:
    from ditvla.envs.collect import collect_demonstrations

    path = out / f"{store.name}.zarr"
    collect_demonstrations(store.env, path, collect_config(store))
    return path


def train_and_evaluate(store: Store, path: Path, suite: Suite, out: Path, episodes: int) -> dict:
    """``ditvla train`` (defaults + the suite's fields) and ``ditvla eval`` of one store."""
    from ditvla.contract import load_policy
    from ditvla.envs.evaluate import evaluate
    from ditvla.training.trainer import TrainConfig, train

    config = TrainConfig(
        dataset=str(path),
        out=str(out / store.name),
        num_workers=0,
        overwrite=True,  # each run of the bench trains again
        **suite.train,
    )
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
        overwrite=True,  # the policy was trained again: its last evaluation is replaced
    )
    print(report.markdown(), flush=True)
    return {"train_s": seconds, "policy": str(policy_dir), "eval": report.summary()}


@contextlib.contextmanager
def trained_smolvla(path: Path, policy_dir: str, budget_s: float) -> Iterator[tuple[Any, dict]]:
    """SmolVLA at the tiny preset's sizes, trained on the store at ``path`` for
    ``budget_s`` seconds, reading what the policy in ``policy_dir`` reads: (a policy the
    evaluator runs, its training record), for the ``with`` block."""
    from ditvla.contract import load_policy
    from ditvla.datasets.torch_dataset import ReplayBufferDataset
    from ditvla.training.trainer import TrainConfig

    spec = load_policy(policy_dir).spec
    data = ReplayBufferDataset(path, cameras=spec.cameras, state_keys=spec.state_keys).data_spec()
    with tempfile.TemporaryDirectory() as folder:
        smolvla, pre, post = tiny_smolvla(
            Path(folder), data, horizon=spec.horizon, n_action_steps=spec.n_action_steps
        )
        batches = batches_for_lerobot(path, spec, batch_size=TrainConfig.batch_size)
        training = train_for(smolvla, pre, batches, budget_s, name="lerobot smolvla")
        yield LeRobotAdapter(smolvla, pre, post, spec, reads_task=True), training


def smolvla_arm(path: Path, policy_dir: str, env: str, budget_s: float, episodes: int) -> dict:
    """SmolVLA at the tiny preset's sizes, trained on the same store for ``budget_s``."""
    from ditvla.envs.evaluate import evaluate

    with trained_smolvla(path, policy_dir, budget_s) as (adapter, training):
        report = evaluate(adapter, env, episodes_per_task=episodes, videos_per_task=0)
    print(f"lerobot smolvla:\n{report.markdown()}", flush=True)
    return {"training": training, "eval": report.summary()}


def success(result: dict, task: str | None = None) -> float:
    summary = result["eval"]
    return summary["mean_success"] if task is None else summary["tasks"][task]["success_rate"]

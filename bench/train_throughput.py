"""Training samples/s: our tiny policy against LeRobot's SmolVLA at matched size.

Both train end to end (vision encoder, language model and action head/expert; SmolVLA's
defaults freeze all but the expert, so they are switched off here) by flow matching on
the same batches, with one exception LeRobot keeps: the last layer of SmolVLA's language
model stays frozen (its expert reads that layer's keys and values, not its output), so
its weights take no gradient, where all of ours train. Both pad a batch's instructions
to its longest. The batches: one 64x64 camera, an 8-D state, the instruction, 16x7
action chunks, batch 32, AdamW as each project's training builds it (``ditvla train``'s
on PyTorch's fused kernel, LeRobot's on PyTorch's default, a loop per parameter on the
CPU). Matched size: SmolVLA's VLM is a SmolVLM2-style model built offline with our tiny
preset's dimensions (text width 128, 2 layers; vision width 96, 2 layers, 8-px patches)
and its expert at the VLM's width (multiplier 1.0, 2 layers), against our tiny preset
(the same VLM sizes, a 2-block DiT head of width 128). Batches are drawn once from a
zarr store and given to both in turn, so data loading is not timed. Both compute in
the same precision: ``--precision``, by default what ``ditvla train`` computes in here
(``auto``: bfloat16 autocast where the CPU has it natively, else float32); LeRobot's
training takes the same autocast with its ``use_amp``.

The demo's recipe is measured beside it: two 64x64 cameras, a 4-D state, the goal
position as the auxiliary head's target (what ``ditvla demo`` trains; it does not
augment), 16x4 chunks, the demo's TrainConfig turned into a policy and its training
samples by ``ditvla train``'s own code; SmolVLA reads the same two cameras, state and
chunks (it has no auxiliary head: that work is ours alone, and counted).

    python -m bench.train_throughput [--steps 20] [--precision auto|float32|bfloat16]
        [--eyes] [--profile] [--levers]

``--eyes``: the frozen eyes' forward on the demo batches' frames as timm's network runs
it, as the policy runs it (batch norms folded into the convolutions, channels-last) and
that under bfloat16 autocast. ``--profile``: the demo recipe's step by part for both
policies (forward by module, the backward pass, the optimizer), the two steps taken in
turn. ``--levers``: the demo recipe's step (with ``ditvla train``'s gradient clipping,
EMA and fused AdamW) under each lever (AdamW's loop per parameter or foreach, bfloat16
autocast, one thread, no EMA), all taken in turn, as ratios to today's step.

The demo's recipe is measured twice: as each step's frames first meet the frozen eyes,
and with their tokens kept (``ditvla train``'s default without augmentation on the CPU:
every timed frame seen before, as most are late in a run; the whole run's gain is in
docs/benchmarks.md, "Frozen eyes' tokens kept").

Last line: ``training throughput: ditvla <x> samples/s vs lerobot smolvla <y> samples/s
(demo recipe: <x2> vs <y2>; its frames' tokens kept: <x3> vs <y3>)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.smolvla_peer import tiny_smolvla

BATCH, HORIZON, ACTION_DIM, STATE_DIM, IMAGE = 32, 16, 7, 8, 64
DEMO_ACTION_DIM, DEMO_STATE_DIM = 4, 4  # Meta-World's


def write_store(path: Path) -> None:
    from ditvla.datasets.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.create(path, fps=10, cameras=["cam"], overwrite=True)
    rng = np.random.default_rng(0)
    for e in range(6):
        buffer.append_episode(
            {
                "cam": rng.integers(0, 256, (50, IMAGE, IMAGE, 3), dtype=np.uint8),
                "state": rng.normal(size=(50, STATE_DIM)),
                "action": rng.normal(size=(50, ACTION_DIM)),
            },
            task=f"t{e}",
            instruction=f"pick up the block number {e}",
        )


def write_demo_store(path: Path) -> None:
    """A store shaped like the demo's: its two cameras, proprioception, the goal."""
    from ditvla.datasets.replay_buffer import ReplayBuffer
    from ditvla.demo import DEMO_CAMERAS

    buffer = ReplayBuffer.create(
        path,
        fps=80,
        cameras=list(DEMO_CAMERAS),
        state_keys=["proprio"],
        privileged_keys=["goal"],
        overwrite=True,
    )
    rng = np.random.default_rng(1)
    for e in range(6):
        episode = {
            cam: rng.integers(0, 256, (50, IMAGE, IMAGE, 3), dtype=np.uint8) for cam in DEMO_CAMERAS
        }
        episode["proprio"] = rng.normal(size=(50, DEMO_STATE_DIM))
        episode["goal"] = rng.normal(size=(50, 3))
        episode["action"] = rng.uniform(-1, 1, size=(50, DEMO_ACTION_DIM))
        buffer.append_episode(episode, task=f"t{e}", instruction=f"reach goal number {e}")


def to_lerobot_batch(batch: dict, tokenizer) -> dict:
    tokens = tokenizer(
        batch["instruction"],
        padding="max_length",
        max_length=48,
        truncation=True,
        return_tensors="pt",
    )
    images = {
        f"observation.images.{cam}": frames[:, -1].permute(0, 3, 1, 2).float() / 255.0
        for cam, frames in batch["images"].items()
    }
    return {
        **images,
        "observation.state": batch["state"][:, -1],
        "action": batch["action"],
        "action_is_pad": batch["action_is_pad"],
        "observation.language.tokens": tokens["input_ids"],
        "observation.language.attention_mask": tokens["attention_mask"].bool(),
    }


def _batches(dataset, count: int) -> list[dict]:
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    return [b for _, b in zip(range(count), loader, strict=False)]


def ditvla_optimizer(params: list) -> torch.optim.Optimizer:
    """AdamW built as ``ditvla train`` builds it (its fused kernel), at the bench's
    learning rate and weight decay (both arms alike)."""
    from ditvla.training.optimization import adamw

    return adamw(params, lr=1e-4, weight_decay=0.01)


def lerobot_optimizer(params: list) -> torch.optim.Optimizer:
    """AdamW built as LeRobot's training builds it (its ``AdamWConfig``), at the bench's
    learning rate and weight decay (both arms alike)."""
    from lerobot.optim.optimizers import AdamWConfig

    return AdamWConfig(lr=1e-4, weight_decay=0.01).build(params)


def _trainable(policy) -> list:
    return [p for p in policy.parameters() if p.requires_grad]


def _step_fn(policy, batches: list[dict], precision: str, optimizer_for):
    from ditvla.training.trainer import autocast_for

    optimizer = optimizer_for(_trainable(policy))
    autocast = autocast_for(precision, torch.device("cpu"))

    def step(i: int) -> None:
        with autocast:
            loss, _ = policy(batches[i % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def compare(ours, batches: list[dict], theirs, steps: int, precision: str) -> dict[str, float]:
    """Samples/s of both policies on the same batches, their steps taken in turn (so a
    change of load hits both alike), the median of ``steps`` after 3 warm-up steps."""
    tokenizer = theirs.model.vlm_with_expert.processor.tokenizer
    runs = {
        "ditvla": _step_fn(ours.train(), batches, precision, ditvla_optimizer),
        "smolvla": _step_fn(
            theirs.train(),
            [to_lerobot_batch(b, tokenizer) for b in batches],
            precision,
            lerobot_optimizer,
        ),
    }
    for step in runs.values():
        for i in range(3):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(3, steps + 3):
        for name, step in runs.items():
            start = time.perf_counter()
            step(i)
            times[name].append(time.perf_counter() - start)
    params = {"ditvla": ours, "smolvla": theirs}
    rates = {name: BATCH / statistics.median(t) for name, t in times.items()}
    for name in runs:
        size = sum(p.numel() for p in params[name].parameters()) / 1e6
        print(
            f"  {name:8s}: {rates[name]:7.1f} samples/s  ({size:.2f}M parameters, "
            f"median of {steps} steps, batch {BATCH})"
        )
    return rates


OURS_MODULES = ("backbone.vision", "backbone.projector", "backbone.language", "head", "auxiliary")
SMOLVLA_MODULES = ("model.vlm_with_expert.vlm.model.vision_model",)


def _timed_modules(policy, names: tuple[str, ...]) -> dict[str, list[float]]:
    """Forward seconds of each named submodule, appended at every call."""
    record: dict[str, list[float]] = {}
    for name in names:
        module = policy
        for attribute in name.split("."):
            module = getattr(module, attribute, None)
        if module is None:
            continue
        times = record.setdefault(name.split(".")[-1], [])
        module.register_forward_pre_hook(lambda *_, t=times: t.append(-time.perf_counter()))
        module.register_forward_hook(
            lambda *_, t=times: t.__setitem__(-1, t[-1] + time.perf_counter())
        )
    return record


def _parted_step(policy, batches: list[dict], optimizer_for):
    """A training step that records its forward, backward and optimizer seconds."""
    optimizer = optimizer_for(_trainable(policy))
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def step(i: int) -> None:
        start = time.perf_counter()
        loss, _ = policy(batches[i % len(batches)])
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        parts["forward"].append(forward - start)
        parts["backward"].append(backward - forward)
        parts["optimizer"].append(time.perf_counter() - backward)

    return step, parts


def profile(ours, batches: list[dict], theirs, steps: int) -> None:
    """The demo recipe's step by part, both policies' steps taken in turn."""
    tokenizer = theirs.model.vlm_with_expert.processor.tokenizer
    lerobot_batches = [to_lerobot_batch(b, tokenizer) for b in batches]
    arms = {
        "ditvla": (
            *_parted_step(ours.train(), batches, ditvla_optimizer),
            _timed_modules(ours, OURS_MODULES),
        ),
        "smolvla": (
            *_parted_step(theirs.train(), lerobot_batches, lerobot_optimizer),
            _timed_modules(theirs, SMOLVLA_MODULES),
        ),
    }
    for step, *_ in arms.values():
        for i in range(3):
            step(i)
    for _, parts, modules in arms.values():
        for times in (*parts.values(), *modules.values()):
            times.clear()
    for i in range(steps):
        for step, *_ in arms.values():
            step(i)
    for name, (_, parts, modules) in arms.items():
        ms = {k: 1000 * statistics.median(v) for k, v in parts.items()}
        inside = {k: 1000 * sum(v) / steps for k, v in modules.items()}
        print(
            f"  {name:8s}: step {sum(ms.values()):.1f} ms = "
            + ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
            + "; forward by module: "
            + ", ".join(f"{k} {v:.1f}" for k, v in inside.items())
            + f", the rest {ms['forward'] - sum(inside.values()):.1f}"
        )


TODAY = "today (fp32, fused AdamW, EMA)"


def levers(policy_config, stats, batches: list[dict], train, steps: int) -> None:
    """The demo recipe's full step (clipping, EMA) under each lever, all taken in turn."""
    from ditvla.policies.policy import DiTVLAPolicy
    from ditvla.training.optimization import warmed_up_ema

    threads = torch.get_num_threads()

    def arm(adamw: dict | None = None, autocast: bool = False, one_thread=False, ema=True):
        torch.manual_seed(0)
        policy = DiTVLAPolicy(policy_config, stats).train()
        params = _trainable(policy)
        optimizer = (
            ditvla_optimizer(params)
            if adamw is None
            else torch.optim.AdamW(params, lr=1e-4, **adamw)
        )
        average = warmed_up_ema(train.ema_decay, train.ema_power)
        averaged = torch.optim.swa_utils.AveragedModel(policy, multi_avg_fn=average)

        def step(i: int) -> None:
            torch.set_num_threads(1 if one_thread else threads)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = policy(batches[i % len(batches)])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema:
                averaged.update_parameters(policy)
            torch.set_num_threads(threads)

        return step

    arms = {
        TODAY: arm(),
        "AdamW, a loop per parameter": arm({"foreach": False}),
        "foreach AdamW": arm({"foreach": True}),
        "bfloat16 autocast": arm(autocast=True),
        "one thread": arm(one_thread=True),
        "no EMA": arm(ema=False),
    }
    for step in arms.values():
        for i in range(3):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(steps):
        for name, step in arms.items():
            start = time.perf_counter()
            step(i)
            times[name].append(time.perf_counter() - start)
    today = statistics.median(times[TODAY])
    for name, t in times.items():
        median = statistics.median(t)
        print(f"  {name:32s} {1000 * median:6.1f} ms/step  {today / median:.2f}x")


def eyes(policy, batches: list[dict], steps: int) -> None:
    """The frozen eyes' forward on the demo batches' frames (every camera of a batch at
    once), three ways in turn: timm's network as it is, the encoder as the policy runs it
    (batch norms folded, channels-last), and that under bfloat16 autocast."""
    encoder = policy.backbone.vision
    frames = [
        torch.cat([f[:, -1].permute(0, 3, 1, 2).float() / 255 for f in b["images"].values()])
        for b in batches
    ]

    def timms(x):
        with torch.no_grad():
            return encoder.network(x)

    def bfloat16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(x)

    ways = {"timm's network": timms, "the encoder (folded)": encoder, "folded, bf16": bfloat16}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(steps + 3):
        for name, way in ways.items():
            start = time.perf_counter()
            way(frames[i % len(frames)])
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["timm's network"])
    for name, t in times.items():
        median = statistics.median(t)
        print(f"  {name:22s} {1000 * median:6.1f} ms  {reference / median:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per policy")
    parser.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="what both policies' steps compute in (default: auto, as ditvla train: bfloat16 "
        "autocast where this CPU has it natively; --profile, --levers and --eyes stay float32)",
    )
    parser.add_argument("--profile", action="store_true", help="the demo recipe's step by part")
    parser.add_argument("--levers", action="store_true", help="the demo recipe under each lever")
    parser.add_argument("--eyes", action="store_true", help="the frozen eyes' forward, 3 ways")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ditvla.datasets.torch_dataset import ReplayBufferDataset
    from ditvla.demo import FULL
    from ditvla.policies.config import PolicyConfig
    from ditvla.policies.policy import DiTVLAPolicy
    from ditvla.training.processes import join_processes
    from ditvla.training.trainer import autocast_for, keep_frozen_features
    from ditvla.training.training_data import training_dataset

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="ditvla_train_bench_"))
    write_store(work / "store.zarr")
    dataset = ReplayBufferDataset(work / "store.zarr", n_obs_steps=1, horizon=HORIZON)
    # matched sizes, both training everything: the tiny VLM's own vision transformer, as
    # SmolVLA's (the preset's frozen ImageNet eyes run in the demo recipe below)
    ours = DiTVLAPolicy(
        PolicyConfig.for_data(
            dataset.data_spec(),
            "tiny",
            horizon=dataset.sampler.horizon,
            backbone={"vision_encoder": ""},
        ),
        dataset.stats(),
    )
    theirs, _, _ = tiny_smolvla(
        work / "smolvlm", dataset.data_spec(), horizon=HORIZON, n_action_steps=HORIZON
    )
    print("one camera, matched tiny sizes:")
    rates = compare(ours, _batches(dataset, args.steps + 3), theirs, args.steps, args.precision)

    write_demo_store(work / "demo.zarr")
    demo_train = replace(FULL.train, dataset=str(work / "demo.zarr"), out=str(work / "run"))
    policy_config, data, demo_dataset = training_dataset(demo_train, join_processes("cpu"))
    horizon = policy_config.horizon
    demo_ours = DiTVLAPolicy(policy_config, data.stats)
    demo_theirs, _, _ = tiny_smolvla(
        work / "smolvlm_demo", data, horizon=horizon, n_action_steps=horizon
    )
    print(
        f"the demo's recipe ({' + '.join(data.cameras)}, auxiliary target "
        f"{demo_train.auxiliary}; SmolVLA the same cameras, no auxiliary head):"
    )
    demo_batches = _batches(demo_dataset, args.steps + 3)
    demo = compare(demo_ours, demo_batches, demo_theirs, args.steps, args.precision)
    print("the demo's recipe, every frame's tokens already kept by the frozen eyes:")
    kept = keep_frozen_features(demo_ours, demo_train, torch.device("cpu"))
    with torch.no_grad(), autocast_for(args.precision, torch.device("cpu")):
        for batch in demo_batches:  # each frame meets the eyes once
            demo_ours(batch)
    print(f"  ({sum(k.misses for k in kept)} frames kept)")
    demo_kept = compare(demo_ours, demo_batches, demo_theirs, args.steps, args.precision)
    if args.profile:
        print("the demo's recipe, one step by part (median ms; modules: mean ms per step):")
        profile(demo_ours, demo_batches, demo_theirs, args.steps)
    if args.eyes:
        print(f"the eyes' forward on a demo batch's {len(data.cameras)} x {BATCH} frames:")
        eyes(demo_ours, demo_batches, args.steps)
    if args.levers:
        print("the demo's recipe under each lever (ditvla train's step: clipping and EMA):")
        levers(policy_config, data.stats, demo_batches, demo_train, args.steps)
    autocast = autocast_for(args.precision, torch.device("cpu"))
    computes = "bfloat16 autocast" if isinstance(autocast, torch.autocast) else "float32"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, both in {computes}")
    print(
        f"training throughput: ditvla {rates['ditvla']:.1f} samples/s vs lerobot smolvla "
        f"{rates['smolvla']:.1f} samples/s (demo recipe: {demo['ditvla']:.1f} vs "
        f"{demo['smolvla']:.1f}; its frames' tokens kept: {demo_kept['ditvla']:.1f} vs "
        f"{demo_kept['smolvla']:.1f})"
    )


if __name__ == "__main__":
    main()

"""Training samples/s: our tiny policy against LeRobot's SmolVLA at matched size.

Both train end to end (vision encoder, language model and action head/expert; SmolVLA's
defaults freeze all but the expert, so they are switched off here) by flow matching on
the same batches: one 64x64 camera, an 8-D state, the instruction, 16x7 action chunks,
batch 32, AdamW. Matched size: SmolVLA's VLM is a SmolVLM2-style model built offline with
our tiny preset's dimensions (text width 128, 2 layers; vision width 96, 2 layers, 8-px
patches) and its expert at the VLM's width (multiplier 1.0, 2 layers), against our tiny
preset (the same VLM sizes, a 2-block DiT head of width 128). Batches are drawn once
from a zarr store and given to both in turn, so data loading is not timed.

    python -m bench.train_throughput [--steps 20]

Last line: ``training throughput: ditvla <x> samples/s vs lerobot smolvla <y> samples/s``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.smolvla_peer import tiny_smolvla

BATCH, HORIZON, ACTION_DIM, STATE_DIM, IMAGE = 32, 16, 7, 8, 64


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


def to_lerobot_batch(batch: dict, tokenizer) -> dict:
    tokens = tokenizer(
        batch["instruction"],
        padding="max_length",
        max_length=48,
        truncation=True,
        return_tensors="pt",
    )
    return {
        "observation.images.cam": batch["images"]["cam"][:, -1].permute(0, 3, 1, 2).float() / 255.0,
        "observation.state": batch["state"][:, -1],
        "action": batch["action"],
        "action_is_pad": batch["action_is_pad"],
        "observation.language.tokens": tokens["input_ids"],
        "observation.language.attention_mask": tokens["attention_mask"].bool(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per policy")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ditvla.datasets.torch_dataset import ReplayBufferDataset
    from ditvla.policies.config import PolicyConfig
    from ditvla.policies.policy import DiTVLAPolicy

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="ditvla_train_bench_"))
    write_store(work / "store.zarr")
    dataset = ReplayBufferDataset(work / "store.zarr", n_obs_steps=1, horizon=HORIZON)
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    batches = [b for _, b in zip(range(args.steps + 3), loader, strict=False)]

    ours = DiTVLAPolicy(
        PolicyConfig.for_data(dataset.data_spec(), "tiny", horizon=dataset.sampler.horizon),
        dataset.stats(),
    )
    theirs, _, _ = tiny_smolvla(
        work / "smolvlm", dataset.data_spec(), horizon=HORIZON, n_action_steps=HORIZON
    )
    tokenizer = theirs.model.vlm_with_expert.processor.tokenizer
    their_batches = [to_lerobot_batch(b, tokenizer) for b in batches]

    def step_fn(policy, batch):
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)

        def step(i):
            loss, _ = policy(batch[i % len(batch)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step

    runs = {
        "ditvla": step_fn(ours.train(), batches),
        "smolvla": step_fn(theirs.train(), their_batches),
    }
    for step in runs.values():
        for i in range(3):
            step(i)
    times = {name: [] for name in runs}
    for i in range(3, args.steps + 3):
        for name, step in runs.items():  # in turn: load changes hit both alike
            start = time.perf_counter()
            step(i)
            times[name].append(time.perf_counter() - start)
    params = {
        "ditvla": sum(p.numel() for p in ours.parameters()),
        "smolvla": sum(p.numel() for p in theirs.parameters()),
    }
    rates = {name: BATCH / statistics.median(t) for name, t in times.items()}
    for name in runs:
        print(
            f"{name:8s}: {rates[name]:7.1f} samples/s  ({params[name] / 1e6:.2f}M parameters, "
            f"median of {args.steps} steps, batch {BATCH})"
        )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print(
        f"training throughput: ditvla {rates['ditvla']:.1f} samples/s vs lerobot smolvla "
        f"{rates['smolvla']:.1f} samples/s"
    )


if __name__ == "__main__":
    main()

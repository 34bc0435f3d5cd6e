"""``ditvla train``: fit a policy to a zarr replay buffer.

AdamW with linear warmup and cosine decay, gradient clipping, gradient accumulation, EMA
weights, bf16 autocast on CUDA, seeded data order and noise. Progress bar with loss and
throughput, TensorBoard scalars and ``metrics.jsonl`` in the output folder; checkpoints
written atomically every ``save_every`` steps and at the end; ``resume=True`` continues
from the latest checkpoint so that the loss curve matches an uninterrupted run.

Several GPUs or nodes: launch with ``torchrun`` (NCCL on CUDA, gloo on CPU); each process
draws its share of every batch. ``sharding="ddp"`` (DistributedDataParallel) keeps the
whole model in every process; ``sharding="fsdp"`` (FSDP2, :mod:`ditvla.training.sharding`)
shards weights, gradients and optimizer state across them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ditvla.datasets.motion_targets import MotionTargetSpec, load_or_compute_motion_targets
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.statistics import load_or_compute_stats
from ditvla.datasets.torch_dataset import ImageAugmentation, ReplayBufferDataset
from ditvla.policies.config import PolicyConfig, PresetName
from ditvla.policies.normalizer import NARROW_STD, narrow_features
from ditvla.policies.policy import DiTVLAPolicy
from ditvla.training.checkpoints import latest_checkpoint, read_checkpoint, write_checkpoint
from ditvla.training.sharding import ShardedEMA, full_state_dict, shard_policy

SHARDINGS = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """How ``ditvla train`` fits a policy to a zarr replay buffer.

    Args:
        dataset: the zarr replay buffer to train on.
        out: output folder: policy/ (the final, EMA weights), checkpoints/, metrics.jsonl,
            tensorboard/.
        preset: the policy preset the model starts from, sized to the data (tiny: a tiny
            Idefics3 VLM and a tiny head, the CPU default; see PolicyConfig.preset).
        policy_overrides: PolicyConfig fields to set over the preset, nested like the
            config ({"head": {"width": 384}}).
        cameras: the cameras the policy reads, comma-separated (default: every camera of the
            store).
        state: the state the policy reads: proprio (what a real robot has: the store's
            state_keys), full (with the simulator's privileged object poses and goals), none,
            or arrays by name, KEY[,KEY...].
        auxiliary: arrays, KEY[,KEY...], that an auxiliary head learns to predict from the
            VLM's context during training (e.g. goal: the backbone must then encode where
            the instructed target is); the policy never reads them. Empty: none.
        steps: optimizer steps.
        batch_size: samples per optimizer step, over all processes and micro-batches.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warmup, then cosine decay to 0.
        grad_clip: gradient norm clip.
        ema_decay: EMA of the weights (the final policy is the EMA); 0 turns it off.
        ema_power: EMA warm-up: the decay at update t is min(ema_decay, 1 - (1 + t) **
            -ema_power) (diffusion policy's schedule), so a short run's EMA is not weighed
            down by its first weights; 0 keeps the decay constant.
        seed: seeds the data order, the noise and the initial weights.
        num_workers: DataLoader worker processes (0: read batches in the training process).
        augment: random shift + brightness/contrast jitter of the camera frames.
        save_every: checkpoint period in steps (and at the end).
        log_every: TensorBoard / progress-bar period in steps (metrics.jsonl gets every step).
        device: auto, cpu, cuda, cuda:1, ...
        sharding: under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2:
            weights, gradients and optimizer state sharded over the processes, one unit per
            VLM transformer block: for backbones that do not fit one GPU; its checkpoints
            hold the whole weights but no optimizer state, so they do not resume).
        resume: continue from the latest checkpoint in out.
        progress: show a progress bar.
    """

    dataset: str
    out: str = "outputs/train"
    preset: PresetName = "tiny"
    policy_overrides: dict[str, Any] = field(default_factory=dict)
    cameras: tuple[str, ...] | None = None
    state: str = "proprio"
    auxiliary: str = ""
    steps: int = 2000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_power: float = 0.75
    seed: int = 0
    num_workers: int = 2
    augment: bool = False
    save_every: int = 500
    log_every: int = 10
    device: str = "auto"
    sharding: str = "ddp"
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sharding not in SHARDINGS:
            raise ValueError(
                f"sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}"
            )
        if self.sharding == "fsdp" and self.resume:
            raise ValueError(
                "resume: a sharded (fsdp) run's checkpoints hold no optimizer state; restart "
                "it, or resume an unsharded run"
            )


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, started at any position."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _mine(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        return order[self.rank :: self.world][self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._mine().tolist())

    def __len__(self) -> int:
        return len(self._mine())


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Batches:
    """Endless batches. The position is counted in samples consumed (DataLoader workers
    read ahead of it); each epoch's DataLoader gets a seeded generator, so a run resumed
    from (epoch, consumed) draws the same batches as an uninterrupted one."""

    def __init__(self, dataset, sampler: EpochSampler, config: TrainConfig, micro_batch: int):
        self.dataset, self.sampler, self.config, self.micro_batch = (
            dataset,
            sampler,
            config,
            micro_batch,
        )
        self.epoch, self.consumed = 0, 0
        self._iterator: Iterator | None = None

    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, self.consumed)
        return DataLoader(
            self.dataset,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            num_workers=self.config.num_workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.config.seed * 100003 + self.epoch),
        )

    def next(self) -> dict[str, Any]:
        while True:
            if self._iterator is None:
                self._iterator = iter(self._loader())
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.consumed == 0:
                    raise RuntimeError(
                        f"the dataset has {len(self.dataset)} samples per process, fewer than "
                        f"one batch of {self.micro_batch}"
                    ) from None
                self._iterator, self.epoch, self.consumed = None, self.epoch + 1, 0
                continue
            self.consumed += self.micro_batch
            return batch


def _attach_auxiliary_targets(dataset, policy_config, selection: str) -> None:
    """The auxiliary head's targets: the named arrays, standardized with the store's
    statistics, attached to the dataset; their names and width recorded in the config."""
    buffer = ReplayBuffer.open(dataset.path)
    keys = buffer.resolve_state(selection)
    stats = load_or_compute_stats(buffer)
    parts = []
    for key in keys:
        values = buffer.read_all(key).astype(np.float32).reshape(buffer.n_frames, -1)
        mean = np.asarray(stats[key]["mean"], np.float32)
        std = np.maximum(np.asarray(stats[key]["std"], np.float32), 1e-6)
        parts.append((values - mean) / std)
    dataset.frame_targets["auxiliary"] = np.concatenate(parts, axis=1)
    policy_config.auxiliary_keys = list(keys)
    policy_config.auxiliary_dim = int(dataset.frame_targets["auxiliary"].shape[1])


def _attach_motion_targets(dataset, policy_config, main_process: bool, distributed: bool) -> None:
    """Optical-flow targets of the foresight head: computed once (and cached in the store)
    by the main process, attached to the dataset, their scale recorded in the config."""
    foresight = policy_config.foresight
    spec = MotionTargetSpec(foresight.camera, foresight.k, foresight.method, foresight.size)
    if main_process:
        targets, scale = load_or_compute_motion_targets(dataset.path, spec)
    if distributed:
        dist.barrier()
    if not main_process:
        targets, scale = load_or_compute_motion_targets(dataset.path, spec, progress=False)
    dataset.frame_targets["motion"] = targets
    foresight.scale = scale


def _warn_narrow_state(stats, state_keys: list[str]) -> None:
    """Say which state dimensions mean_std will magnify (see :func:`narrow_features`)."""
    narrow = narrow_features(stats, "state")
    if narrow:
        warnings.warn(
            f"state ({' + '.join(state_keys)}) dimensions {narrow} vary with a std under "
            f"{NARROW_STD} in this store; mean_std normalization magnifies any move of theirs "
            "beyond that (0.1 off is more than 10 std), which a policy's own actions can "
            "cause; --policy.state-norm quantile clips inputs to the data's range",
            stacklevel=2,
        )


def train(config: TrainConfig) -> Path:
    """Run training; returns the folder of the final policy (EMA weights when EMA is on)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    sharded = config.sharding == "fsdp"
    if sharded and not distributed:
        raise ValueError(
            "sharding fsdp splits the model over processes: launch with torchrun "
            "--nproc_per_node N (N >= 2)"
        )
    device = _device(config.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    main_process = rank == 0
    out = Path(config.out)
    checkpoints = out / "checkpoints"
    _seed_everything(config.seed + rank)

    state_keys = ReplayBuffer.open(config.dataset).resolve_state(config.state)
    # The store's statistics are computed once (by the main process) and saved with it.
    if main_process:
        data = ReplayBufferDataset(
            config.dataset, cameras=config.cameras, state_keys=state_keys
        ).data_spec()
    if distributed:
        dist.barrier()
    if not main_process:
        data = ReplayBufferDataset(
            config.dataset, cameras=config.cameras, state_keys=state_keys
        ).data_spec()
    policy_config = PolicyConfig.for_data(data, config.preset, **config.policy_overrides)
    if main_process and policy_config.state_dim and policy_config.state_norm == "mean_std":
        _warn_narrow_state(data.stats, policy_config.state_keys)
    dataset = ReplayBufferDataset(
        config.dataset,
        n_obs_steps=1,
        horizon=policy_config.horizon,
        cameras=policy_config.cameras,
        state_keys=policy_config.state_keys,
        augmentation=ImageAugmentation() if config.augment else None,
    )
    if config.auxiliary:
        _attach_auxiliary_targets(dataset, policy_config, config.auxiliary)
    foresight = policy_config.foresight
    if foresight.kind == "motion":
        _attach_motion_targets(dataset, policy_config, main_process, distributed)
    elif foresight.kind == "latent":  # its targets come from the frozen encoder, per batch
        dataset.future_frame = (foresight.camera, foresight.k)
    policy = DiTVLAPolicy(policy_config, data.stats).to(device)
    if sharded:
        shard_policy(policy, device.type, world)
        model = policy
    elif distributed:
        model = torch.nn.parallel.DistributedDataParallel(policy)
    else:
        model = policy
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    ema = None
    if config.ema_decay > 0:
        average = _warmed_up_ema(config.ema_decay, config.ema_power)
        ema = (
            ShardedEMA(policy, average)
            if sharded
            else torch.optim.swa_utils.AveragedModel(policy, multi_avg_fn=average)
        )
    if config.batch_size % (config.grad_accum * world):
        raise ValueError(
            f"batch_size {config.batch_size} must divide into grad_accum {config.grad_accum} x "
            f"{world} processes"
        )
    micro_batch = config.batch_size // (config.grad_accum * world)
    sampler = EpochSampler(len(dataset), config.seed, rank, world)
    start_step = 0
    if config.resume:
        checkpoint = latest_checkpoint(checkpoints)
        if checkpoint is None:
            raise FileNotFoundError(f"{checkpoints}: no checkpoint to resume from")
        resumed = DiTVLAPolicy.from_pretrained(checkpoint / "policy", map_location=device)
        policy.load_state_dict(resumed.state_dict())
        state, ema_state = read_checkpoint(checkpoint, optimizer)
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        start_step = state["step"]
        resume_position = state["data"]["epoch"], state["data"]["consumed"]
        _restore_rank_rng(rank, state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, config.warmup_steps, config.steps),
        last_epoch=start_step - 1,
    )
    batches = _Batches(dataset, sampler, config, micro_batch)
    if config.resume:
        batches.epoch, batches.consumed = resume_position

    writer = None
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step or None)
        metrics_path = out / "metrics.jsonl"
        if config.resume and metrics_path.exists():  # drop lines past the checkpoint
            lines = [
                ln
                for ln in metrics_path.read_text().splitlines()
                if json.loads(ln)["step"] <= start_step
            ]
            metrics_path.write_text("".join(ln + "\n" for ln in lines))
        metrics_file = metrics_path.open("a")

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (config.progress and main_process),
    )
    window_start, window_samples = time.perf_counter(), 0
    policy.train()
    for step in range(start_step, config.steps):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        parts: dict[str, float] = {}  # the loss's parts (action, foresight) and metrics
        for micro in range(config.grad_accum):
            batch = batches.next()
            sync = micro == config.grad_accum - 1 or not distributed
            # Gradients are all-reduced once per step, on its last micro-batch.
            if sharded:
                policy.set_requires_gradient_sync(sync)
            with model.no_sync() if not (sync or sharded) else nullcontext(), autocast:
                loss, metrics = model(batch)
            (loss / config.grad_accum).backward()
            loss_sum += loss.item() / config.grad_accum
            for key, value in metrics.items():
                parts[key] = parts.get(key, 0.0) + value / config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(policy)
        window_samples += config.batch_size
        if distributed:
            reduced = torch.tensor([loss_sum], device=device)
            dist.all_reduce(reduced)
            loss_sum = reduced.item() / world
        done = step + 1
        if main_process:
            record = {
                "step": done,
                "loss": loss_sum,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                **parts,
            }
            metrics_file.write(json.dumps(record) + "\n")
            if done % config.log_every == 0 or done == config.steps:
                elapsed = time.perf_counter() - window_start
                rate = window_samples / max(elapsed, 1e-9)
                window_start, window_samples = time.perf_counter(), 0
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(f"train/{key}", value, done)
                writer.add_scalar("train/samples_per_s", rate, done)
                bar.set_postfix(loss=f"{loss_sum:.4f}", samples_s=f"{rate:.0f}")
                metrics_file.flush()
        bar.update()
        if done % config.save_every == 0 or done == config.steps:
            if main_process:
                metrics_file.flush()  # the curve up to a checkpoint survives a crash after it
            _save(
                checkpoints / f"step_{done:07d}",
                policy,
                ema,
                optimizer,
                batches,
                done,
                rank,
                world,
                distributed,
                main_process,
                sharded,
            )
    bar.close()
    final = out / "policy"
    if sharded:  # gathered whole on every process (collectives)
        final_policy = policy
        final_state = ema.full_weights(policy) if ema is not None else full_state_dict(policy)
    else:
        final_policy, final_state = (ema.module if ema is not None else policy), None
    if main_process:
        metrics_file.close()
        writer.close()
        final_policy.save_pretrained(final, state=final_state)
    if distributed:
        if sharded:  # the sharded modules go before their process group (else a flaky abort)
            del model, policy, final_policy, ema, optimizer, scheduler, trainable
            gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return final


def _warmed_up_ema(decay: float, power: float):
    """An EMA update for ``AveragedModel`` whose decay grows with the updates made (see
    :attr:`TrainConfig.ema_power`)."""

    def update(averaged: list, current: list, num_averaged) -> None:
        step = float(num_averaged)
        rate = decay if power == 0 else min(decay, 1 - (1 + step) ** -power)
        torch.optim.swa_utils.get_ema_multi_avg_fn(rate)(averaged, current, num_averaged)

    return update


def _rank_rng_state() -> list[int]:
    return torch.get_rng_state().tolist()


def _restore_rank_rng(rank: int, state: dict) -> None:
    """Ranks other than 0 keep their own torch RNG state in the checkpoint's JSON."""
    per_rank = state.get("rank_rng", {})
    if rank != 0 and str(rank) in per_rank:
        torch.set_rng_state(torch.tensor(per_rank[str(rank)], dtype=torch.uint8))


def _save(
    folder, policy, ema, optimizer, batches, step, rank, world, distributed, main_process, sharded
):
    rank_rng = [None] * world
    if distributed:
        dist.all_gather_object(rank_rng, _rank_rng_state())
    # A sharded run's weights are gathered whole (collectives on every process); its
    # optimizer state stays sharded and is not written.
    policy_state = full_state_dict(policy) if sharded else None
    ema_state = None
    if ema is not None:
        ema_state = ema.state_dict(policy) if sharded else ema.state_dict()
    if main_process:
        state = {
            "step": step,
            "data": {"epoch": batches.epoch, "consumed": batches.consumed},
            "rank_rng": {str(r): s for r, s in enumerate(rank_rng) if r and s is not None},
        }
        write_checkpoint(
            folder,
            policy=policy,
            policy_state=policy_state,
            ema_state=ema_state,
            optimizer=None if sharded else optimizer,
            trainer_state=state,
        )
    if distributed:
        dist.barrier()

"""``ditvla train``: fit a policy to a zarr replay buffer.

AdamW with linear warmup and cosine decay, gradient clipping, gradient accumulation, EMA
weights, bf16 autocast (on CUDA by default, on the CPU when asked), seeded data order and
noise. Progress bar with loss and throughput, TensorBoard scalars and ``metrics.jsonl`` in
the output folder; checkpoints written atomically every ``save_every`` steps and at the
end; ``resume=True`` continues from the latest checkpoint so that the loss curve matches an
uninterrupted run.

Several GPUs or nodes: launch with ``torchrun`` (NCCL on CUDA, gloo on CPU); each process
draws its share of every batch. ``sharding="ddp"`` (DistributedDataParallel) keeps the
whole model in every process; ``sharding="fsdp"`` (FSDP2, :mod:`ditvla.training.sharding`)
shards weights, gradients and optimizer state across them.

The run reads as its steps (:func:`train`); each lives in a room of its own: which process
this is (:mod:`~ditvla.training.processes`), what it reads (:mod:`~ditvla.training.training_data`),
the batch order (:mod:`~ditvla.training.batch_order`), the optimizer and EMA
(:mod:`~ditvla.training.optimization`), what it records (:mod:`~ditvla.training.training_log`)
and its checkpoints (:mod:`~ditvla.training.checkpoints`).
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ditvla.contract import STATE_PROPRIO
from ditvla.datasets.torch_dataset import ReplayBufferDataset
from ditvla.errors import ConfigError
from ditvla.policies.config import PresetName
from ditvla.policies.policy import DiTVLAPolicy
from ditvla.policies.pretrained_vision import KeptFeatures, PretrainedConvEncoder
from ditvla.training.batch_order import EndlessBatches, EpochSampler
from ditvla.training.checkpoints import (
    SHARDED_STATE,
    latest_checkpoint,
    rank_rng_state,
    read_checkpoint,
    read_sharded_checkpoint,
    restore_rank_rng,
    start_checkpoint,
    unfinished_checkpoint,
    write_checkpoint,
)
from ditvla.training.optimization import adamw, optimizer_step, schedule_of, warmed_up_ema
from ditvla.training.processes import TIMEOUT_MINUTES, Processes, join_processes
from ditvla.training.sharding import (
    ShardedEMA,
    gathered_on_main,
    load_sharded_state,
    save_sharded_state,
    shard_policy,
)
from ditvla.training.training_data import training_dataset
from ditvla.training.training_log import METRICS_FILE, TENSORBOARD_DIR, TrainingLog

SHARDINGS = ("ddp", "fsdp")
POLICY_DIR, CHECKPOINTS_DIR, CONFIG_FILE = "policy", "checkpoints", "train_config.json"
# what a run writes into its out folder (cache/ is derived from the store, and kept)
RUN_OUTPUTS = (POLICY_DIR, CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR)
# what the forward and backward passes compute in (the weights and optimizer stay float32)
Precision = Literal["auto", "bfloat16", "float32"]


@dataclass
class TrainConfig:
    """How ``ditvla train`` fits a policy to a zarr replay buffer.

    Args:
        dataset: the zarr replay buffer to train on: a folder, or a URL (s3://bucket/x.zarr,
            read-only; endpoint and credentials from fsspec's config, e.g.
            FSSPEC_S3_ENDPOINT_URL, FSSPEC_S3_KEY, FSSPEC_S3_SECRET).
        out: output folder: policy/ (the final, EMA weights), checkpoints/, metrics.jsonl,
            tensorboard/, cache/ (what is derived from a store by URL: its statistics,
            optical-flow targets).
        preset: the policy preset the model starts from, sized to the data (tiny: a tiny
            Idefics3 VLM and a tiny head, the CPU default; see PolicyConfig.preset).
        policy_overrides: PolicyConfig fields to set over the preset, nested like the
            config ({"head": {"width": 384}}).
        cameras: the cameras the policy reads, comma-separated (default: every camera of the
            store).
        image_size: the side of the camera frames the policy reads; the store must hold
            frames of that size (default: the store's).
        state: the state the policy reads: proprio (what a real robot has: the store's
            state_keys), full (with the simulator's privileged object poses and goals), none,
            or arrays by name, KEY[,KEY...].
        auxiliary: privileged arrays, KEY[,KEY...] or privileged (every one the store
            records), that an auxiliary head learns to predict from the VLM's context during
            training (e.g. goal: the backbone must then encode where the instructed target
            is); the policy never reads them. Empty: none.
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
        kept_features_gib: without ``augment``, on the CPU, the frozen pretrained eyes keep
            each frame's tokens (up to this many GiB in each process) and read them back when the
            frame comes again instead of encoding it anew: the same tokens, for a fraction
            of the step (docs/benchmarks.md, "Frozen eyes' tokens kept"); 0 turns it off.
        instruction_variants: a file of TASK<TAB>VARIANT lines (the format of ``ditvla
            eval --rewordings``), tasks of the store: each sample reads its task's
            instruction or one of its variants, each as likely (instruction augmentation;
            the store is unchanged).
        instruction_noise: with this probability one word of a sample's instruction is
            replaced by a made-up word of 3-8 random letters, at training time only
            (word-level noise, one word as a reworded instruction changes one; the store
            is unchanged); 0: off. The words that tell an instruction from the others are
            spared: those no other instruction of the store holds, and the run in which
            one differs from it ("green" in "reach the green ball" beside "reach the blue
            ball"). On the demo, 0.5 held colour-reach to 96.0% with a synonym against
            98.7% as said (17.3 points lost without noise) but lost 8 more under a nudged
            camera (docs/robustness.md).
        camera_dropout: CAMERA=P[,CAMERA=P...]: each sample's frames of CAMERA blanked
            (zeros) with probability P at training time only (modality dropout, as
            Hsu et al. 2022 bottleneck the third-person view so that a policy leans on its
            wrist camera); e.g. corner3=0.3.
        save_every: checkpoint period in steps (and at the end).
        log_every: TensorBoard / progress-bar period in steps (metrics.jsonl gets every step).
        device: auto, cpu, cuda, cuda:1, ...
        precision: what the forward and backward passes compute in, under autocast (the
            weights, gradients and optimizer state stay float32): bfloat16, float32, or
            auto (bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, float32 on other
            CPUs). With AVX512-BF16 a bfloat16 step of the demo's recipe is about 1.1x
            faster at equal success (docs/benchmarks.md); without it, slower.
        sharding: under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2:
            weights, gradients and optimizer state sharded over the processes, one unit per
            VLM transformer block: for backbones that do not fit one GPU; its checkpoints
            hold the whole weights, and the sharded state that a run of as many processes
            resumes from).
        timeout_minutes: how long a process waits for the others at a collective before
            the run fails (under torchrun); the others wait while the main process computes
            a store's statistics and motion targets.
        resume: continue from the latest checkpoint in out.
        overwrite: replace what an earlier run left in out (its policy, checkpoints and
            logs); without it (or resume), an out folder holding a run is refused.
        progress: show a progress bar.
    """

    dataset: str
    out: str = "outputs/train"
    preset: PresetName = "tiny"
    policy_overrides: dict[str, Any] = field(default_factory=dict)
    cameras: tuple[str, ...] | None = None
    image_size: int | None = None
    state: str = STATE_PROPRIO
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
    kept_features_gib: float = 4.0
    instruction_variants: str = ""
    instruction_noise: float = 0.0
    camera_dropout: str = ""
    save_every: int = 500
    log_every: int = 10
    device: str = "auto"
    precision: Precision = "auto"
    sharding: str = "ddp"
    timeout_minutes: float = TIMEOUT_MINUTES
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_minutes <= 0:
            raise ConfigError(f"timeout_minutes must be > 0, got {self.timeout_minutes}")
        for name in ("ema_decay", "instruction_noise"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise ConfigError("resume continues the run in out, overwrite replaces it: not both")
        if self.sharding not in SHARDINGS:
            raise ConfigError(
                f"sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}"
            )


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware: CUDA, or a CPU
    with AVX512-BF16 or AMX (where a bfloat16 training step is faster, not slower)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_for(precision: Precision, device: torch.device) -> Any:
    """The autocast context of a training step: bfloat16 when asked, or under ``auto``
    where the device computes it natively (:func:`native_bfloat16`)."""
    if precision == "bfloat16" or (precision == "auto" and native_bfloat16(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def train(config: TrainConfig) -> Path:
    """Run training; returns the folder of the final policy (EMA weights when EMA is on)."""
    if config.sharding == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ConfigError(
            "sharding fsdp splits the model over processes: launch with torchrun "
            "--nproc_per_node N (N >= 2)"
        )
    earlier = earlier_run(Path(config.out)) if not config.resume else []
    if earlier and not config.overwrite:
        raise ConfigError(
            f"{config.out} holds an earlier training run ({', '.join(earlier)}); --resume "
            "continues it, --overwrite replaces it, or choose another --out"
        )
    processes = join_processes(config.device, config.timeout_minutes)
    _seed_everything(config.seed + processes.rank)
    policy_config, data, dataset = training_dataset(config, processes)
    # the run holds the only reference to the model (a sharded one must go before its
    # process group)
    run = _Run(config, processes, DiTVLAPolicy(policy_config, data.stats), dataset)
    out = Path(config.out)
    if processes.main:
        for name in earlier:  # (only when overwrite)
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    log = TrainingLog(
        out,
        total_steps=config.steps,
        start_step=run.start_step,
        log_every=config.log_every,
        enabled=processes.main,
        progress=config.progress,
    )
    run.policy.train()
    for step in range(run.start_step, config.steps):
        log.record(step + 1, config.batch_size, run.step())
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            log.flush()  # the curve up to a checkpoint survives a crash after it
            run.save_checkpoint(out / CHECKPOINTS_DIR / f"step_{step + 1:07d}", step + 1)
    log.close()
    return run.save_final(out / POLICY_DIR)


def earlier_run(out: Path) -> list[str]:
    """What an earlier run left in ``out`` (names of :data:`RUN_OUTPUTS`), in that order."""
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


class _Run:
    """One run's moving parts: the model (wrapped for DDP, or sharded), its optimizer and
    learning-rate schedule, the EMA of its weights and the batch order, restored from the
    latest checkpoint when resuming."""

    def __init__(
        self,
        config: TrainConfig,
        processes: Processes,
        policy: DiTVLAPolicy,
        dataset: ReplayBufferDataset,
    ):
        self.config, self.processes = config, processes
        self.policy = policy.to(processes.device)
        self.sharded = config.sharding == "fsdp"
        self.model: torch.nn.Module = policy  # what each micro-batch runs through
        if self.sharded:
            shard_policy(policy, processes.device.type, processes.world)
        elif processes.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(policy)
        self.trainable = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = adamw(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.ema = self._ema()  # (before the eyes keep anything: the EMA copies the policy)
        self.kept = keep_frozen_features(policy, config, processes.device)
        self.batches = EndlessBatches(
            dataset,
            EpochSampler(len(dataset), config.seed, processes.rank, processes.world),
            self._micro_batch(),
            seed=config.seed,
            num_workers=config.num_workers,
        )
        self.start_step = self._resume() if config.resume else 0
        self.schedule = schedule_of(
            self.optimizer, config.warmup_steps, config.steps, self.start_step
        )
        self.autocast = autocast_for(config.precision, processes.device)

    def _ema(self) -> Any:
        if self.config.ema_decay <= 0:
            return None
        average = warmed_up_ema(self.config.ema_decay, self.config.ema_power)
        if self.sharded:
            return ShardedEMA(self.policy, average)
        return torch.optim.swa_utils.AveragedModel(self.policy, multi_avg_fn=average)

    def _micro_batch(self) -> int:
        config, world = self.config, self.processes.world
        if config.batch_size % (config.grad_accum * world):
            raise ConfigError(
                f"batch_size {config.batch_size} must divide into grad_accum "
                f"{config.grad_accum} x {world} processes"
            )
        return config.batch_size // (config.grad_accum * world)

    def _resume(self) -> int:
        """Weights, optimizer, EMA, batch position and RNG of the latest checkpoint; the
        step it was written at."""
        checkpoints = Path(self.config.out) / CHECKPOINTS_DIR
        checkpoint = latest_checkpoint(checkpoints)
        if checkpoint is None:
            raise FileNotFoundError(f"{checkpoints}: no checkpoint to resume from")
        resume = self._resume_sharded if self.sharded else self._resume_whole
        state = resume(checkpoint)
        self.batches.seek(state["data"])
        restore_rank_rng(self.processes.rank, self.processes.device, state)
        return state["step"]

    def _resume_whole(self, checkpoint: Path) -> dict[str, Any]:
        device = self.processes.device
        resumed = DiTVLAPolicy.from_pretrained(checkpoint / "policy", map_location=device)
        self.policy.load_state_dict(resumed.state_dict())
        state, ema_state = read_checkpoint(checkpoint, self.optimizer)
        if self.ema is not None and ema_state is not None:
            self.ema.load_state_dict(ema_state)
        return state

    def _resume_sharded(self, checkpoint: Path) -> dict[str, Any]:
        """Each process reads its own shards (the policy/ folder's whole weights are for
        users)."""
        state = read_sharded_checkpoint(checkpoint, self.processes.world)
        load_sharded_state(checkpoint / SHARDED_STATE, self.policy, self.optimizer, self.ema)
        return state

    def step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; its metrics (the loss
        averaged over processes, the learning rate, the gradient norm, the loss's parts)."""
        config, distributed = self.config, self.processes.distributed
        loss_sum = 0.0
        parts: dict[str, float] = {}  # the loss's parts (action, foresight) and metrics
        for micro in range(config.grad_accum):
            batch = self.batches.next()
            # Gradients are all-reduced once per step, on its last micro-batch.
            sync = micro == config.grad_accum - 1 or not distributed
            if self.sharded:
                self.policy.set_requires_gradient_sync(sync)
            unsynced = self.model.no_sync() if not (sync or self.sharded) else nullcontext()
            with unsynced, self.autocast:
                loss, metrics = self.model(batch)
            (loss / config.grad_accum).backward()
            loss_sum += loss.item() / config.grad_accum
            for key, value in metrics.items():
                parts[key] = parts.get(key, 0.0) + value / config.grad_accum
        grad_norm = optimizer_step(self.optimizer, self.schedule, self.trainable, config.grad_clip)
        if self.ema is not None:
            self.ema.update_parameters(self.policy)
        if self.kept:  # the share of frames whose tokens were read back, so far
            parts["kept_frames"] = sum(k.hits for k in self.kept) / max(
                1, sum(k.hits + k.misses for k in self.kept)
            )
        return {
            "loss": self.processes.mean(loss_sum),
            "lr": self.schedule.get_last_lr()[0],
            "grad_norm": grad_norm,
            **parts,
        }

    def save_checkpoint(self, folder: Path, step: int) -> None:
        """Write a checkpoint: the main process writes it, with what the others hold (their
        RNG states; a sharded run's whole weights and EMA, gathered on it), and in a
        sharded run every process writes its shards of the model, optimizer and EMA."""
        processes = self.processes
        rank_rng = [None] * processes.world
        if processes.distributed:
            torch.distributed.all_gather_object(rank_rng, rank_rng_state(processes.device))
        if self.sharded:
            policy_state, ema_state = self._write_shards(folder)
        else:
            policy_state = None
            ema_state = self.ema.state_dict() if self.ema is not None else None
        if processes.main:
            state = {
                "step": step,
                "data": self.batches.position(),
                "rank_rng": {str(r): s for r, s in enumerate(rank_rng) if r and s is not None},
            }
            write_checkpoint(
                folder,
                policy=self.policy,
                policy_state=policy_state,
                ema_state=ema_state,
                optimizer=None if self.sharded else self.optimizer,
                trainer_state=state,
                sharded_processes=processes.world if self.sharded else None,
            )
        processes.barrier()

    def _write_shards(self, folder: Path) -> tuple[dict, dict | None]:
        """Every process's shards written into the unfinished checkpoint ``folder``; the
        whole weights and EMA weights, gathered on the main process ({} on the others)."""
        policy_state = gathered_on_main(self.policy.state_dict())
        ema_state = self.ema.state_dict(self.policy) if self.ema is not None else None
        if self.processes.main:
            start_checkpoint(folder)
        self.processes.barrier()
        save_sharded_state(
            unfinished_checkpoint(folder) / SHARDED_STATE, self.policy, self.optimizer, self.ema
        )
        self.processes.barrier()  # every process's shards written before the folder is renamed
        return policy_state, ema_state

    def save_final(self, folder: Path) -> Path:
        """The final policy (the EMA weights when EMA is on), then leave the process group."""
        if self.sharded:  # gathered whole on the main process (collectives)
            final_policy = self.policy
            state = (
                self.ema.full_weights(self.policy)
                if self.ema is not None
                else gathered_on_main(self.policy.state_dict())
            )
        else:
            final_policy, state = (self.ema.module if self.ema is not None else self.policy), None
        if self.processes.main:
            final_policy.save_pretrained(folder, state=state)
        if self.processes.distributed:
            if (
                self.sharded
            ):  # the sharded modules go before their process group (else a flaky abort)
                del final_policy
                self.model = self.policy = self.ema = self.optimizer = self.schedule = None
                self.trainable = []
                gc.collect()
            self.processes.barrier()
            torch.distributed.destroy_process_group()
        return folder


def keep_frozen_features(
    policy: torch.nn.Module, config: TrainConfig, device: torch.device
) -> list[KeptFeatures]:
    """Each frozen pretrained encoder of ``policy`` keeps the tokens of the frames it sees
    (``config.kept_features_gib`` shared among them) where frames repeat exactly: no image
    augmentation, and on the CPU (hashing a frame on a GPU would copy it back)."""
    if config.augment or device.type != "cpu" or config.kept_features_gib <= 0:
        return []
    encoders = [m for m in policy.modules() if isinstance(m, PretrainedConvEncoder)]
    limit = int(config.kept_features_gib * 2**30) // max(1, len(encoders))
    return [encoder.keep_features(limit) for encoder in encoders]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

"""``ditvla train --sharding fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each process keeps a shard of every parameter, gradient and optimizer state, so a
backbone that does not fit one GPU trains on several. The units are the VLM's transformer
blocks (the elements of its layer lists that are or hold a class its ``transformers``
model names in ``_no_split_modules``): each is gathered for its own forward and backward
and freed after.
Everything else — the embeddings, the DiT heads (whose context cache is computed outside
their ``forward``), the normalizer — forms the root unit, gathered for the whole step.

A checkpoint keeps the run's state as it lies, each process writing its own shards of the
model, the optimizer and the EMA as safetensors + JSON, which a run of as many processes
reads back (:func:`save_sharded_state`, :func:`load_sharded_state`; nothing read runs
code), and the whole weights for users, gathered on the main process only
(:func:`gathered_on_main`).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ditvla.contract import CheckpointError
from ditvla.training.checkpoints import as_saved, optimizer_state, restore_optimizer

MODEL, EMA = "model.", "ema."


def shard_units(policy: nn.Module) -> list[nn.Module]:
    """The VLM's transformer blocks: the elements of its layer lists (vision encoder and
    language model) that are, or hold, a class its ``transformers`` model names in
    ``_no_split_modules``; innermost first."""
    backbone = policy.backbone
    names: set[str] = set()
    for part in (backbone.vision, backbone.language):
        names.update(getattr(part, "_no_split_modules", None) or ())
    units = []
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList):
            units.extend(m for m in module if any(type(x).__name__ in names for x in m.modules()))
    return units[::-1]


def no_split_classes(policy: nn.Module) -> list[str]:
    """The class names of :func:`shard_units` (what accelerate's FSDP auto-wrap reads from
    a model's ``_no_split_modules``)."""
    return sorted({type(m).__name__ for m in shard_units(policy)})


def shard_policy(policy: nn.Module, device_type: str, world_size: int) -> int:
    """Shard ``policy`` in place over all processes; returns the number of block units.
    Call after moving it to its device and before building its optimizer."""
    mesh = init_device_mesh(device_type, (world_size,))
    # Every process starts from the main process's weights (as DistributedDataParallel
    # makes sure of; fully_shard keeps each process's own initialization otherwise).
    with torch.no_grad():
        for tensor in policy.state_dict().values():
            dist.broadcast(tensor, src=0)
    units = shard_units(policy)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return len(units)


def gathered_on_main(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole tensors of ``state``, on the main process's CPU; {} on the others (a
    collective: every process must call it). One sharded tensor is gathered at a time, so
    no process holds more than one whole tensor on its device."""
    main = dist.get_rank() == 0
    whole = {}
    for key, value in state.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if main:
            whole[key] = value.detach().cpu()
    return whole


def save_sharded_state(
    folder: Path, policy: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA | None
) -> None:
    """This process's shards of the model, the optimizer and the EMA, written into
    ``folder`` (``process_<rank>.safetensors``, and ``process_<rank>.json``: the optimizer's
    param groups and scalar state, the EMA's number of updates and each tensor's whole
    shape). Not a collective: wait for every process before the folder is complete."""
    tensors = {MODEL + name: value for name, value in policy.state_dict().items()}
    optimizer_tensors, optimizer_meta = optimizer_state(optimizer)
    tensors.update(optimizer_tensors)
    meta: dict[str, Any] = {"optimizer": optimizer_meta}
    if ema is not None:
        tensors.update({EMA + name: value for name, value in ema.averaged(policy).items()})
        meta["ema"] = {"n_averaged": ema.n_averaged}
    meta["shapes"] = {name: list(value.shape) for name, value in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    tensors_file, meta_file = _process_files(folder)
    local = {name: as_saved(_local(value)) for name, value in tensors.items()}
    save_file(local, str(tensors_file))
    meta_file.write_text(json.dumps(meta, indent=1) + "\n")


def load_sharded_state(
    folder: Path, policy: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA | None
) -> None:
    """Each process reads back its own files of :func:`save_sharded_state` (written by as
    many processes) into its shards of the model, the optimizer and, when both the run and
    the checkpoint have one, the EMA. CheckpointError, naming what differs, for shards of
    another model than ``policy``'s as it is sharded here (before anything is changed)."""
    tensors_file, meta_file = _process_files(folder)
    if not (tensors_file.exists() and meta_file.exists()):
        raise CheckpointError(f"{folder}: no shards of process {dist.get_rank()}")
    saved = load_file(str(tensors_file))
    meta = json.loads(meta_file.read_text())
    shapes = meta["shapes"]
    model = policy.state_dict(keep_vars=True)
    _check_shards(tensors_file, saved, shapes, MODEL, model)
    averaged = ema.averaged(policy) if ema is not None and "ema" in meta else None
    if averaged is not None:
        _check_shards(tensors_file, saved, shapes, EMA, averaged)
    as_param_state = partial(_as_param_state, tensors_file, shapes)
    restore_optimizer(optimizer, saved, meta["optimizer"], as_param_state)
    with torch.no_grad():
        for name, value in model.items():
            _local(value).copy_(saved[MODEL + name])
    if averaged is not None:
        ema.load_shards([saved[EMA + name] for name in averaged], meta["ema"]["n_averaged"])


def _process_files(folder: Path) -> tuple[Path, Path]:
    """This process's tensors and JSON in a sharded state's ``folder``."""
    stem = folder / f"process_{dist.get_rank()}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _check_shards(
    file: Path,
    saved: dict[str, torch.Tensor],
    shapes: dict[str, list[int]],
    prefix: str,
    mine: dict[str, torch.Tensor],
) -> None:
    """CheckpointError unless the tensors of ``saved`` named ``prefix`` + a name of
    ``mine`` are this process's shards of them, and no others are named ``prefix``."""
    names = {name.removeprefix(prefix) for name in saved if name.startswith(prefix)}
    if names != mine.keys():
        missing, unknown = sorted(mine.keys() - names), sorted(names - mine.keys())
        found = []
        if missing:
            found.append(f"{len(missing)} of this run's tensors missing ({_first_few(missing)})")
        if unknown:
            found.append(f"{len(unknown)} not in this run ({_first_few(unknown)})")
        raise CheckpointError(f"{file}: not this run's model: {'; '.join(found)}")
    for name, tensor in mine.items():
        _check_shard(file, prefix + name, saved[prefix + name], shapes, tensor)


def _first_few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _check_shard(
    file: Path, name: str, saved: torch.Tensor, shapes: dict[str, list[int]], mine: torch.Tensor
) -> None:
    """CheckpointError unless ``saved`` (whole shape ``shapes[name]``) is shaped as this
    process's shard of ``mine``."""
    found = (shapes.get(name), list(saved.shape))
    wanted = (list(mine.shape), list(_local(mine).shape))
    if found != wanted:
        raise CheckpointError(
            f"{file}: {name} is {found[0]} (this process's shard {found[1]}), where this "
            f"run's is {wanted[0]} ({wanted[1]}): not this run's model"
        )


def _as_param_state(
    file: Path, shapes: dict[str, list[int]], param: torch.Tensor, name: str, saved: torch.Tensor
) -> torch.Tensor:
    """An optimizer state tensor read back, as its parameter's state: sharded as the
    parameter is when shaped like it; a scalar (such as AdamW's ``step``) as it is."""
    if shapes.get(name) == [] and saved.dim() == 0:
        return saved
    _check_shard(file, name, saved, shapes, param)
    if not isinstance(param, DTensor):
        return saved
    return DTensor.from_local(
        saved.to(param.to_local().device),
        param.device_mesh,
        param.placements,
        shape=param.shape,
        stride=param.stride(),
    )


class ShardedEMA:
    """The EMA of a sharded policy's parameters, kept as each process's own shards.

    What ``torch.optim.swa_utils.AveragedModel`` does for a whole model (an FSDP module
    cannot be deep-copied): the first update copies the weights, later ones apply
    ``multi_avg_fn(averaged, current, n_averaged)`` to the local shards.
    """

    def __init__(self, policy: nn.Module, multi_avg_fn):
        self.multi_avg_fn = multi_avg_fn
        self.shards = [_local(p).detach().clone() for p in policy.parameters()]
        self.n_averaged = 0

    @torch.no_grad()
    def update_parameters(self, policy: nn.Module) -> None:
        current = [_local(p).detach() for p in policy.parameters()]
        if self.n_averaged == 0:
            torch._foreach_copy_(self.shards, current)
        else:
            self.multi_avg_fn(self.shards, current, torch.tensor(self.n_averaged))
        self.n_averaged += 1

    def full_weights(self, policy: nn.Module) -> dict[str, torch.Tensor]:
        """``policy``'s whole state with the averaged parameters, on the main process; {}
        on the others (a collective)."""
        return gathered_on_main({**policy.state_dict(), **self.averaged(policy)})

    def state_dict(self, policy: nn.Module) -> dict[str, torch.Tensor]:
        """As ``AveragedModel.state_dict()`` of the whole model, on the main process; {} on
        the others (a collective)."""
        weights = {f"module.{k}": v for k, v in self.full_weights(policy).items()}
        return {**weights, "n_averaged": torch.tensor(self.n_averaged)} if weights else {}

    @torch.no_grad()
    def load_shards(self, shards: list[torch.Tensor], n_averaged: int) -> None:
        """Continue from this process's shards of the averaged parameters (in the policy's
        order) and the number of updates, read back from a checkpoint."""
        for mine, saved in zip(self.shards, shards, strict=True):
            mine.copy_(saved)
        self.n_averaged = n_averaged

    def averaged(self, policy: nn.Module) -> dict[str, torch.Tensor]:
        """The averaged parameters by name, sharded as ``policy``'s are."""
        averaged = {}
        for (name, param), shard in zip(policy.named_parameters(), self.shards, strict=True):
            if isinstance(param, DTensor):
                shard = DTensor.from_local(
                    shard,
                    param.device_mesh,
                    param.placements,
                    shape=param.shape,
                    stride=param.stride(),
                )
            averaged[name] = shard
        return averaged


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param

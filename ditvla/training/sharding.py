"""``ditvla train --sharding fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each process keeps a shard of every parameter, gradient and optimizer state, so a
backbone that does not fit one GPU trains on several. The units are the VLM's transformer
blocks (the elements of its layer lists that are or hold a class its ``transformers``
model names in ``_no_split_modules``): each is gathered for its own forward and backward
and freed after.
Everything else — the embeddings, the DiT heads (whose context cache is computed outside
their ``forward``), the normalizer — forms the root unit, gathered for the whole step.

A checkpoint keeps the run's state as it lies, each process writing its own shards with
``torch.distributed.checkpoint`` (:func:`save_sharded_state`, :func:`load_sharded_state`),
and the whole weights for users, gathered on the main process only
(:func:`gathered_on_main`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


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
    """Each process writes its shards of the model, the optimizer and the EMA into
    ``folder`` (``torch.distributed.checkpoint``; a collective)."""
    dcp.save(_sharded_state(policy, optimizer, ema), checkpoint_id=folder)


def load_sharded_state(
    folder: Path, policy: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA | None
) -> None:
    """Each process reads its shards of what :func:`save_sharded_state` wrote into the
    model, the optimizer and the EMA (a collective)."""
    state = _sharded_state(policy, optimizer, ema)
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        policy,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
    if ema is not None:
        ema.load_sharded_state(state["ema"])


def _sharded_state(
    policy: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA | None
) -> dict[str, Any]:
    model, optimizer_state = get_state_dict(policy, optimizer)
    state = {"model": model, "optimizer": optimizer_state}
    if ema is not None:
        state["ema"] = ema.sharded_state(policy)
    return state


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
        return gathered_on_main({**policy.state_dict(), **self._averaged(policy)})

    def state_dict(self, policy: nn.Module) -> dict[str, torch.Tensor]:
        """As ``AveragedModel.state_dict()`` of the whole model, on the main process; {} on
        the others (a collective)."""
        weights = {f"module.{k}": v for k, v in self.full_weights(policy).items()}
        return {**weights, "n_averaged": torch.tensor(self.n_averaged)} if weights else {}

    def sharded_state(self, policy: nn.Module) -> dict[str, torch.Tensor]:
        """The averaged parameters as this process's shards of ``policy``'s (over its
        device mesh), and the number of updates: what a sharded checkpoint keeps."""
        return {**self._averaged(policy), "n_averaged": torch.tensor(self.n_averaged)}

    @torch.no_grad()
    def load_sharded_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a :meth:`sharded_state` read back from a checkpoint."""
        loaded = [_local(value) for key, value in state.items() if key != "n_averaged"]
        torch._foreach_copy_(self.shards, loaded)
        self.n_averaged = int(state["n_averaged"])

    def _averaged(self, policy: nn.Module) -> dict[str, torch.Tensor]:
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

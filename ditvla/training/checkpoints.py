"""Training checkpoints as safetensors + JSON (no pickle), written atomically.

A checkpoint folder ``checkpoints/step_000500/`` holds:

- ``policy/``: the policy at that step (``save_pretrained``), loadable on its own;
- ``ema.safetensors``: the EMA weights, when EMA is on;
- ``optimizer.safetensors`` + ``trainer_state.json``: optimizer tensors, its param groups,
  the LR schedule, the step, the data sampler's position and every RNG state, so a resumed
  run continues exactly where the interrupted one stopped;
- ``sharded/``, a sharded (FSDP2) run's instead of the optimizer tensors: the model, the
  optimizer and the EMA as each process held them, each process writing its own shards
  (``process_<rank>.safetensors``) and what is not a tensor (``process_<rank>.json``),
  which a run of as many processes resumes from; ``trainer_state.json`` says how many
  (``sharded.processes``).

It is written into ``step_000500.tmp`` and renamed; ``checkpoints/latest`` (a one-line
file, replaced atomically) names the newest complete one. A run killed at any point
resumes from that one; the named crash points (:mod:`ditvla.crash_points`) let a test end
a run half-way through writing a checkpoint, or right after one, and check exactly that.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ditvla.contract import CheckpointError
from ditvla.crash_points import crash_point

LATEST = "latest"
SHARDED_STATE = "sharded"
OPTIMIZER_STATE = "opt."


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state tensors as it holds them (a sharded optimizer's are DTensors),
    named ``opt.<param id>.<key>``, and what is not a tensor, as JSON: its param groups and
    scalar state."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIMIZER_STATE}{param_id}.{key}"] = value
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    as_param_state: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Load what :func:`optimizer_state` returned into ``optimizer`` (the names of
    ``tensors`` not named ``opt.*`` are ignored). ``as_param_state(param, name, tensor)``:
    the value its parameter's state takes for a tensor read back (a sharded parameter's
    DTensor); the tensor itself when not given."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(OPTIMIZER_STATE):
            continue
        number, key = name.removeprefix(OPTIMIZER_STATE).split(".", 1)
        param_id = int(number)
        if param_id >= len(params):
            raise CheckpointError(
                f"{name}: the state of parameter {param_id}, but the optimizer has "
                f"{len(params)}: another model's, or other parameters trained"
            )
        if as_param_state is not None:
            value = as_param_state(params[param_id], name, value)
        state.setdefault(param_id, {})[key] = value
    for name, value in meta["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def as_saved(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as safetensors writes it: detached, contiguous, on the CPU."""
    return tensor.detach().contiguous().cpu()


def rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random generator training draws from: tensors and JSON parts."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def restore_rng_states(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda{i}"], i)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state(
        (kind, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    version, state, py_gauss = meta["python"]
    random.setstate((version, tuple(state), py_gauss))


def unfinished_checkpoint(folder: Path) -> Path:
    """Where the checkpoint ``folder`` is written before it is renamed into place."""
    return folder.with_name(folder.name + ".tmp")


def start_checkpoint(folder: Path) -> Path:
    """An empty :func:`unfinished_checkpoint` folder (what a crash left there removed)."""
    tmp = unfinished_checkpoint(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def rank_rng_state(device: torch.device) -> dict[str, list[int]]:
    """This process's torch generators, the CPU's and its GPU's, as JSON (what the main
    process's checkpoint keeps of each other process; its own are :func:`rng_states`)."""
    state = {"torch": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rank_rng(rank: int, device: torch.device, trainer_state: dict[str, Any]) -> None:
    """A process other than the main one takes back its :func:`rank_rng_state` from the
    checkpoint's trainer state."""
    mine = trainer_state.get("rank_rng", {}).get(str(rank))
    if rank == 0 or mine is None:
        return
    if isinstance(mine, list):  # a checkpoint that kept the CPU generator only
        mine = {"torch": mine}
    torch.set_rng_state(torch.tensor(mine["torch"], dtype=torch.uint8))
    if "cuda" in mine:
        torch.cuda.set_rng_state(torch.tensor(mine["cuda"], dtype=torch.uint8), device)


def write_checkpoint(
    folder: Path,
    *,
    policy,
    ema_state: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    policy_state: dict[str, torch.Tensor] | None = None,
    sharded_processes: int | None = None,
) -> None:
    """Write a complete checkpoint at ``folder`` atomically and point ``latest`` at it.

    ``policy_state``: the policy's weights gathered elsewhere (a sharded run's).
    ``sharded_processes``: a sharded run's number of processes, which have written their
    shards of the model, optimizer and EMA into ``start_checkpoint(folder) / SHARDED_STATE``
    (no ``optimizer`` then)."""
    if sharded_processes is None:
        tmp = start_checkpoint(folder)
    else:
        tmp = unfinished_checkpoint(folder)
        trainer_state = {**trainer_state, "sharded": {"processes": sharded_processes}}
    policy.save_pretrained(tmp / "policy", state=policy_state)
    crash_point("checkpoint.policy_written")  # half a checkpoint, not yet renamed into place
    if ema_state is not None:
        save_file({k: as_saved(v) for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
    rng_tensors, rng_meta = rng_states()
    meta = {**trainer_state, "rng": rng_meta}
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_state(optimizer)
        rng_tensors = {**{k: as_saved(v) for k, v in opt_tensors.items()}, **rng_tensors}
        meta["optimizer"] = opt_meta
    save_file(rng_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    latest = folder.parent / LATEST
    latest_tmp = folder.parent / (LATEST + ".tmp")
    latest_tmp.write_text(folder.name + "\n")
    os.replace(latest_tmp, latest)
    crash_point("checkpoint.written")


def latest_checkpoint(checkpoints: Path) -> Path | None:
    pointer = checkpoints / LATEST
    if not pointer.exists():
        return None
    folder = checkpoints / pointer.read_text().strip()
    return folder if (folder / "trainer_state.json").exists() else None


def read_checkpoint(
    folder: Path, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict | None]:
    """Restore the optimizer and the RNGs; return the trainer state and the EMA weights."""
    meta = _resumable_trainer_state(folder)
    if "sharded" in meta:
        processes = meta["sharded"]["processes"]
        raise CheckpointError(
            f"{folder}: written by a sharded run of {processes} processes, whose optimizer "
            f"state is sharded: resume it as one (torchrun --nproc_per_node {processes} ... "
            "--sharding fsdp --resume)"
        )
    tensors = load_file(str(folder / "optimizer.safetensors"))
    restore_optimizer(optimizer, tensors, meta.pop("optimizer"))
    restore_rng_states(tensors, meta.pop("rng"))
    ema_path = folder / "ema.safetensors"
    ema = load_file(str(ema_path)) if ema_path.exists() else None
    return meta, ema


def read_sharded_checkpoint(folder: Path, processes: int) -> dict[str, Any]:
    """Restore the RNGs from a sharded run's checkpoint; return its trainer state. Its
    model, optimizer and EMA are read by every process from ``folder / SHARDED_STATE``
    (:func:`ditvla.training.sharding.load_sharded_state`)."""
    meta = _resumable_trainer_state(folder)
    if "sharded" not in meta:
        raise CheckpointError(
            f"{folder}: written by an unsharded run: resume it as one (--sharding ddp, or one "
            "process), or start a sharded run afresh"
        )
    written_by = meta["sharded"]["processes"]
    if written_by != processes:
        raise CheckpointError(
            f"{folder}: written by {written_by} processes, resumed by {processes}: each "
            "process's data position and random state continue only in as many; resume with "
            f"torchrun --nproc_per_node {written_by}"
        )
    tensors = load_file(str(folder / "optimizer.safetensors"))
    restore_rng_states(tensors, meta.pop("rng"))
    return meta


def _resumable_trainer_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``; CheckpointError for one that holds the
    weights only (a sharded run's, before sharded runs kept their optimizer state)."""
    meta = json.loads((folder / "trainer_state.json").read_text())
    if "optimizer" not in meta and "sharded" not in meta:
        raise CheckpointError(
            f"{folder}: holds the weights only (written by a sharded run of an earlier "
            "version, which kept no optimizer state): it does not resume; its policy/ "
            "folder loads as any policy"
        )
    return meta

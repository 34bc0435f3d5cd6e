"""Torch devices by name, for every command that takes ``--device`` (train, serve), and the
wait that makes a clock read after GPU work time the work, not its launch."""

from __future__ import annotations

import torch

from ditvla.errors import ConfigError


def device_named(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU) or a torch device name (``cpu``,
    ``cuda``, ``cuda:1``); ConfigError for a name torch does not know or a CUDA device this
    machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s)")
    return device


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has run the work queued on it (CUDA launches kernels and
    returns at once); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)

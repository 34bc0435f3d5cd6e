"""Checking and batching what a policy is given: observations in, tensors out.

An observation is ``{"images": {camera: uint8 (H, W, 3)}, "state": float32 (D,),
"instruction": str}``, or a batch of them with a leading B on arrays and a list of
instructions. Anything that does not fit what the policy was built for raises
:class:`~ditvla.contract.PolicyInputError` naming the key, the shape it has and the shape
expected, before any weight is touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ditvla.contract import PolicyInputError


def as_batch(observation: dict[str, Any], *, needs_state: bool) -> tuple[dict[str, Any], bool]:
    """``(batch, single)``: the observation batched (B = 1 for a single one, whose
    instruction is a string) and whether it was single; missing keys raise."""
    for key in ("images", "instruction") + (("state",) if needs_state else ()):
        if key not in observation:
            raise PolicyInputError(f"observation is missing {key!r}")
    if not isinstance(observation["instruction"], str):
        return observation, False
    images = {cam: np.asarray(v)[None] for cam, v in observation["images"].items()}
    batched = {"images": images, "instruction": [observation["instruction"]]}
    if "state" in observation:
        batched["state"] = np.asarray(observation["state"])[None]
    return batched, True


def image_batch(images: dict[str, Any], cameras: list[str], size: int | None) -> torch.Tensor:
    """{camera: uint8 (B, H, W, 3)} -> float (B, cameras, 3, H, W) in [0, 1], validated
    (``size``: the square side expected, None for any)."""
    frames = []
    for cam in cameras:
        if cam not in images:
            raise PolicyInputError(
                f"observation is missing camera {cam!r} (expected cameras: {', '.join(cameras)})"
            )
        x = torch.as_tensor(
            np.asarray(images[cam]) if not torch.is_tensor(images[cam]) else images[cam]
        )
        if x.ndim != 4 or x.shape[-1] != 3 or (size and tuple(x.shape[1:3]) != (size, size)):
            expected = f"(B, {size}, {size}, 3)" if size else "(B, H, W, 3)"
            raise PolicyInputError(
                f"images[{cam!r}] has shape {tuple(x.shape)}, expected {expected} uint8"
            )
        if x.dtype != torch.uint8:
            raise PolicyInputError(f"images[{cam!r}] has dtype {x.dtype}, expected uint8")
        frames.append(x.permute(0, 3, 1, 2))
    return torch.stack(frames, dim=1).float() / 255.0


def float_batch(value: Any, name: str, dim: int) -> torch.Tensor:
    """``value`` as float (B, dim), finite; else PolicyInputError naming ``name``."""
    x = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value).float()
    if x.ndim != 2 or x.shape[1] != dim:
        raise PolicyInputError(f"{name} has shape {tuple(x.shape)}, expected (B, {dim})")
    if not torch.isfinite(x).all():
        raise PolicyInputError(f"{name} holds NaN or infinite values")
    return x


def state_batch(state: Any, dim: int) -> torch.Tensor:
    """A state (D,) or (B, D), tensor or array, as float (B, D), checked."""
    if state is None:
        raise PolicyInputError(f"state is required, shape (B, {dim})")
    state = state if torch.is_tensor(state) else torch.as_tensor(np.asarray(state))
    return float_batch(state[None] if state.ndim == 1 else state, "state", dim)


def pixels_fit(pixels: torch.Tensor, instructions: list[str], cameras: int, size: int) -> None:
    """Check frames already in the model's layout, float (B, cameras, 3, S, S), and one
    instruction per frame."""
    expected = (cameras, 3, size, size)
    if pixels.ndim != 5 or tuple(pixels.shape[1:]) != expected:
        raise PolicyInputError(
            f"pixels have shape {tuple(pixels.shape)}, expected "
            f"(B, {', '.join(map(str, expected))})"
        )
    if len(instructions) != pixels.shape[0]:
        raise PolicyInputError(
            f"{len(instructions)} instructions for a batch of {pixels.shape[0]} observations"
        )

"""The contract between ditvla's four parts: what data describes, what a policy promises.

The parts meet here instead of importing each other (``policies`` knows no dataset,
simulator or runtime; ``envs`` and ``deploy`` know no policy class):

- **Data -> policy.** The datasets side describes a store with a :class:`DataSpec`
  (cameras, image size, state and action widths, which state arrays make up the state,
  normalization statistics). A policy is configured from that description, never from a
  store.
- **Policy -> evaluator.** The rollout evaluator needs a :class:`ChunkPolicy`: a
  :class:`PolicySpec` saying what it reads and returns, ``reset()`` and
  ``predict_action_chunk(batch)``. The baselines (random, expert), the DiT policy and
  its quantized copies all speak it.
- **Policy -> runtime.** The dual-system runtime needs a :class:`DualSystemPolicy`: the
  slow half ``encode`` (System 2), the fast half ``act`` (System 1) and ``context_from``
  (a context from tokens that System 2 computed in another process).

:func:`load_policy` is the one place that turns a saved folder into a policy object.

Observations follow one schema (``envs/schema.py`` for environments)::

    {"images": {camera: uint8 (H, W, 3)}, "state": float32 (D,), "instruction": str}

batched with a leading B on arrays and a list of instructions.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from ditvla.errors import DitvlaError


class PolicyInputError(DitvlaError, ValueError):
    """An observation or batch that does not match what the policy was built for."""


class CheckpointError(DitvlaError, RuntimeError):
    """A policy folder that is incomplete, damaged, of another format or version."""


# The file in a policy folder that names its format (and holds its settings).
CONFIG_FILE = "config.json"


# Evaluation episodes are seeded from here up, demonstrations from 0 up: the two never
# share an episode (the evaluator, ``ditvla robot --sim`` and ``collect`` agree on it).
EVAL_SEED_START = 100_000

# The state a policy reads, by selection (``--state`` of train, the demo, to-lerobot):
# proprioception (the store's ``state_keys``: what a real robot has; the default
# everywhere), ``full`` (with the simulator's privileged object poses and goals), ``none``
# (cameras and words alone), or arrays by name (``KEY[,KEY...]``).
STATE_PROPRIO, STATE_FULL, STATE_NONE = "proprio", "full", "none"


def state_feature_names(widths: dict[str, int]) -> list[str]:
    """The names of a flat state's values, for a dataset's feature description
    (LeRobot's ``observation.state``): ``<array>.<index>`` for each value of each array
    (name -> width), in order, so that a reader knows which arrays the state is made of."""
    return [f"{key}.{i}" for key, width in widths.items() for i in range(width)]


def state_keys_of_names(names: Any) -> list[str] | None:
    """The arrays a state is made of, read back from :func:`state_feature_names`' names;
    None when the names are absent or say something else (a robot's joint names, say)."""
    if not isinstance(names, list) or not names:
        return None
    keys: list[str] = []
    next_index = 0
    for name in map(str, names):
        key, _, index = name.rpartition(".")
        if not key or not index.isdigit():
            return None
        if keys and key == keys[-1] and int(index) == next_index:
            next_index += 1
        elif int(index) == 0 and key not in keys:
            keys.append(key)
            next_index = 1
        else:
            return None
    return keys


# Normalization statistics per feature: {key: {name: [value per channel]}}.
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
Stats = dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class DataSpec:
    """What a policy needs to know about its training data.

    ``stats`` holds ``"action"``, ``"state"`` (the state as composed from
    ``state_keys``) and one entry per camera. ``image_size`` is the cameras' shared
    square side (0 without cameras).
    """

    cameras: tuple[str, ...]
    image_size: int
    state_dim: int
    action_dim: int
    state_keys: tuple[str, ...] = ("state",)
    stats: Stats = field(default_factory=dict)


@dataclass(frozen=True)
class PolicySpec:
    """What a policy reads and returns; the evaluator and the runtime need nothing else.

    Args:
        cameras: camera names read from ``observation["images"]``.
        image_size: square side of each camera frame (uint8 (S, S, 3)).
        state_dim: width of ``observation["state"]`` (0: the policy reads no state).
        action_dim: width A of each action.
        horizon: actions per chunk (H).
        n_action_steps: how many of a chunk's actions to execute before asking again.
        state_keys: the state arrays, in order, that make up ``state`` (names of a
            store's ``data/`` arrays and of an environment's state parts).
        noise_shape: one row of the initial noise of a diffusion policy, (H, A), which
            ``predict_action_chunk(batch, noise=(B, H, A))`` accepts so that rollouts can
            be seeded per episode; None for policies that draw no noise.
        reads_expert_action: the policy needs the simulator's scripted-expert action in
            each observation (``"expert_action"``): the expert baseline.
        action_low / action_high: per action dimension, the smallest and largest action
            of the training data (None when unknown): a controller's default limits.
    """

    cameras: tuple[str, ...]
    image_size: int
    state_dim: int
    action_dim: int
    horizon: int = 1
    n_action_steps: int = 1
    state_keys: tuple[str, ...] = ("state",)
    noise_shape: tuple[int, int] | None = None
    reads_expert_action: bool = False
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None


@runtime_checkable
class ChunkPolicy(Protocol):
    """A policy the rollout evaluator can run: a batch of observations -> action chunks."""

    @property
    def spec(self) -> PolicySpec: ...

    def reset(self) -> None:
        """Forget any per-episode state."""

    def predict_action_chunk(self, observation: dict[str, Any], **options: Any) -> Any:
        """Batched observations -> actions (B, H, A) in the robot's units (tensor or array).

        ``options`` may carry ``noise`` (B, *spec.noise_shape) for diffusion policies."""


@runtime_checkable
class DualSystemPolicy(ChunkPolicy, Protocol):
    """A policy the dual-system runtime can run at two rates."""

    def encode(self, observation: dict[str, Any]) -> Any:
        """The slow half (System 2): cameras + instruction -> a context."""

    def context_from(self, tokens: Any, mask: Any) -> Any:
        """A context from System 2's tokens (B, L, width) and mask (B, L)."""

    def act(self, context: Any, state: Any = None, **options: Any) -> Any:
        """The fast half (System 1): a chunk (B, H, A) from a context and the newest state.

        ``options``: ``noise``, ``num_steps``, ``inpaint=(actions, weights)``."""


@runtime_checkable
class SplitsBySystem(Protocol):
    """A dual-system policy whose halves can run in two processes, each holding only the
    weights it runs (``ditvla serve``: System 2's process the VLM, System 1 the head)."""

    def vlm_tokens(self, observation: dict[str, Any]) -> tuple[Any, Any]:
        """System 2's share of ``encode``: the tokens (B, L, width) and mask (B, L) that
        ``context_from`` takes."""

    def keep_only(self, system: str) -> dict[str, int]:
        """Release, in place, what the other system (``system1`` or ``system2``) runs; the
        bytes of weights kept and released."""


# What a policy's action head can compute in at inference (--head-dtype of eval / serve).
HeadDType = Literal["float32", "bfloat16"]


@runtime_checkable
class ReducedPrecisionHead(Protocol):
    """A policy whose fast half can compute in a narrower dtype (``--head-dtype``); not
    every policy can, so this is a capability of its own, not part of the runtime's
    contract."""

    def set_head_dtype(self, name: HeadDType) -> None:
        """Run ``act``'s denoising in this dtype from now on (inference only)."""


# config.json "format" -> "module:class" of the policy that reads it.
POLICY_FORMATS = {"ditvla.policy": "ditvla.policies.policy:DiTVLAPolicy"}


def load_policy(
    folder: str | Path, device: str = "cpu", head_dtype: HeadDType = "float32"
) -> DualSystemPolicy:
    """The policy saved in ``folder`` (its ``config.json`` names its format), in eval mode,
    its action head computing in ``head_dtype``."""
    folder = Path(folder)
    config = folder / CONFIG_FILE
    try:
        meta = json.loads(config.read_text())
        fmt = meta.get("format")
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a policy folder (no config.json)") from None
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config}: not a policy config ({exc})") from None
    if fmt is None and isinstance(meta.get("type"), str):
        raise CheckpointError(
            f"{folder}: a LeRobot {meta['type']!r} policy; ditvla reads its own policies and "
            "LeRobot policies of type 'ditvla' (trained with lerobot_policy_ditvla)"
        )
    if fmt not in POLICY_FORMATS:
        raise CheckpointError(
            f"{folder}: unknown policy format {fmt!r}; this ditvla reads "
            + ", ".join(POLICY_FORMATS)
        )
    module, _, name = POLICY_FORMATS[fmt].partition(":")
    policy_class = getattr(importlib.import_module(module), name)
    policy = policy_class.from_pretrained(folder, map_location=device).eval()
    if head_dtype != "float32":
        if not isinstance(policy, ReducedPrecisionHead):
            raise CheckpointError(
                f"{folder}: a {name} cannot run its action head in {head_dtype}; use float32"
            )
        policy.set_head_dtype(head_dtype)
    return policy

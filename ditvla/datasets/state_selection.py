"""Which of a store's arrays make up the state a policy reads.

A store records proprioception (what a real robot has) apart from privileged simulator
state (object poses, goals), so that a policy reads the latter only when asked, and
every report can say which state it read. ``--state`` names the choice: ``proprio``,
``full``, ``none`` or a list of arrays; this module turns it into array names, from the
store's attributes and the arrays its :class:`~ditvla.datasets.store_index.StoreIndex`
found.
"""

from __future__ import annotations

from typing import Any

from ditvla.contract import STATE_FULL, STATE_NONE, STATE_PROPRIO
from ditvla.datasets.errors import DatasetError
from ditvla.datasets.store_index import StoreIndex
from ditvla.datasets.store_layout import valid_mask_key


def state_keys(index: StoreIndex) -> list[str]:
    """The arrays that make up the default state, in order."""
    keys = index.attrs.get("state_keys")
    if keys is None:
        keys = ["state"] if "state" in index.arrays else []
    return [k for k in keys if k in index.arrays] if index.arrays else list(keys)


def privileged_keys(index: StoreIndex) -> list[str]:
    """State arrays only a simulator knows (object poses, goals), recorded apart."""
    keys = index.attrs.get("privileged_keys", [])
    return [k for k in keys if k in index.arrays] if index.arrays else list(keys)


def padded_keys(index: StoreIndex) -> list[str]:
    """The privileged arrays stored padded (their width differs between tasks), each with
    its ``valid_mask_key`` array beside it."""
    return [k for k in privileged_keys(index) if valid_mask_key(k) in index.arrays]


def state_is_split(attrs: dict[str, Any]) -> bool:
    """Whether proprioception and privileged state are told apart in a store with these
    attributes. Meta-World stores written before they were hold one 39-D ``state`` of both."""
    source = str(attrs.get("source", ""))
    return bool(attrs.get("privileged_keys")) or not source.startswith("metaworld")


def resolve_auxiliary(index: StoreIndex, selection: str) -> list[str]:
    """The privileged arrays an auxiliary head learns to predict: ``privileged`` (every
    one the store records) or ``KEY[,KEY...]``, each one of them."""
    privileged = privileged_keys(index)
    keys = (
        privileged
        if selection == "privileged"
        else [key.strip() for key in selection.split(",") if key.strip()]
    )
    missing = [key for key in keys if key not in privileged]
    if missing or not keys:
        raise DatasetError(
            f"{index.path}: --auxiliary {selection!r}: no privileged array "
            f"{', '.join(missing) or '(none given)'}; the store's privileged arrays are "
            f"{', '.join(privileged) or 'none'}"
        )
    return keys


def resolve_state(index: StoreIndex, selection: str) -> list[str]:
    """The state arrays ``selection`` names: ``proprio`` (what a real robot has, the
    store's ``state_keys``), ``full`` (with the privileged arrays), ``none`` (no state:
    the cameras and the instruction alone) or ``KEY[,KEY...]``."""
    keys, padded_arrays = _selected_state(index, selection), padded_keys(index)
    padded = [key for key in keys if key in padded_arrays]
    if padded:
        raise DatasetError(
            f"{index.path}: --state {selection!r}: {', '.join(padded)} differs in width "
            "between the store's tasks (stored padded), so one policy cannot read it as "
            "state; learn it as an auxiliary target (--auxiliary), or train per task"
        )
    return keys


def _selected_state(index: StoreIndex, selection: str) -> list[str]:
    proprio, privileged = state_keys(index), privileged_keys(index)
    if selection == STATE_NONE:
        return []
    if selection == STATE_FULL:
        return [*proprio, *privileged]
    if selection == STATE_PROPRIO:
        if not state_is_split(index.attrs):
            raise DatasetError(
                f"{index.path}: its state mixes proprioception and privileged simulator state "
                "(written before they were recorded apart); split it with `ditvla dataset "
                "split-state`, or train on it as it is with --state full"
            )
        return proprio
    keys = [key.strip() for key in selection.split(",") if key.strip()]
    arrays, cameras = index.arrays, index.cameras
    masks = [valid_mask_key(k) for k in privileged]
    others = [k for k in arrays if k not in (*proprio, *privileged, *masks, *cameras, "action")]
    state_arrays = [*proprio, *privileged, *others]
    missing = [key for key in keys if key not in arrays or key in cameras]
    if missing or not keys:
        raise DatasetError(
            f"{index.path}: --state {selection!r}: no state array "
            f"{', '.join(missing) or '(none given)'}; the store has "
            f"{', '.join(state_arrays) or 'none'} (proprio = {' + '.join(proprio) or 'none'}, "
            f"full adds {' + '.join(privileged) or 'nothing'})"
        )
    return keys

"""The policy folder: what ``save_pretrained`` writes and ``from_pretrained`` reads.

One folder is a complete policy, read without network access::

    config.json          {"format": "ditvla.policy", "format_version": 1 | 2,
                          "policy": PolicyConfig, "quantization": recipe (format 2),
                          "type": "ditvla" and LeRobot's configuration keys}
    model.safetensors    every weight in float32, normalization statistics included
    vlm/                 the VLM's config and tokenizer (the architecture to rebuild)
    instruction_reader/  with an instruction reader: its encoder's config and tokenizer
    policy_preprocessor.json, policy_postprocessor.json   (LeRobot's processors)

Format 2 is a quantized policy: float weights with the calibration's corrections folded
in, and the recipe that quantizes them again at load (a format-1 reader refuses it with
"upgrade ditvla"). Saving writes a temporary sibling folder and renames it into place, so
a crash never leaves half a policy under the final name; nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ditvla.contract import CONFIG_FILE, CheckpointError
from ditvla.policies import lerobot_layout
from ditvla.policies.config import PolicyConfig
from ditvla.policies.quantization import QuantizationConfig, QuantizationError, apply_recipe

if TYPE_CHECKING:
    from ditvla.policies.policy import DiTVLAPolicy

POLICY_FORMAT = "ditvla.policy"
POLICY_FORMAT_VERSION = 1
QUANTIZED_FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
VLM_FOLDER = "vlm"
READER_FOLDER = "instruction_reader"


def save_policy(policy: DiTVLAPolicy, folder: str | Path, **options: Any) -> None:
    """:func:`write_policy_files` into a temporary sibling of ``folder``, renamed into
    place (an existing folder is replaced only once the new one is whole)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_policy_files(policy, tmp, **options)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def write_policy_files(
    policy: DiTVLAPolicy,
    folder: Path,
    *,
    drop_foresight: bool = False,
    quantization: dict[str, Any] | None = None,
    config_fields: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """The policy's files, written into an existing ``folder`` in place.

    ``drop_foresight`` leaves out the foresight head (inference never runs it);
    ``quantization`` (a :class:`QuantizationConfig` as a dict) marks the float weights to
    be quantized at load; ``config_fields`` are other keys for config.json (a LeRobot
    configuration); ``state`` a state dict gathered elsewhere (a sharded model's), else
    the policy's own."""
    from safetensors.torch import save_file

    config = policy.config.to_dict()
    state = policy.state_dict() if state is None else state
    # float32 on disk whatever the head runs in (set_head_dtype)
    state = {
        k: (v.float() if v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in state.items()
    }
    if drop_foresight:
        config["foresight"]["kind"] = "off"
        state = {k: v for k, v in state.items() if not k.startswith("foresight.")}
    version = POLICY_FORMAT_VERSION if quantization is None else QUANTIZED_FORMAT_VERSION
    meta = {
        **(config_fields or {}),
        **lerobot_layout.CONFIG_TAG,
        "format": POLICY_FORMAT,
        "format_version": version,
        "policy": config,
    }
    meta.pop("quantization", None)
    if quantization is not None:
        meta["quantization"] = quantization
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": POLICY_FORMAT})
    policy.backbone.vlm_config.save_pretrained(folder / VLM_FOLDER)
    policy.backbone.tokenizer.save_pretrained(folder / VLM_FOLDER)
    if policy.backbone.instruction_reader is not None:
        policy.backbone.instruction_reader.save_files(folder / READER_FOLDER)
    lerobot_layout.write_processor_files(folder)


def read_policy_config(folder: Path) -> tuple[PolicyConfig, QuantizationConfig | None]:
    """A policy folder's configuration and quantization recipe (None: float), checked:
    complete folder, ditvla's format, a version this ditvla reads."""
    config_path = folder / CONFIG_FILE
    needed = (config_path, folder / WEIGHTS_FILE, folder / VLM_FOLDER)
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        raise CheckpointError(f"{folder}: incomplete policy folder, missing {', '.join(missing)}")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    if meta.get("format") != POLICY_FORMAT:
        raise CheckpointError(f"{folder}: not a ditvla policy (format {meta.get('format')!r})")
    version = meta.get("format_version", 0)
    if version not in (POLICY_FORMAT_VERSION, QUANTIZED_FORMAT_VERSION):
        raise CheckpointError(
            f"{folder}: saved by a ditvla with policy format {version}, this version reads "
            f"formats {POLICY_FORMAT_VERSION} and {QUANTIZED_FORMAT_VERSION}"
            + ("; upgrade ditvla" if version > QUANTIZED_FORMAT_VERSION else "")
        )
    config = PolicyConfig(**meta["policy"])
    config.backbone.pretrained_path = None  # the architecture comes from vlm/
    recipe = None
    if "quantization" in meta:
        try:
            recipe = QuantizationConfig.from_dict(meta["quantization"])
        except QuantizationError as exc:
            raise CheckpointError(f"{folder}: {exc}") from None
    return config, recipe


def load_policy_folder(
    policy_class: type[DiTVLAPolicy], folder: str | Path, map_location: str | torch.device
) -> DiTVLAPolicy:
    """The policy saved in ``folder``, built as ``policy_class`` on ``map_location``
    (quantized again when the folder holds a recipe)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    config, recipe = read_policy_config(folder)
    vlm_config = AutoConfig.from_pretrained(folder / VLM_FOLDER, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder / VLM_FOLDER, local_files_only=True)
    reader_files = folder / READER_FOLDER if config.backbone.instruction_reader else None
    if reader_files is not None and not reader_files.is_dir():
        raise CheckpointError(f"{folder}: incomplete policy folder, missing {READER_FOLDER}")
    policy = policy_class(
        config, vlm_config=vlm_config, tokenizer=tokenizer, reader_files=reader_files
    )
    weights_path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: damaged weights file ({exc})") from None
    result = policy.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{weights_path}: weights do not match the config (missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    policy = policy.to(map_location)
    if recipe is not None:
        apply_recipe(policy.eval(), recipe)
    return policy


def edit_config_file(folder: str | Path, edit) -> None:
    """Change a saved policy's config.json in place: ``edit(meta)`` mutates the parsed file
    (e.g. sets ``meta["policy"]["num_inference_steps"]`` or adds a record); the result
    replaces the file atomically. A folder without a readable policy config raises
    CheckpointError."""
    path = Path(folder) / CONFIG_FILE
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
        edit(meta)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a ditvla policy config ({exc})") from None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)

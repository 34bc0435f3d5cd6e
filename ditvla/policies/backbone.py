"""The VLM backbone: camera images + instruction -> context tokens for the heads.

Any image-text-to-text model that ``AutoModelForImageTextToText`` builds, of the families
below, read the same way: each camera's frame goes through the VLM's vision encoder and
projector (no image splitting), the instruction through its token embeddings, and the
sequence ``[camera 1 tokens, camera 2 tokens, ..., instruction tokens]`` through the first
``num_layers`` layers of the language model; the last of those layers' hidden states are
the context. Reading a middle layer and dropping the ones above it is how SmolVLA uses
its VLM: cheaper, and the middle layers carry more spatial detail.

- ``tiny`` presets build a small model from a config with random weights and a byte-level
  tokenizer made offline (the CPU default and the tests).
- ``pretrained_path`` loads a real checkpoint and its tokenizer from a local folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Family = Literal["idefics3", "paligemma"]
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")


@dataclass
class BackboneConfig:
    """Which VLM, and how it is read.

    Args:
        family: the model family of the tiny preset (a pretrained folder says its own).
        pretrained_path: local folder of a saved VLM + tokenizer; None builds a tiny VLM.
        image_size: camera frames are resized to this square side before the encoder.
        num_layers: language-model layers kept and run (0 keeps them all); the context is
            the hidden state after the last kept layer.
        max_instruction_tokens: instructions are padded/truncated to this many tokens.
        freeze_vision / freeze_language: keep those weights fixed during training.
        tiny_*: sizes of the tiny preset.
    """

    family: Family = "idefics3"
    pretrained_path: str | None = None
    image_size: int = 64
    num_layers: int = 0
    max_instruction_tokens: int = 48
    freeze_vision: bool = False
    freeze_language: bool = False
    tiny_text_width: int = 128
    tiny_text_layers: int = 2
    tiny_vision_width: int = 96
    tiny_vision_layers: int = 2
    tiny_patch_size: int = 8


def byte_level_tokenizer():
    """A tokenizer made offline: the 256 byte-level symbols plus our special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *symbols])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_vlm_config(config: BackboneConfig, vocab_size: int):
    """A small config of ``config.family`` with random weights, for CPUs and tests."""
    from transformers import Idefics3Config, PaliGemmaConfig

    image_token_id = SPECIAL_TOKENS.index("<image>")
    heads = max(2, config.tiny_text_width // 64)
    vision = dict(
        hidden_size=config.tiny_vision_width,
        intermediate_size=2 * config.tiny_vision_width,
        num_hidden_layers=config.tiny_vision_layers,
        num_attention_heads=max(2, config.tiny_vision_width // 48),
        image_size=config.image_size,
        patch_size=config.tiny_patch_size,
    )
    text = dict(
        hidden_size=config.tiny_text_width,
        intermediate_size=2 * config.tiny_text_width,
        num_hidden_layers=config.tiny_text_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
    )
    if config.family == "idefics3":
        return Idefics3Config(
            vision_config=vision, text_config=text, scale_factor=2, image_token_id=image_token_id
        )
    if config.family == "paligemma":
        return PaliGemmaConfig(
            vision_config={**vision, "projection_dim": config.tiny_text_width},
            text_config={
                **text,
                "model_type": "gemma",
                "head_dim": config.tiny_text_width // heads,
            },
            image_token_id=image_token_id,
            projection_dim=config.tiny_text_width,
        )
    raise ValueError(f"unknown VLM family {config.family!r}; expected 'idefics3' or 'paligemma'")


def _image_mean_std(folder: Path | None) -> tuple[list[float], list[float]]:
    """The image normalisation of a saved processor, else SigLIP's (0.5, 0.5)."""
    if folder is not None:
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = folder / name
            if path.exists():
                data = json.loads(path.read_text())
                data = data.get("image_processor", data)
                if "image_mean" in data:
                    return list(data["image_mean"]), list(data["image_std"])
    return [0.5] * 3, [0.5] * 3


class VLMBackbone(nn.Module):
    """Camera images and instructions -> context tokens (B, L, width) with a mask (B, L)."""

    def __init__(self, config: BackboneConfig, *, vlm_config=None, tokenizer=None):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        self.config = config
        folder = Path(config.pretrained_path) if config.pretrained_path else None
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such VLM folder (a saved model + tokenizer)")
        if tokenizer is not None:
            self.tokenizer = tokenizer
        elif folder is not None:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        else:
            self.tokenizer = byte_level_tokenizer()
        if vlm_config is not None:  # the architecture of a saved policy; weights load later
            vlm = AutoModelForImageTextToText.from_config(vlm_config)
        elif folder is not None:
            vlm = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        else:
            vlm = AutoModelForImageTextToText.from_config(
                tiny_vlm_config(config, vocab_size=len(self.tokenizer))
            )
        self.family = vlm.config.model_type
        if self.family not in ("idefics3", "paligemma", "smolvlm"):
            raise ValueError(
                f"VLM family {self.family!r} is not supported; use idefics3/smolvlm or paligemma"
            )
        inner = vlm.model
        if self.family == "paligemma":
            self.vision, self.projector = inner.vision_tower, inner.multi_modal_projector
        else:
            self.vision, self.projector = inner.vision_model, inner.connector
        self.language = inner.language_model if self.family == "paligemma" else inner.text_model
        if config.num_layers:
            self.language.layers = self.language.layers[: config.num_layers]
        self.vlm_config = vlm.config
        self.width = vlm.config.text_config.hidden_size
        self.encoder_image_size = vlm.config.vision_config.image_size
        mean, std = _image_mean_std(folder)
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for module, frozen in (
            (self.vision, config.freeze_vision),
            (self.projector, config.freeze_vision),
            (self.language, config.freeze_language),
        ):
            module.requires_grad_(not frozen)

    def tokenize(
        self, instructions: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(
            list(instructions),
            padding="max_length",
            truncation=True,
            max_length=self.config.max_instruction_tokens,
            return_tensors="pt",
        )
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device).bool()

    def vision_features(
        self, images: torch.Tensor, vision: nn.Module | None = None
    ) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> the vision encoder's last hidden state
        (N, patches, vision width); ``vision``: another encoder of the same architecture
        (e.g. a frozen copy) instead of the backbone's own."""
        size = self.encoder_image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        pixels = ((images - self.image_mean) / self.image_std).to(self.projector_dtype)
        return (vision or self.vision)(pixel_values=pixels).last_hidden_state

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> (N, tokens, width) in the language model's space."""
        features = self.projector(self.vision_features(images))
        if self.family == "paligemma":  # as PaliGemma scales them before the LM
            features = features / (self.width**0.5)
        return features

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, cameras, 3, H, W) in [0, 1]; input_ids, text_mask (B, T)
        -> tokens (B, cameras * image_tokens + T, width), mask (B, L)."""
        b, n_cams = images.shape[:2]
        image_tokens = self.image_tokens(images.flatten(0, 1))
        image_tokens = image_tokens.view(b, n_cams * image_tokens.shape[1], -1)
        text = self.language.get_input_embeddings()(input_ids).to(image_tokens.dtype)
        embeds = torch.cat([image_tokens, text], dim=1)
        mask = torch.cat(
            [torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=embeds.device), text_mask],
            dim=1,
        )
        out = self.language(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False)
        return out.last_hidden_state, mask

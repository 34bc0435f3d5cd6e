"""LeRobot's SmolVLA as a peer in our benchmarks, built offline at our sizes.

No pretrained SmolVLM weights can be fetched here, and a comparison at matched size is
the fair one anyway: :func:`save_tiny_smolvlm` writes a SmolVLM2-style config and
processor (its tokenizer made offline) to a folder that SmolVLA builds its VLM from;
:func:`tiny_smolvla` builds SmolVLA at our tiny preset's sizes (or its expert at one of
our heads' sizes) with its LeRobot processors; :func:`smolvla_expert_sampler` runs its
action expert alone over a precomputed prefix cache, the part of SmolVLA our ``act``
matches. :func:`legacy_cache_crop` lets LeRobot 0.6.1's SmolVLA run on today's
transformers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from bench.lerobot_batches import lerobot_stats

VLM_TEXT_WIDTH = 128  # our tiny preset's (tiny_text_width)


def vlm_text_width(expert_width: int, heads: int) -> int:
    """The narrowest VLM text width from our tiny preset's up that ``heads`` divide and
    that divides ``expert_width`` (SmolVLA's expert is the VLM's width times a factor)."""
    return next(
        w
        for w in range(VLM_TEXT_WIDTH, expert_width + 1)
        if expert_width % w == 0 and w % heads == 0
    )


def save_tiny_smolvlm(
    folder: Path,
    *,
    width: int,
    layers: int,
    heads: int = 8,
    head_dim: int | None = None,
    vision_width: int = 64,
    vision_layers: int = 1,
    patch_size: int = 16,
    image_size: int = 64,
) -> None:
    """A SmolVLM2-style config and processor on disk, with an offline tokenizer."""
    from transformers import (
        PreTrainedTokenizerFast,
        SmolVLMConfig,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    from ditvla.policies.backbone import byte_level_tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer().backend_tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={
            "fake_image_token": "<fake_token_around_image>",
            "image_token": "<image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    config = SmolVLMConfig(
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=head_dim or width // heads,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
        ),
        scale_factor=2,
        image_token_id=tokenizer.image_token_id,
    )
    config.save_pretrained(folder)
    SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(),
        video_processor=SmolVLMVideoProcessor(),
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // 4,
    ).save_pretrained(folder)


def legacy_cache_crop() -> None:
    """LeRobot 0.6.1's SmolVLA calls ``cache.crop(prefix_len)`` meaning "keep the first
    prefix_len tokens", as the transformers 5.4-5.5 its extra pins read it; 5.24 refuses a
    positive count. Give the cache layers that reading back (only in this benchmark
    process, which runs SmolVLA)."""
    from transformers.cache_utils import DynamicLayer

    if getattr(DynamicLayer.crop, "legacy_keep", False):
        return
    crop = DynamicLayer.crop

    def keep_or_remove(self, tokens: int) -> None:
        if tokens > 0:  # keep the first `tokens`
            tokens = min(0, tokens - self.keys.shape[-2]) if self.is_initialized else 0
        crop(self, tokens)

    keep_or_remove.legacy_keep = True
    DynamicLayer.crop = keep_or_remove


def tiny_smolvla(
    folder: Path,
    data,
    *,
    horizon: int,
    n_action_steps: int,
    layers: int = 2,
    expert_width: int = VLM_TEXT_WIDTH,
    heads: int = 2,
):
    """SmolVLA at the tiny preset's sizes (VLM text width 128, 2 layers, 2 heads; vision
    width 96, 2 layers, 8-px patches; the expert at the VLM's width and depth), everything
    trained, for a store described by ``data`` (a DataSpec); and its LeRobot processors.
    A batch's instructions are padded to its longest (LeRobot's default, and ours).

    ``layers``, ``expert_width`` and ``heads`` size the expert as one of our heads (depth,
    width, attention heads of ``expert_width // heads`` channels): SmolVLA's expert has one
    layer per VLM layer, the VLM's width times ``expert_width_multiplier`` and the VLM's
    attention heads, so the VLM gets ``layers`` layers and ``heads`` heads of that size
    at a narrow text width (:func:`vlm_text_width`: 128 for the tiny expert, 192 for the
    base head's 384 wide, 6 heads)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

    size, width = data.image_size, vlm_text_width(expert_width, heads)
    save_tiny_smolvlm(
        folder,
        width=width,
        layers=layers,
        heads=heads,
        head_dim=expert_width // heads,
        vision_width=96,
        vision_layers=2,
        patch_size=8,
        image_size=size,
    )
    features = {
        f"observation.images.{cam}": PolicyFeature(FeatureType.VISUAL, (3, size, size))
        for cam in data.cameras
    }
    features["observation.state"] = PolicyFeature(FeatureType.STATE, (data.state_dim,))
    config = SmolVLAConfig(
        vlm_model_name=str(folder),
        load_vlm_weights=False,
        chunk_size=horizon,
        n_action_steps=n_action_steps,
        num_vlm_layers=layers,
        expert_width_multiplier=expert_width // width,
        max_action_dim=data.action_dim,
        max_state_dim=data.state_dim,
        resize_imgs_with_padding=(size, size),
        freeze_vision_encoder=False,
        train_expert_only=False,
        device="cpu",
        input_features=features,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (data.action_dim,))},
    )
    legacy_cache_crop()
    policy = SmolVLAPolicy(config)
    preprocessor, postprocessor = make_smolvla_pre_post_processors(config, lerobot_stats(data))
    return policy, preprocessor, postprocessor


def smolvla_expert_sampler(policy, batch: dict, steps: int, step_fn=None, dtype=None):
    """SmolVLA's expert alone on one preprocessed observation: its VLM prefix key/value
    cache is computed here, once; the returned function runs the ``steps`` Euler steps
    (``denoise_step``, or ``step_fn`` in its place: compiled) from a fixed noise, as
    ``sample_actions`` does after the prefix. Times the part of SmolVLA that our ``act``
    matches (our ``encode`` is the prefix).

    ``dtype`` (bfloat16): the steps run on a copy of the model in that dtype, over the
    cache cast to it, each step's input cast to it (Euler integrates in float32); its
    output projection stays float32, as ``denoise_step`` casts the expert's output to
    float32 before it (LeRobot runs the expert in float32)."""
    from lerobot.policies.common.flow_matching import euler_integrate
    from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    model = policy.model
    with torch.inference_mode():
        images, image_masks = policy.prepare_images(batch)
        prefix, pad, att = model.embed_prefix(
            images,
            image_masks,
            batch[OBS_LANGUAGE_TOKENS],
            batch[OBS_LANGUAGE_ATTENTION_MASK],
            state=policy.prepare_state(batch),
        )
        _, cache = model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad, att),
            position_ids=torch.cumsum(pad, dim=1) - 1,
            past_key_values=None,
            inputs_embeds=[prefix, None],
            use_cache=True,
        )
    noise = torch.randn(
        1, policy.config.chunk_size, policy.config.max_action_dim, generator=torch.Generator()
    )
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
        model.action_out_proj.float()
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
        noise = noise.to(dtype)

    step_fn = step_fn or model.denoise_step

    @torch.inference_mode()
    def run():
        return euler_integrate(
            lambda x, t: step_fn(
                prefix_pad_masks=pad, past_key_values=cache, x_t=x.to(noise.dtype), timestep=t
            ),
            noise,
            steps,
        )

    return run

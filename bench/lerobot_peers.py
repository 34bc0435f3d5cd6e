"""LeRobot policies as peers in our benchmarks: trained on our stores, run by our evaluator.

- :class:`LeRobotAdapter` puts a trained LeRobot policy (with its own pre/post
  processors: normalization, tokenization) behind ditvla's evaluator contract, keeping an
  observation history per episode for policies that read several steps.
- :func:`tiny_smolvla` builds LeRobot's SmolVLA offline at our tiny preset's sizes (a
  SmolVLM2-style VLM from a config saved to a folder, the processor's tokenizer made
  offline); :func:`train_for` trains any LeRobot policy on batches of a ditvla store for
  a wall-clock budget, with the policy's own optimizer and scheduler presets, as
  ``lerobot-train`` would.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

VLM_TEXT_WIDTH = 128  # our tiny preset's (tiny_text_width)


def vlm_text_width(expert_width: int, heads: int) -> int:
    """The narrowest VLM text width from our tiny preset's up that ``heads`` divide and
    that divides ``expert_width`` (SmolVLA's expert is the VLM's width times a factor)."""
    return next(
        w
        for w in range(VLM_TEXT_WIDTH, expert_width + 1)
        if expert_width % w == 0 and w % heads == 0
    )


def lerobot_batch(images: dict[str, Any], state: Any, tasks: list[str] | None = None) -> dict:
    """Our arrays -> LeRobot's keys: ``observation.images.<cam>`` float [0, 1] (B, [T,] 3,
    H, W) from uint8 (B, [T,] H, W, 3), ``observation.state``, ``task``."""
    batch = {}
    for cam, frames in images.items():
        x = torch.as_tensor(np.asarray(frames)).float() / 255.0
        batch[f"observation.images.{cam}"] = x.movedim(-1, -3)
    batch["observation.state"] = torch.as_tensor(np.asarray(state)).float()
    if tasks is not None:
        batch["task"] = list(tasks)
    return batch


def lerobot_stats(data) -> dict[str, dict[str, torch.Tensor]]:
    """A ditvla DataSpec's statistics under LeRobot's feature names."""
    stats = {
        "observation.state": data.stats["state"],
        "action": data.stats["action"],
        **{f"observation.images.{cam}": data.stats[cam] for cam in data.cameras},
    }
    out = {}
    for key, values in stats.items():
        out[key] = {name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()}
        if key.startswith("observation.images."):  # per channel: (3, 1, 1)
            out[key] = {name: v.view(3, 1, 1) for name, v in out[key].items()}
    return out


class LeRobotAdapter:
    """A trained LeRobot policy behind ditvla's evaluator contract (``ChunkPolicy``)."""

    def __init__(self, policy, preprocessor, postprocessor, spec, *, reads_task: bool):
        self.policy = policy.eval()
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.spec = spec
        self.reads_task = reads_task
        self.n_obs_steps = getattr(policy.config, "n_obs_steps", 1)
        self._history: dict[tuple[str, int], deque] = {}

    def reset(self) -> None:
        self._history.clear()

    def predict_action_chunk(self, observation: dict, **_: Any) -> torch.Tensor:
        if self.n_obs_steps == 1:
            images, state = observation["images"], observation["state"]
        else:  # per episode (the evaluator names each row's task and seed)
            rows = []
            for i, key in enumerate(zip(observation["task"], observation["seed"], strict=True)):
                history = self._history.setdefault(key, deque(maxlen=self.n_obs_steps))
                history.append(
                    (
                        {c: v[i] for c, v in observation["images"].items()},
                        observation["state"][i],
                    )
                )
                while len(history) < self.n_obs_steps:  # the first step repeats, as LeRobot pads
                    history.appendleft(history[0])
                rows.append(history)
            images = {
                cam: np.stack([np.stack([h[0][cam] for h in rows_i]) for rows_i in rows])
                for cam in observation["images"]
            }
            state = np.stack([np.stack([h[1] for h in rows_i]) for rows_i in rows])
        tasks = observation["instruction"] if self.reads_task else None
        batch = self.preprocessor(lerobot_batch(images, state, tasks))
        self.policy.reset()  # empty queues: the chunk comes from this observation
        with torch.inference_mode():
            actions = self.policy.predict_action_chunk(batch)
        return self.postprocessor(actions)


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

    ``layers``, ``expert_width`` and ``heads`` size the expert as one of our heads (depth,
    width, attention heads of ``expert_width // heads`` channels): SmolVLA's expert has one
    layer per VLM layer, the VLM's width times ``expert_width_multiplier`` and the VLM's
    attention heads, so the VLM gets ``layers`` layers and ``heads`` heads of that size
    at a narrow text width (:func:`vlm_text_width`: 128 for the tiny expert, 192 for the
    base head's 384 wide, 6 heads)."""
    from head_latency import save_tiny_smolvlm
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
        pad_language_to="max_length",
        device="cpu",
        input_features=features,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (data.action_dim,))},
    )
    legacy_cache_crop()
    policy = SmolVLAPolicy(config)
    preprocessor, postprocessor = make_smolvla_pre_post_processors(config, lerobot_stats(data))
    return policy, preprocessor, postprocessor


def train_for(
    policy,
    preprocessor,
    batches,
    budget_s: float | None,
    *,
    name: str,
    seed: int = 0,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``policy`` on ``batches`` (an endless iterator of LeRobot batches) for
    ``budget_s`` seconds with its optimizer and scheduler presets; the scheduler spans the
    steps the budget allows (measured over the first 5 steps). With ``max_steps`` (and no
    budget) it trains that many steps instead, whatever else runs on the machine."""
    if (budget_s is None) == (max_steps is None):
        raise ValueError("train_for takes a wall-clock budget or a step count, one of them")
    torch.manual_seed(seed)
    config = policy.config
    optimizer = config.get_optimizer_preset().build(policy.parameters())
    clip = getattr(config, "optimizer_grad_clip_norm", 10.0)
    policy.train()
    start, steps, losses, scheduler = time.perf_counter(), 0, [], None
    preset = config.get_scheduler_preset()  # LeRobot fits its schedule to the total steps
    if preset is not None and max_steps is not None:
        scheduler = preset.build(optimizer, max_steps)
    progress = tqdm(total=max_steps, desc=name, unit="step", mininterval=10)
    while time.perf_counter() - start < budget_s if max_steps is None else steps < max_steps:
        loss, _ = policy.forward(preprocessor(next(batches)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
        optimizer.step()
        steps += 1
        losses.append(loss.item())
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if steps == 5 and preset is not None and max_steps is None:  # a time budget:
            per_step = (time.perf_counter() - start) / steps  # its steps, estimated
            scheduler = preset.build(optimizer, max(10, int(budget_s / per_step)))
        if scheduler is not None:
            scheduler.step()
    seconds = time.perf_counter() - start
    progress.close()
    print(
        f"{name}: {steps} steps in {seconds / 60:.1f} min, loss {losses[0]:.3f} -> "
        f"{np.mean(losses[-20:]):.3f}",
        flush=True,
    )
    return {"steps": steps, "seconds": seconds, "loss_last": float(np.mean(losses[-20:]))}


def batches_for_lerobot(store: Path, spec, *, batch_size: int, seed: int = 0):
    """Endless LeRobot batches of the store's samples, as our policy reads them."""
    from torch.utils.data import DataLoader

    from ditvla.datasets.torch_dataset import ReplayBufferDataset

    dataset = ReplayBufferDataset(
        store,
        n_obs_steps=1,
        horizon=spec.horizon,
        cameras=spec.cameras,
        state_keys=spec.state_keys,
    )
    generator = torch.Generator().manual_seed(seed)
    while True:
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
        )
        for sample in loader:
            batch = lerobot_batch(
                {cam: frames[:, -1].numpy() for cam, frames in sample["images"].items()},
                sample["state"][:, -1],
                list(sample["instruction"]),
            )
            batch["action"] = sample["action"]
            batch["action_is_pad"] = sample["action_is_pad"]
            yield batch


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

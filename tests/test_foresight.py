"""Foresight heads: optical-flow targets and their cache, future frames for latent targets,
joint training of both kinds, and the guarantee that inference never runs them."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import zarr

from ditvla.datasets.motion_targets import (
    MotionTargetSpec,
    compute_motion_targets,
    load_or_compute_motion_targets,
)
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.torch_dataset import ReplayBufferDataset
from ditvla.policies.policy import DiTVLAPolicy
from ditvla.training.trainer import TrainConfig, train

SIZE, DX, DY = 32, 2, 1  # the view moves DX, DY pixels per frame: content moves -DX, -DY


def shifting_episode(seed: int, length: int = 20, size: int = SIZE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # smooth texture: DIS is accurate on it even at 32 px (0.04 px error in motion images)
    world = cv2.GaussianBlur(rng.integers(0, 256, (160, 160, 3)).astype(np.uint8), (11, 11), 0)
    frames = np.stack(
        [
            world[8 + t * DY : 8 + t * DY + size, 8 + t * DX : 8 + t * DX + size]
            for t in range(length)
        ]
    )
    return {
        "front": frames,
        "state": np.zeros((length, 2), np.float32) + np.arange(length)[:, None] / length,
        "action": np.tile(np.array([DX, DY], np.float32), (length, 1)),
    }


@pytest.fixture(scope="module")
def shifting_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("foresight") / "shift.zarr"
    buffer = ReplayBuffer.create(path, fps=10, cameras=["front"])
    for seed in range(4):
        buffer.append_episode(
            shifting_episode(seed), task="pan", instruction="pan the view", seed=seed
        )
    return path


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flow_targets_recover_a_known_shift(tmp_path, method):
    buffer = ReplayBuffer.create(tmp_path / "s.zarr", fps=10, cameras=["front"])
    buffer.append_episode(shifting_episode(0, size=64), task="pan", instruction="pan")
    spec = MotionTargetSpec("front", k=2, size=16, method=method)
    targets = compute_motion_targets(buffer, spec, progress=False)
    expected = np.array([-DX, -DY]) * spec.k * spec.size / 64  # motion-image pixels
    interior = targets[:18, 4:-4, 4:-4].reshape(-1, 2)  # frames whose t + k is in the episode
    np.testing.assert_allclose(np.median(interior, axis=0), expected, atol=0.05)
    assert np.isnan(targets[18:20]).all() and np.isfinite(targets[:18]).all()  # no future: NaN


def test_targets_are_cached_and_recomputed_when_settings_or_frames_change(tmp_path):
    path = tmp_path / "s.zarr"
    buffer = ReplayBuffer.create(path, fps=10, cameras=["front"])
    buffer.append_episode(shifting_episode(0, 8), task="pan", instruction="pan")
    spec = MotionTargetSpec("front", k=2, size=8)
    first, rms = load_or_compute_motion_targets(path, spec, progress=False)
    cached = zarr.open_group(str(path), mode="a")["derived"]["motion.front"]
    cached[0] = 7.0  # a marker: a cache hit returns it
    assert load_or_compute_motion_targets(path, spec, progress=False)[0][0].max() == 7.0
    # another k: recomputed
    again, _ = load_or_compute_motion_targets(
        path, MotionTargetSpec("front", k=3, size=8), progress=False
    )
    assert np.nanmax(again[0]) != 7.0
    # a half-written cache (its attributes are written last) is recomputed, not trusted
    cached = zarr.open_group(str(path), mode="a")["derived"]["motion.front"]
    cached.attrs.put({})
    assert load_or_compute_motion_targets(path, spec, progress=False)[0].shape == first.shape
    # appended episodes: recomputed for every frame
    ReplayBuffer.open(path, mode="a").append_episode(
        shifting_episode(1, 6), task="pan", instruction="pan"
    )
    grown, _ = load_or_compute_motion_targets(path, spec, progress=False)
    assert grown.shape[0] == 14 and rms > 0
    assert ReplayBuffer.open(path).check() == []  # the store itself is untouched


def train_with_foresight(store, out, foresight: dict, backbone: dict | None = None):
    """250 steps of a tiny policy with a foresight head on the panning store."""
    config = TrainConfig(
        dataset=str(store),
        out=str(out),
        steps=250,
        batch_size=16,
        lr=1e-3,
        warmup_steps=20,
        ema_decay=0.0,
        num_workers=0,
        save_every=250,
        progress=False,
        policy_overrides={
            "horizon": 4,
            "foresight": {"k": 2, "weight": 1.0, **foresight},
            "backbone": backbone or {},
        },
    )
    return train(config), out


@pytest.fixture(scope="module")
def trained(shifting_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("foresight_run")
    return train_with_foresight(shifting_store, out, {"kind": "motion", "size": 8})


def test_jointly_trained_head_predicts_the_shift(trained, shifting_store):
    folder, out = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "foresight_loss" in records[0] and "foresight_epe_1step" in records[0]
    early = np.mean([r["foresight_loss"] for r in records[:20]])
    late = np.mean([r["foresight_loss"] for r in records[-20:]])
    assert late < 0.5 * early

    policy = DiTVLAPolicy.from_pretrained(folder)
    episode = shifting_episode(7)  # an unseen world panned the same way
    truth = np.array([-DX, -DY]) * 2 * 8 / SIZE
    errors = []
    for t in (0, 5, 10):
        obs = {"images": {"front": episode["front"][t]}, "instruction": "pan the view"}
        context = policy.encode(obs)
        frame = torch.from_numpy(episode["front"][t]).permute(2, 0, 1)[None].float() / 255
        torch.manual_seed(t)
        motion = policy.foresight.predict(context.tokens, context.mask, frame)[0].numpy()
        errors.append(np.linalg.norm(motion[2:-2, 2:-2] - truth, axis=-1).mean())
    # predicting no motion would be off by |truth| = 0.56 px
    assert np.mean(errors) < 0.2, errors


def test_samples_carry_the_future_frame_for_latent_targets(shifting_store):
    dataset = ReplayBufferDataset(
        shifting_store, n_obs_steps=1, horizon=4, future_frame=("front", 3)
    )
    frames = ReplayBuffer.open(shifting_store).read_all("front")
    for index in (0, 10, 16, 17, 19, 20):  # episode 0 is frames 0..19, episode 1 from 20
        sample = dataset[index]
        episode_last = 19 if index < 20 else 39
        wanted = index + 3
        assert sample["future_is_pad"] == (wanted > episode_last)
        np.testing.assert_array_equal(
            sample["future_image"].numpy(), frames[min(wanted, episode_last)]
        )
    with pytest.raises(Exception, match="future_frame"):
        ReplayBufferDataset(shifting_store, future_frame=("wrist", 3))


@pytest.fixture(scope="module")
def trained_latent(shifting_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent_run")
    # the targets of a trained vision transformer: a frozen copy of it, made at the start
    # (the presets' frozen ImageNet eyes are read uncopied: tests/test_policy.py)
    return train_with_foresight(
        shifting_store, out, {"kind": "latent", "grid": 2}, backbone={"vision_encoder": ""}
    )


def test_latent_head_learns_the_future_features(trained_latent):
    folder, out = trained_latent
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "foresight_cosine_1step" in records[0]
    early = np.mean([r["foresight_loss"] for r in records[:20]])
    late = np.mean([r["foresight_loss"] for r in records[-20:]])
    assert late < 0.5 * early

    policy = DiTVLAPolicy.from_pretrained(folder)
    head = policy.foresight
    encoder_before = {k: v.clone() for k, v in head.target_encoder.state_dict().items()}
    episode = shifting_episode(7)  # an unseen world panned the same way
    to_pixels = lambda t: torch.from_numpy(episode["front"][t]).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    errors = []
    for t in (0, 5, 10, 15):
        obs = {"images": {"front": episode["front"][t]}, "instruction": "pan the view"}
        context = policy.encode(obs)
        torch.manual_seed(t)
        predicted = head.predict(context.tokens, context.mask, to_pixels(t), policy.backbone)
        truth = head.latents(to_pixels(t + 2), policy.backbone)
        assert predicted.shape == truth.shape == (1, 4, head.dit.config.action_dim)
        errors.append(torch.mean((predicted - truth) ** 2).item())
    # targets are layer-normed per token: predicting their mean (0) would score 1.0
    assert np.mean(errors) < 0.5, errors
    for key, value in head.target_encoder.state_dict().items():  # frozen, and saved as trained
        torch.testing.assert_close(value, encoder_before[key])
    assert not any(p.requires_grad for p in head.target_encoder.parameters())


@pytest.mark.parametrize("run", ["trained", "trained_latent"])
def test_inference_never_runs_the_head_and_a_saved_policy_can_drop_it(run, request, tmp_path):
    folder, _ = request.getfixturevalue(run)
    policy = DiTVLAPolicy.from_pretrained(folder)

    def forbidden(module, inputs):
        raise AssertionError(f"foresight module {type(module).__name__} ran at inference")

    for module in policy.foresight.modules():
        module.register_forward_pre_hook(forbidden)
    episode = shifting_episode(3)
    obs = {
        "images": {"front": episode["front"][0]},
        "instruction": "pan the view",
        "state": episode["state"][0],
    }
    noise = torch.randn(1, 4, 2)
    context = policy.encode(obs)
    chunk = policy.act(context, obs["state"], noise=noise)
    policy.predict_action_chunk(obs)
    policy.reset()
    policy.select_action(obs)

    slim = tmp_path / "slim"
    policy.save_pretrained(slim, drop_foresight=True)
    loaded = DiTVLAPolicy.from_pretrained(slim)
    assert loaded.foresight is None and loaded.config.foresight.kind == "off"
    full_bytes = (folder / "model.safetensors").stat().st_size
    assert (slim / "model.safetensors").stat().st_size < full_bytes
    torch.testing.assert_close(loaded.act(loaded.encode(obs), obs["state"], noise=noise), chunk)

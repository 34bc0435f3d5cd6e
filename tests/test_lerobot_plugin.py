"""ditvla inside LeRobot: the lerobot_policy_ditvla plugin with LeRobot's own tools.

Real LeRobot datasets on disk, the real ``lerobot-train`` and ``lerobot-eval`` command
lines (which find the plugin as any installed plugin is found), real Meta-World episodes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import draccus
import numpy as np
import pytest
import torch
from draccus.utils import DecodingError
from lerobot.configs import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors
from lerobot_policy_ditvla.configuration_ditvla import (
    DitvlaConfig,
    DitvlaSettingError,
    state_keys_of,
)
from lerobot_policy_ditvla.modeling_ditvla import DitvlaPolicy
from lerobot_policy_ditvla.processor_ditvla import make_ditvla_pre_post_processors

from ditvla.cli import main
from ditvla.contract import CheckpointError, load_policy
from ditvla.contract import state_feature_names as state_names
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.envs.collect import collect_demonstrations
from ditvla.policies.config import POLICY_PRESETS, PolicyConfig
from ditvla.policies.lerobot_layout import processor_descriptions
from ditvla.training.trainer import TrainConfig, train

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=os.environ)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _ditvla_train(store: Path, out: Path, steps: int = 2, **settings) -> Path:
    """A ``ditvla train`` policy folder (the tiny preset, a few steps)."""
    config = TrainConfig(
        dataset=str(store),
        out=str(out),
        steps=steps,
        batch_size=4,
        num_workers=0,
        progress=False,
        **settings,
    )
    return train(config)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Meta-World reach demonstrations as a ditvla store and as a LeRobot v3 dataset."""
    root = tmp_path_factory.mktemp("plugin")
    store = root / "reach.zarr"
    collect_demonstrations(
        "metaworld:reach-v3",
        store,
        episodes_per_task=2,
        image_size=32,
        cameras=("corner2",),
        progress=False,
    )
    assert (
        main(
            [
                "convert",
                "to-lerobot",
                str(store),
                "--out",
                str(root / "reach_lr"),
                "--storage",
                "image",
            ]
        )
        == 0
    )
    return store, root / "reach_lr"


def test_lerobot_train_checkpoint_runs_in_ditvla_eval(stores, tmp_path):
    """No --policy.state_keys: the dataset names the arrays of its observation.state."""
    _, lerobot_root = stores
    result = _run(
        [
            str(BIN / "lerobot-train"),
            "--policy.type=ditvla",
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            "--policy.horizon=8",
            "--policy.head.width=64",
            "--dataset.repo_id=local/reach_lr",
            f"--dataset.root={lerobot_root}",
            "--steps=3",
            "--batch_size=4",
            "--save_freq=3",
            "--log_freq=1",
            "--num_workers=0",
            "--wandb.enable=false",
            f"--output_dir={tmp_path / 'train'}",
        ],
        tmp_path,
    )
    assert "action_loss" in result.stdout + result.stderr  # ditvla's loss ran in LeRobot's loop
    checkpoint = tmp_path / "train" / "checkpoints" / "last" / "pretrained_model"
    # ditvla reads LeRobot's checkpoint as its own folder
    policy = load_policy(checkpoint)
    assert policy.spec.cameras == ("corner2",) and policy.spec.state_keys == ("proprio",)
    assert policy.spec.state_dim == 8 and policy.spec.horizon == 8
    assert policy.config.head.width == 64 and policy.config.head.depth == 2  # over the preset
    stats = LeRobotDatasetMetadata("local/reach_lr", root=lerobot_root).stats
    np.testing.assert_allclose(  # LeRobot's dataset statistics are the policy's normalizer
        policy.normalizer.action__center.numpy(), stats["action"]["mean"], rtol=1e-5, atol=1e-6
    )
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--policy",
                str(checkpoint),
                "--env",
                "metaworld:reach-v3",
                "--episodes",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["reach-v3"]["episodes"] == 1
    assert results["observation"]["cameras"] == ["corner2"]
    assert results["observation"]["state_keys"] == ["proprio"]


def test_ditvla_policy_acts_the_same_in_lerobot(stores, tmp_path):
    """A ditvla train folder loads where LeRobot expects a pretrained policy, and its
    LeRobot face returns the same actions from LeRobot's batch as ditvla from the store."""
    store, lerobot_root = stores
    folder = _ditvla_train(store, tmp_path / "run", steps=2, policy_overrides={"horizon": 8})
    config = PreTrainedConfig.from_pretrained(folder)
    config.device = "cpu"
    config.pretrained_path = folder
    meta = LeRobotDatasetMetadata("local/reach_lr", root=lerobot_root)
    lerobot_policy = make_policy(config, ds_meta=meta)
    assert isinstance(lerobot_policy, DitvlaPolicy)
    preprocessor, postprocessor = make_pre_post_processors(config, pretrained_path=str(folder))

    frame = LeRobotDataset("local/reach_lr", root=lerobot_root)[5]
    batch = preprocessor(
        {k: v for k, v in frame.items() if k.startswith("observation.")} | {"task": frame["task"]}
    )
    noise = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    theirs = postprocessor(lerobot_policy.predict_action_chunk(batch, noise=noise))

    ours_policy = load_policy(folder)
    episode = ReplayBuffer.open(store).get_episode(0)
    observation = {
        "images": {"corner2": episode["corner2"][5]},
        "state": episode["proprio"][5],
        "instruction": frame["task"],
    }
    ours = ours_policy.predict_action_chunk(observation, noise=noise)
    torch.testing.assert_close(theirs[0], ours, rtol=1e-5, atol=1e-5)
    # select_action serves the chunk's first n_action_steps actions in order
    lerobot_policy.reset()
    first = [lerobot_policy.select_action(batch, noise=noise) for _ in range(2)]
    torch.testing.assert_close(torch.stack(first)[:, 0], theirs[0, :2].to(first[0]))


def _eval_folder(store: Path, out: Path) -> Path:
    """A ditvla train folder that reads what LeRobot's Meta-World env gives: one camera and
    the instruction."""
    return _ditvla_train(
        store, out, state="none", steps=2, policy_overrides={"horizon": 8, "n_action_steps": 8}
    )


def test_ditvla_policy_acts_in_lerobots_rollout_on_its_metaworld_env(stores, tmp_path):
    """lerobot-eval's own pieces, in process: LeRobot's Meta-World env, make_policy and the
    processors built as eval_main builds them (its rename map for the env's camera), and
    its rollout loop, for 16 steps of the episode (lerobot-eval itself always runs
    Meta-World's 500 at 480 px, minutes here: the nightly test below)."""
    from lerobot.envs.configs import MetaworldEnv
    from lerobot.envs.factory import make_env, make_env_pre_post_processors
    from lerobot.scripts.lerobot_eval import rollout

    store, _ = stores
    folder = _eval_folder(store, tmp_path / "run")
    env_config = MetaworldEnv(task="reach-v3")
    env = make_env(env_config, n_envs=1, use_async_envs=False)["reach-v3"][0]
    env.envs[0]._max_episode_steps = 16  # LeRobot's rollout runs until env's own limit
    rename_map = {"observation.image": "observation.images.corner2"}
    config = PreTrainedConfig.from_pretrained(folder)
    config.device = "cpu"
    config.pretrained_path = folder
    policy = make_policy(cfg=config, env_cfg=env_config, rename_map=rename_map)
    policy.eval()
    preprocessor, postprocessor = make_pre_post_processors(
        policy_cfg=config,
        pretrained_path=str(folder),
        preprocessor_overrides={
            "device_processor": {"device": "cpu"},
            "rename_observations_processor": {"rename_map": rename_map},
        },
    )
    env_pre, env_post = make_env_pre_post_processors(env_cfg=env_config, policy_cfg=config)
    try:
        with torch.no_grad():
            data = rollout(env, policy, env_pre, env_post, preprocessor, postprocessor, seeds=[0])
    finally:
        env.close()
    actions = data["action"]
    assert actions.shape == (1, 16, 4)
    assert torch.isfinite(actions).all()
    assert data["reward"].shape == data["success"].shape == (1, 16)
    # a chunk of 8 served action by action, then a new chunk from the new observation
    assert len({tuple(a) for a in actions[0, :8].tolist()}) == 8
    assert not torch.equal(actions[0, :8], actions[0, 8:])


@pytest.mark.nightly
def test_ditvla_policy_runs_in_lerobot_eval(stores, tmp_path):
    """lerobot-eval on LeRobot's own Meta-World environment with a ditvla train folder
    (cameras and instruction; LeRobot's env names its camera observation.image): one whole
    500-step episode at 480 px, about two minutes on the 2-core CPU."""
    store, _ = stores
    folder = _eval_folder(store, tmp_path / "run")
    out = tmp_path / "lerobot_eval"
    _run(
        [
            str(BIN / "lerobot-eval"),
            f"--policy.path={folder}",
            "--policy.device=cpu",
            "--env.type=metaworld",
            "--env.task=reach-v3",
            "--eval.n_episodes=1",
            "--eval.batch_size=1",
            '--rename_map={"observation.image": "observation.images.corner2"}',
            f"--output_dir={out}",
        ],
        tmp_path,
    )
    info = json.loads((out / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 1


def test_the_processors_ditvla_writes_are_the_plugins(tmp_path):
    config = make_policy_config("ditvla", device="cpu")
    pre, post = make_ditvla_pre_post_processors(config)
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    for name, description in processor_descriptions().items():
        assert json.loads((tmp_path / name).read_text()) == description


def _lerobot_dataset(root: Path, features: dict, task: str = "reach") -> LeRobotDatasetMetadata:
    dataset = LeRobotDataset.create(
        "local/other", fps=10, features=features, root=root, use_videos=False
    )
    rng = np.random.default_rng(0)
    for _ in range(2):
        for _ in range(3):
            frame = {"task": task}
            for key, feature in features.items():
                if feature["dtype"] == "image":
                    frame[key] = rng.integers(0, 256, feature["shape"], dtype=np.uint8)
                else:
                    frame[key] = rng.normal(size=feature["shape"]).astype(np.float32)
            dataset.add_frame(frame)
        dataset.save_episode()
    dataset.finalize()
    return LeRobotDatasetMetadata("local/other", root=root)


def test_features_that_do_not_fit_fail_before_training(stores, tmp_path):
    store, _ = stores
    folder = _ditvla_train(store, tmp_path / "run", steps=1)
    image = {"dtype": "image", "shape": (32, 32, 3), "names": ["height", "width", "channels"]}
    vector = {"dtype": "float32", "names": None}
    other = _lerobot_dataset(
        tmp_path / "other",
        {
            "observation.images.wrist": image,
            "observation.state": {**vector, "shape": (5,)},
            "action": {**vector, "shape": (7,)},
        },
    )
    config = PreTrainedConfig.from_pretrained(folder)
    config.device, config.pretrained_path = "cpu", folder
    config.input_features = {}  # as lerobot-train fills them in from the dataset
    with pytest.raises(ValueError) as error:
        make_policy(config, ds_meta=other)
    message = str(error.value)
    assert "action: the policy writes (4,), the data has (7,)" in message
    assert "observation.images.corner2" in message and "observation.state" in message

    # a new policy: frames that are not square need a size; a dataset without task strings
    wide = _lerobot_dataset(
        tmp_path / "wide",
        {
            "observation.images.top": {**image, "shape": (24, 32, 3)},
            "action": {**vector, "shape": (4,)},
        },
    )
    with pytest.raises(ValueError, match=r"set --policy\.image_size"):
        make_policy(make_policy_config("ditvla", device="cpu"), ds_meta=wide)
    untitled = _lerobot_dataset(
        tmp_path / "untitled",
        {"observation.images.top": image, "action": {**vector, "shape": (4,)}},
        task=" ",
    )
    with pytest.raises(ValueError, match="no task strings"):
        make_policy(make_policy_config("ditvla", device="cpu"), ds_meta=untitled)


def test_other_policies_and_newer_formats_are_refused_by_name(stores, tmp_path):
    act = tmp_path / "act"
    act.mkdir()
    make_policy_config("act", device="cpu")._save_pretrained(act)
    with pytest.raises(CheckpointError, match="a LeRobot 'act' policy"):
        load_policy(act)
    with pytest.raises(CheckpointError, match="a LeRobot 'act' policy, not a ditvla policy"):
        DitvlaPolicy.from_pretrained(act)

    store, _ = stores
    folder = _ditvla_train(store, tmp_path / "run", steps=1)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match=r"policy format 99.*upgrade ditvla"):
        DitvlaPolicy.from_pretrained(folder)


def test_lerobot_sharded_training_wraps_the_blocks_ditvla_shards(stores):
    """LeRobot shards through accelerate, whose FSDP2 auto-wrap reads the policy's
    _no_split_modules; it must pick the units ``ditvla train --sharding fsdp`` uses.
    (accelerate shards across accelerators only, so the run itself needs GPUs.)"""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from ditvla.training.sharding import shard_units

    _, lerobot_root = stores
    config = make_policy_config("ditvla", device="cpu", state_keys=["proprio"], horizon=8)
    policy = make_policy(
        config, ds_meta=LeRobotDatasetMetadata("local/reach_lr", root=lerobot_root)
    )
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap"
    )
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, policy)
    wrapped = [module for module in policy.modules() if wraps(module)]
    assert wrapped and {id(m) for m in wrapped} == {id(m) for m in shard_units(policy.model)}
    # the language model's blocks; the presets' frozen ImageNet eyes stay in the root unit
    assert policy._fsdp_wrap_modules == ["LlamaDecoderLayer"]


def test_the_state_keys_come_from_the_dataset_and_a_contradiction_is_refused(stores):
    _, lerobot_root = stores
    meta = LeRobotDatasetMetadata("local/reach_lr", root=lerobot_root)
    assert meta.features["observation.state"]["names"] == state_names({"proprio": 8})
    config = make_policy_config("ditvla", device="cpu", state_keys=["hand"])
    with pytest.raises(DitvlaSettingError, match=r"made of \['proprio'\].*leave --policy"):
        make_policy(config, ds_meta=meta)
    # what ditvla writes is read back; names that say something else are not a state's arrays
    names = state_names({"ee_pos": 3, "gripper.left": 1, "obj": 2})
    assert state_keys_of({"names": names}) == ["ee_pos", "gripper.left", "obj"]
    for other in (
        None,
        [],
        ["x", "y"],
        ["shoulder.pos", "elbow.pos"],
        ["a.0", "a.2"],
        ["a.0", "b.0", "a.1"],
        {"motors": ["a.0"]},
    ):
        assert state_keys_of({"names": other}) is None, other


@dataclass
class LerobotCommandLine:
    """The policy part of LeRobot's command lines (``TrainPipelineConfig.policy``)."""

    policy: PreTrainedConfig | None = None


def lerobot_policy_options(*options: str) -> PreTrainedConfig:
    """``--policy.type=ditvla`` and ``options``, parsed as lerobot-train parses them."""
    args = ["--policy.type=ditvla", "--policy.device=cpu", *options]
    return draccus.parse(LerobotCommandLine, args=args).policy


def policy_settings(config_class: type = PolicyConfig, prefix: str = ""):
    """(path, value) for every PolicyConfig field a user sets (not filled in from the data),
    nested ones by dotted path; the value is the default, or a path for a None default."""
    instance = config_class()
    hints = typing.get_type_hints(config_class)
    for spec in dataclasses.fields(config_class):
        if spec.name in getattr(config_class, "filled_in", ()):
            continue
        value = getattr(instance, spec.name)
        if dataclasses.is_dataclass(value):
            yield from policy_settings(type(value), f"{prefix}{spec.name}.")
        else:
            assert value is not None or str in typing.get_args(hints[spec.name]), spec.name
            yield f"{prefix}{spec.name}", "some/folder" if value is None else value


def _setting_case(path: str, value):
    return pytest.param(path, value, id=path)


REFUSED = {"auxiliary_weight": "the auxiliary head learns privileged arrays"}


@pytest.mark.parametrize(("path", "value"), [_setting_case(*s) for s in policy_settings()])
def test_every_policy_config_setting_is_a_lerobot_option(path, value):
    """A field added to PolicyConfig is a --policy.* option of lerobot-train that reaches
    the model's configuration, or it is refused by name."""
    # the command line's values are YAML: strings quoted, or "off" would be read as false
    text = json.dumps(value)
    # DitvlaConfig's own options (lerobot-train's --policy.* without the prefix): the
    # same parser, without building every other registered policy's
    options = [f"--{path}={text}", "--device=cpu"]
    if path in REFUSED:
        with pytest.raises(DitvlaSettingError, match=REFUSED[path]):
            draccus.parse(DitvlaConfig, args=options)
        return
    config = draccus.parse(DitvlaConfig, args=options)
    given = config.given_settings()
    for part in path.split("."):
        given = given[part]
    assert given == value
    config.input_features = {
        "observation.images.top": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 32, 32)),
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(5,)),
    }
    config.output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(4,))}
    model = config.model_config()
    for part in path.split("."):
        model = getattr(model, part)
    assert model == value


def test_settings_are_checked_as_ditvla_checks_them_and_untrainable_heads_refused():
    config = lerobot_policy_options("--policy.head.width=64", "--policy.forecast.mode=taylor")
    assert config.given_settings() == {"head": {"width": 64}, "forecast": {"mode": "taylor"}}
    described = config.described_model()
    assert (described.head.width, described.head.depth) == (64, 2)  # over the tiny preset
    with pytest.raises(
        DecodingError, match=r"PolicyConfig.*n_action_steps must be in 1\.\.horizon"
    ):
        lerobot_policy_options("--policy.horizon=4", "--policy.n_action_steps=8")
    with pytest.raises(DecodingError, match=r"foresight\.kind=motion: the foresight head learns"):
        lerobot_policy_options("--policy.foresight.kind=motion")
    with pytest.raises(DitvlaSettingError, match="lerobot-train's batches do not carry"):
        make_policy_config("ditvla", device="cpu", auxiliary_weight=0.5)


def test_the_presets_offered_are_ditvlas(capsys):
    with pytest.raises(SystemExit):
        lerobot_policy_options("--policy.preset=huge")
    choices = ", ".join(repr(name) for name in POLICY_PRESETS)
    assert f"invalid choice: 'huge' (choose from {choices})" in capsys.readouterr().err

"""ditvla train: overfitting a small real store, exact resume after a crash, DDP and FSDP2
on gloo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_policy import observation, write_reaching_store

from ditvla.contract import CheckpointError
from ditvla.crash_points import CRASH_AT_ENV, CRASH_EXIT_STATUS
from ditvla.datasets.torch_dataset import ReplayBufferDataset
from ditvla.errors import ConfigError
from ditvla.policies.policy import DiTVLAPolicy
from ditvla.training.batch_order import EpochSampler
from ditvla.training.checkpoints import (
    rank_rng_state,
    read_checkpoint,
    read_sharded_checkpoint,
    restore_rank_rng,
)
from ditvla.training.optimization import lr_factor
from ditvla.training.trainer import TrainConfig, native_bfloat16, train

SMALL_HEAD = {"horizon": 4, "num_inference_steps": 8}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "reach.zarr"
    write_reaching_store(path, episodes=3, length=10)
    return path


def losses(folder) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_tiny_policy_overfits_a_small_store(store, tmp_path):
    out = tmp_path / "run"
    final = train(
        TrainConfig(
            dataset=str(store),
            out=str(out),
            policy_overrides=dict(SMALL_HEAD),
            steps=250,
            batch_size=15,
            lr=1e-3,
            warmup_steps=20,
            ema_decay=0.0,
            num_workers=0,
            save_every=1000,
            progress=False,
        )
    )
    curve = losses(out)
    assert len(curve) == 250
    start, end = np.mean(curve[:10]), np.mean(curve[-20:])
    # Flow matching starts near 2 (unit-variance noise and targets); memorising 30 frames
    # must bring it several times lower (0.30 measured after 250 steps).
    assert end < 0.4 and end < start / 4, (start, end)
    # The trained policy reproduces the demonstrated actions.
    policy = DiTVLAPolicy.from_pretrained(final)
    dataset = ReplayBufferDataset(store, n_obs_steps=1, horizon=4)
    errors = []
    for index in (0, 12, 25):
        obs = observation(dataset, index)
        torch.manual_seed(0)
        chunk = policy.predict_action_chunk(obs)
        errors.append((chunk[0] - dataset[index]["action"][0]).abs().mean().item())
    action_scale = np.abs(dataset.action).mean()
    assert np.mean(errors) < 0.35 * action_scale, (errors, action_scale)


def test_schedule_and_sampler():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)
    a, b = EpochSampler(10, seed=3, rank=0, world=2), EpochSampler(10, seed=3, rank=1, world=2)
    assert sorted(list(a) + list(b)) == list(range(10))
    a.set_epoch(1)
    first = list(a)
    a.set_epoch(1, start=2)
    assert list(a) == first[2:]


def train_command(store, out, steps, *extra):
    return [
        sys.executable,
        "-m",
        "ditvla.cli",
        "train",
        "--dataset",
        str(store),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "6",
        "--save-every",
        "5",
        "--num-workers",
        "0",
        "--policy.horizon",
        "4",
        "--warmup-steps",
        "3",
        *extra,
    ]


def test_bfloat16_precision_trains_on_the_cpu_with_float32_weights(store, tmp_path):
    def run(precision):
        out = tmp_path / precision
        config = TrainConfig(
            dataset=str(store),
            out=str(out),
            policy_overrides=dict(SMALL_HEAD),
            steps=4,
            batch_size=8,
            num_workers=0,
            save_every=1000,
            progress=False,
            precision=precision,
        )
        policy = DiTVLAPolicy.from_pretrained(train(config))
        return losses(out), policy

    full, _ = run("float32")
    half, policy = run("bfloat16")
    # the step ran in bfloat16: the same losses to bfloat16's precision, but not equal
    assert half != full
    np.testing.assert_allclose(half, full, rtol=0.05)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    # auto: bfloat16 where this CPU computes it natively (AVX512-BF16 or AMX), else float32
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux: the kernel's flags agree with PyTorch's check
        flags = set(cpuinfo.read_text().split())
        assert native_bfloat16(torch.device("cpu")) == bool({"avx512_bf16", "amx_tile"} & flags)
    auto, _ = run("auto")
    assert auto == (half if native_bfloat16(torch.device("cpu")) else full)


def test_the_frozen_eyes_encode_each_frame_once_and_train_the_same_policy(store, tmp_path):
    """Without augmentation frames repeat: the frozen pretrained eyes keep each frame's
    tokens and read them back, and the run trains the policy it trains without them."""

    def run(name, **options):
        out = tmp_path / name
        options = dict(steps=12, batch_size=8, num_workers=0, save_every=1000) | options
        config = TrainConfig(
            dataset=str(store),
            out=str(out),
            policy_overrides=dict(SMALL_HEAD),
            progress=False,
            **options,
        )
        policy = DiTVLAPolicy.from_pretrained(train(config))
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return policy.state_dict(), metrics

    kept, kept_metrics = run("kept")
    encoded, encoded_metrics = run("encoded", kept_features_gib=0)
    # each episode's frames are one image (write_reaching_store): 3 images among 96 frames
    assert kept_metrics[-1]["kept_frames"] == pytest.approx(1 - 3 / 96)
    assert "kept_frames" not in encoded_metrics[-1]
    for key in kept:  # the same tokens (to the rounding of a smaller batch, in float32)
        torch.testing.assert_close(kept[key], encoded[key], rtol=1e-4, atol=1e-5)
    _, augmented = run("augmented", steps=2, augment=True)  # shifted frames never repeat
    assert "kept_frames" not in augmented[-1]


def test_instruction_variants_reach_the_samples_and_a_bad_file_names_its_line(store, tmp_path):
    from ditvla.errors import ConfigError
    from ditvla.training.processes import Processes
    from ditvla.training.training_data import training_dataset

    variants = tmp_path / "variants.tsv"
    variants.write_text("t0\thead left\nt0\tleft, please\n", encoding="utf-8")
    config = TrainConfig(dataset=str(store), instruction_variants=str(variants))
    _, _, dataset = training_dataset(config, Processes(0, 1, torch.device("cpu")))
    read = {}
    for index in range(len(dataset)):  # every frame, drawn many times over
        for _ in range(6):
            sample = dataset[index]
            read.setdefault(sample["task_index"], set()).add(sample["instruction"])
    # task t0 ("go left") reads its own words and both variants; the others only theirs
    assert read[0] == {"go left", "head left", "left, please"}
    assert read[1] == {"go right"} and read[2] == {"stay"}
    variants.write_text("t0\thead left\nt9\tgo up\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"variants.tsv:2: task 't9' is not in the store"):
        training_dataset(config, Processes(0, 1, torch.device("cpu")))
    variants.write_text("t0\thead left\n\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"variants.tsv:2: empty line; every line is TASK<TAB>VARIANT"
    ):
        training_dataset(config, Processes(0, 1, torch.device("cpu")))


def test_instruction_noise_replaces_words_with_made_up_ones(store):
    from ditvla.datasets.torch_dataset import telling_words, with_made_up_words
    from ditvla.errors import ConfigError
    from ditvla.training.processes import Processes
    from ditvla.training.training_data import training_dataset

    config = TrainConfig(dataset=str(store), instruction_noise=0.5)
    _, _, dataset = training_dataset(config, Processes(0, 1, torch.device("cpu")))
    samples = [dataset[index] for index in range(len(dataset)) for _ in range(4)]
    left = [s["instruction"].split() for s in samples if s["task_index"] == 0]
    # task t0 ("go left"): "go" sometimes made up, never "left", the word that tells it from
    # t1 ("go right"); never longer
    assert ["go", "left"] in left and {len(words) for words in left} == {2}
    assert any(w[0] != "go" for w in left) and all(w[1] == "left" for w in left)
    made_up = {word for words in left for word in words} - {"go", "left"}
    assert made_up and all(word.isalpha() and word.islower() for word in made_up)
    assert all(3 <= len(word) <= 8 for word in made_up)
    # t2 ("stay") alone holds its only word: it is never made up
    assert all(s["instruction"] == "stay" for s in samples if s["task_index"] == 2)
    # the words that tell an instruction from the others: those no other holds, and the
    # one run in which another differs from it
    telling = telling_words(
        ["open the door", "slide the window open", "put the bowl on the plate",
         "put the bowl next to the plate", "put the cup on the plate"]
    )  # fmt: skip
    assert telling == {
        "open the door": {"door"},
        "slide the window open": {"slide", "window"},
        "put the bowl on the plate": {"bowl", "on"},
        "put the bowl next to the plate": {"bowl", "next", "to"},
        "put the cup on the plate": {"cup", "on"},
    }
    # one word at a time, as a reworded instruction changes one
    rng = np.random.default_rng(0)
    said = ["pick", "up", "the", "red", "block"]
    for _ in range(20):
        words = with_made_up_words(" ".join(said), 0.99, rng, frozenset({"red"})).split()
        assert sum(a != b for a, b in zip(words, said, strict=True)) == 1 and words[3] == "red"
    with pytest.raises(ConfigError, match=r"instruction_noise must be in \[0, 1\), got 1.0"):
        TrainConfig(dataset=str(store), instruction_noise=1.0)


RESUME_STEPS = 30
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted_run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(
        train_command(store, out, RESUME_STEPS), check=True, env=ONE_THREAD, capture_output=True
    )
    return out


@pytest.mark.parametrize(
    ("crash_at", "latest", "half_written"),
    [
        # right after the second checkpoint (step 10) is complete
        ("checkpoint.written:2", "step_0000010", None),
        # half-way through writing the second one: its policy written, the rest not, and
        # not renamed into place; the first (step 5) is the latest
        ("checkpoint.policy_written:2", "step_0000005", "step_0000010.tmp"),
    ],
)
def test_resume_after_a_crash_matches_an_uninterrupted_run(
    store, uninterrupted_run, tmp_path, crash_at, latest, half_written
):
    broken = tmp_path / "broken"
    crashed = subprocess.run(
        train_command(store, broken, RESUME_STEPS),
        env={**ONE_THREAD, CRASH_AT_ENV: crash_at},
        capture_output=True,
        text=True,
    )
    assert crashed.returncode == CRASH_EXIT_STATUS, crashed.stderr[-3000:]
    checkpoints = broken / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == latest
    if half_written:
        assert (checkpoints / half_written / "policy").is_dir()
        assert not (checkpoints / half_written / "trainer_state.json").exists()
    subprocess.run(
        train_command(store, broken, RESUME_STEPS, "--resume"),
        check=True,
        env=ONE_THREAD,
        capture_output=True,
    )
    np.testing.assert_allclose(losses(broken), losses(uninterrupted_run), rtol=1e-6)
    a = DiTVLAPolicy.from_pretrained(uninterrupted_run / "policy").state_dict()
    b = DiTVLAPolicy.from_pretrained(broken / "policy").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_says_so(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(TrainConfig(dataset=str(store), out=str(tmp_path / "x"), resume=True, progress=False))


def test_a_trained_policy_is_never_replaced_unless_asked(store, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(
        dataset=str(store),
        out=str(out),
        policy_overrides=dict(SMALL_HEAD),
        steps=2,
        batch_size=8,
        num_workers=0,
        save_every=1,
        progress=False,
    )
    weights = train(config) / "model.safetensors"
    trained = weights.read_bytes()
    with pytest.raises(ConfigError, match=rf"{out} holds an earlier training run .*--overwrite"):
        train(replace(config, seed=1))
    assert weights.read_bytes() == trained  # nothing of the first run was touched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step_0000001",
        "step_0000002",
    ]
    # asked to: the earlier run's policy, checkpoints and curve all go
    train(replace(config, seed=1, steps=1, overwrite=True))
    assert weights.read_bytes() != trained
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000001"]
    assert len(losses(out)) == 1
    with pytest.raises(ConfigError, match="not both"):
        replace(config, resume=True, overwrite=True)


def _train_on_two_processes(
    store, out, sharding: str, port: int, *extra: str, crash_at: str = ""
) -> subprocess.CompletedProcess:
    """Four steps of two gloo processes under torchrun, a checkpoint every two; a run
    asked to crash (``crash_at``) must end there."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "ditvla.cli",
        "train",
        "--dataset",
        str(store),
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--save-every",
        "2",
        "--num-workers",
        "0",
        "--policy.horizon",
        "4",
        "--device",
        "cpu",
        "--sharding",
        sharding,
        *extra,
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", CRASH_AT_ENV: crash_at},
    )
    if crash_at:  # torchrun ends the other process and fails
        assert f"exitcode  : {CRASH_EXIT_STATUS}" in result.stderr, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sharded_run(store, tmp_path_factory):
    """Four uninterrupted steps of FSDP2 over two gloo processes."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _train_on_two_processes(store, out, "fsdp", 29518)
    return out


def test_ddp_and_fsdp_with_two_processes_on_gloo(store, sharded_run, tmp_path):
    ddp = tmp_path / "ddp"
    _train_on_two_processes(store, ddp, "ddp", 29517)
    assert len(losses(ddp)) == 4
    state = json.loads((ddp / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["data"]["consumed"] > 0 and "1" in state["rank_rng"]
    whole = DiTVLAPolicy.from_pretrained(ddp / "policy").state_dict()

    # FSDP2: the same batches, noise and updates with the weights sharded: the same losses
    # and the same final (EMA) weights, gathered whole into an ordinary policy folder
    np.testing.assert_allclose(losses(sharded_run), losses(ddp), rtol=1e-4)
    sharded = DiTVLAPolicy.from_pretrained(sharded_run / "policy").state_dict()
    assert sharded.keys() == whole.keys()
    for key, value in whole.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # its checkpoints hold the whole weights (and EMA) and, as two processes held them,
    # the model, optimizer and EMA, which only a sharded run of two processes resumes from
    checkpoint = sharded_run / "checkpoints" / "step_0000002"
    DiTVLAPolicy.from_pretrained(checkpoint / "policy")
    # each process's shards as safetensors + JSON, nothing that unpickles
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [
        "process_0.json",
        "process_0.safetensors",
        "process_1.json",
        "process_1.safetensors",
    ]
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)
    with pytest.raises(CheckpointError, match=r"sharded run of 2 processes.*--nproc_per_node 2"):
        read_checkpoint(checkpoint, sgd)
    with pytest.raises(CheckpointError, match="written by 2 processes, resumed by 4"):
        read_sharded_checkpoint(checkpoint, 4)
    with pytest.raises(CheckpointError, match="written by an unsharded run"):
        read_sharded_checkpoint(ddp / "checkpoints" / "step_0000002", 2)


def test_an_interrupted_sharded_run_resumes_as_if_uninterrupted(store, sharded_run, tmp_path):
    """Killed right after its first checkpoint (step 2 of 4) and resumed, an FSDP2 run of
    two processes goes on with the same model, optimizer, schedule, EMA, data and noise:
    the uninterrupted run's losses and final weights."""
    broken = tmp_path / "broken"
    _train_on_two_processes(store, broken, "fsdp", 29519, crash_at="checkpoint.written:1")
    assert (broken / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert len(losses(broken)) == 2
    _train_on_two_processes(store, broken, "fsdp", 29520, "--resume")
    np.testing.assert_allclose(losses(broken), losses(sharded_run), rtol=1e-6)
    a = DiTVLAPolicy.from_pretrained(sharded_run / "policy").state_dict()
    b = DiTVLAPolicy.from_pretrained(broken / "policy").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_each_process_takes_back_its_own_generators():
    """The main process's checkpoint keeps the other processes' generator states as JSON
    (with its GPU's on CUDA); a resumed process draws what it would have drawn."""
    kept = json.loads(json.dumps(rank_rng_state(torch.device("cpu"))))
    expected = torch.rand(3)
    for mine in (kept, kept["torch"]):  # as kept now, and as older checkpoints kept it
        restore_rank_rng(1, torch.device("cpu"), {"rank_rng": {"1": mine}})
        assert torch.equal(torch.rand(3), expected)


def test_a_weights_only_checkpoint_says_it_does_not_resume(tmp_path):
    """Sharded runs' checkpoints held no optimizer state before they kept their shards."""
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "rng": {}}))
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)
    with pytest.raises(CheckpointError, match=r"holds the weights only.*does not resume"):
        read_checkpoint(tmp_path, sgd)
    with pytest.raises(CheckpointError, match=r"holds the weights only.*does not resume"):
        read_sharded_checkpoint(tmp_path, 2)


def test_fsdp_needs_torchrun_and_a_known_sharding(store, tmp_path):
    with pytest.raises(ValueError, match="launch with torchrun"):
        train(
            TrainConfig(
                dataset=str(store), out=str(tmp_path / "x"), sharding="fsdp", progress=False
            )
        )
    with pytest.raises(ValueError, match="sharding must be one of ddp, fsdp"):
        TrainConfig(dataset=str(store), sharding="zero3")
    with pytest.raises(ValueError, match="timeout_minutes must be > 0"):
        TrainConfig(dataset=str(store), timeout_minutes=0)


def test_ema_warm_up_keeps_a_short_run_from_its_first_weights():
    from ditvla.training.optimization import warmed_up_ema

    def averaged_after(power: float, updates: int) -> float:
        ema, update = [torch.zeros(4)], warmed_up_ema(0.999, power)
        for n in range(1, updates + 1):  # the weights moved from 0 to 1 and stay there
            update(ema, [torch.ones(4)], torch.tensor(n))
        return float(ema[0][0])

    # after 2000 updates a constant 0.999 still holds 13.5% of the first weights
    assert averaged_after(0.0, 2000) == pytest.approx(1 - 0.999**2000, abs=1e-3)
    assert averaged_after(0.75, 2000) > 0.999


def store_without_the_policys_camera(path: Path) -> Path:
    """A store whose only camera ("wrist") is not the small policy's ("cam")."""
    from ditvla.datasets.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.create(path, fps=10, cameras=["wrist"])
    episode = {"wrist": np.zeros((4, 32, 32, 3), np.uint8), "state": np.zeros((4, 3))}
    buffer.append_episode({**episode, "action": np.zeros((4, 2))}, task="t")
    return path


@pytest.fixture(scope="module")
def small_policy(store, tmp_path_factory) -> Path:
    """A policy folder trained briefly on ``store`` (8 denoising steps); tests copy it
    before changing it."""
    return train(
        TrainConfig(
            dataset=str(store),
            out=str(tmp_path_factory.mktemp("small_policy") / "run"),
            steps=40,
            batch_size=15,
            lr=1e-3,
            warmup_steps=5,
            num_workers=0,
            progress=False,
            policy_overrides=dict(SMALL_HEAD),
        )
    )


def test_calibrate_steps_writes_the_fewest_steps_within_tolerance(small_policy, store, tmp_path):
    from ditvla.cli import main
    from ditvla.contract import load_policy
    from ditvla.datasets.replay_buffer import DatasetError
    from ditvla.training.step_calibration import calibrate_steps

    folder = tmp_path / "policy"
    shutil.copytree(small_policy, folder)  # calibrate-steps writes into it
    policy = load_policy(folder)
    result = calibrate_steps(policy, store, frames=12, tolerance=0.05, progress=False)
    assert list(result.errors)[-1] == 8 == result.reference_steps  # SMALL_HEAD's 8 steps
    limit = result.errors[8] * 1.05
    assert result.errors[result.chosen_steps] <= limit
    assert all(result.errors[s] > limit for s in result.errors if s < result.chosen_steps)
    assert result.deviation[8] == 0

    assert (
        main(
            [
                "calibrate-steps",
                "--policy",
                str(folder),
                "--dataset",
                str(store),
                "--frames",
                "12",
                "--dry-run",
            ]
        )
        == 0
    )
    assert load_policy(folder).config.num_inference_steps == 8  # a dry run writes nothing
    assert (
        main(
            ["calibrate-steps", "--policy", str(folder), "--dataset", str(store), "--frames", "12"]
        )
        == 0
    )
    calibrated = load_policy(folder)
    assert calibrated.config.num_inference_steps == result.chosen_steps  # eval / serve use it
    record = json.loads((folder / "config.json").read_text())["step_calibration"]
    assert record["chosen_steps"] == result.chosen_steps and record["frames"] == result.frames > 0

    other = store_without_the_policys_camera(tmp_path / "other.zarr")
    with pytest.raises(DatasetError, match="lacks camera"):
        calibrate_steps(calibrated, other, frames=4, progress=False)


def test_distill_trains_a_two_then_a_one_step_student_that_follow_their_teachers(
    small_policy, store, tmp_path, capsys
):
    from ditvla.cli import main
    from ditvla.contract import PolicyInputError, load_policy
    from ditvla.datasets.observations import observations_from_store
    from ditvla.datasets.replay_buffer import DatasetError
    from ditvla.policies.config import PolicyConfig
    from ditvla.training.distillation import DistillConfig, distill

    teacher_folder = small_policy
    teacher = load_policy(teacher_folder)
    frames = observations_from_store(store, teacher.spec, 16, batch=16, seed=1)[0]
    noise = torch.randn(16, *teacher.noise_shape, generator=torch.Generator().manual_seed(1))

    def gap(policy, steps, reference, reference_steps) -> float:
        """How far ``policy``'s chunk in ``steps`` lands from ``reference``'s in its own."""
        with torch.no_grad():
            context = reference.encode(frames)
            target = reference.denoise(
                context, frames["state"], noise=noise, num_steps=reference_steps
            )
            mine = policy.denoise(
                policy.encode(frames), frames["state"], noise=noise, num_steps=steps
            )
        return float(((mine - target) ** 2).mean())

    before = gap(teacher, 2, teacher, 8)
    assert (
        main(
            [
                "distill",
                "--policy",
                str(teacher_folder),
                "--dataset",
                str(store),
                "--out",
                str(tmp_path / "student2"),
                "--student-steps",
                "2",
                "--steps",
                "60",
                "--lr",
                "1e-3",
                "--frames",
                "30",
                "--batch-size",
                "15",
                "--no-progress",
            ]
        )
        == 0
    )
    student2 = load_policy(tmp_path / "student2")
    assert student2.config.num_inference_steps == student2.config.distilled_steps == 2
    record = json.loads((tmp_path / "student2" / "config.json").read_text())["distillation"]
    assert record["teacher_steps"] == 8 and record["student_steps"] == 2
    assert gap(student2, 2, teacher, 8) < 0.5 * before  # two steps land where eight do

    # progressive: the 2-step student teaches a 1-step one
    before = gap(student2, 1, student2, 2)
    settings = DistillConfig(
        student_steps=1,
        steps=60,
        lr=1e-3,
        frames=30,
        batch_size=15,
        flow_weight=0.1,  # a light anchor: this briefly trained teacher is far from the data
        progress=False,
    )
    record = distill(tmp_path / "student2", store, tmp_path / "student", settings)
    assert record["teacher_steps"] == 2 and record["student_steps"] == 1
    assert record["settings"]["flow_weight"] == 0.1  # anchored on the demonstrated chunks
    student = load_policy(tmp_path / "student")
    assert student.config.num_inference_steps == student.config.distilled_steps == 1
    assert gap(student, 1, student2, 2) < 0.5 * before
    # the backbone is the teacher's, untouched
    for name, value in teacher.backbone.state_dict().items():
        assert torch.equal(value, student.backbone.state_dict()[name]), name

    # more steps than the student learned: refused by name, with what would work
    with pytest.raises(PolicyInputError, match=r"1-step student.*use its teacher"):
        student.act(student.encode(frames), frames["state"], num_steps=4)
    with pytest.raises(ValueError, match="1-step student"):
        PolicyConfig(distilled_steps=1, num_inference_steps=4)
    # a student is an ordinary policy folder: quantize takes it
    assert (
        main(
            [
                "quantize",
                "--policy",
                str(tmp_path / "student"),
                "--calibration",
                str(store),
                "--out",
                str(tmp_path / "student_int8"),
                "--frames",
                "8",
            ]
        )
        == 0
    )
    quantized = load_policy(tmp_path / "student_int8")
    assert quantized.config.distilled_steps == 1
    chunk = quantized.act(quantized.encode(frames), frames["state"], noise=noise)
    assert chunk.shape == (16, 4, 2) and torch.isfinite(chunk).all()
    # a policy folder is replaced only when asked, and the one read never
    again = ["quantize", "--policy", str(tmp_path / "student"), "--calibration", str(store)]
    written = (tmp_path / "student_int8" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*again, "--out", str(tmp_path / "student_int8"), "--frames", "4"]) == 2
    assert "holds a policy; --overwrite replaces it" in capsys.readouterr().err
    assert main([*again, "--out", str(tmp_path / "student"), "--overwrite"]) == 2
    assert "is the policy that --policy reads" in capsys.readouterr().err
    assert (tmp_path / "student_int8" / "model.safetensors").read_bytes() == written
    assert (
        main([*again, "--out", str(tmp_path / "student_int8"), "--frames", "4", "--overwrite"]) == 0
    )
    assert load_policy(tmp_path / "student_int8").config.distilled_steps == 1

    # bad input: fails before any training step, nothing written
    with pytest.raises(ValueError, match="fewer steps than its teacher"):
        distill(tmp_path / "student", store, tmp_path / "x", DistillConfig(progress=False))
    with pytest.raises(ValueError, match=r"--teacher-steps 4: .*1-step student"):
        distill(tmp_path / "student", store, tmp_path / "x", DistillConfig(teacher_steps=4))
    with pytest.raises(ValueError, match="fewer steps than its teacher"):
        distill(teacher_folder, store, tmp_path / "x", DistillConfig(student_steps=8))
    other = store_without_the_policys_camera(tmp_path / "other.zarr")
    with pytest.raises(DatasetError, match="lacks camera"):
        distill(teacher_folder, other, tmp_path / "x", DistillConfig(progress=False))
    assert not (tmp_path / "x").exists()


def test_calibrate_steps_by_success_evaluates_the_reference_then_the_fewest_up(tmp_path):
    from ditvla.cli import main
    from ditvla.contract import load_policy
    from ditvla.policies.config import PolicyConfig
    from ditvla.policies.policy import DiTVLAPolicy
    from ditvla.training.step_calibration import calibrate_steps_by_success, write_steps

    config = PolicyConfig.preset(
        "tiny", cameras=["corner"], image_size=32, state_dim=39, action_dim=4, horizon=8
    )
    config.num_inference_steps = 4
    torch.manual_seed(0)
    DiTVLAPolicy(config).save_pretrained(tmp_path / "policy")
    policy = load_policy(tmp_path / "policy")
    result = calibrate_steps_by_success(
        policy, "metaworld:reach-v3", episodes_per_task=2, max_steps=16, progress=False
    )
    # an untrained head: no episode succeeds at any step count, so 1 step is within the
    # reference's 2 points and the search stops there
    assert list(result.success) == [4, 1] and result.chosen_steps == 1
    assert result.success == {4: 0.0, 1: 0.0} and result.episodes_per_task == 2
    assert result.observation["cameras"] == ["corner"]
    assert list(result.intervals[1]) == ["reach-v3"]
    assert policy.config.num_inference_steps == 4  # measured, not changed
    write_steps(tmp_path / "policy", result)
    assert load_policy(tmp_path / "policy").config.num_inference_steps == 1
    record = json.loads((tmp_path / "policy" / "config.json").read_text())["step_calibration"]
    assert record["success"] == {"4": 0.0, "1": 0.0} and record["env"] == "metaworld:reach-v3"

    both = ["--dataset", "x.zarr", "--env", "metaworld:reach-v3"]
    assert main(["calibrate-steps", "--policy", str(tmp_path / "policy"), *both]) == 2
    with pytest.raises(ValueError, match="points must be >= 0"):
        calibrate_steps_by_success(policy, "metaworld:reach-v3", points=-1)

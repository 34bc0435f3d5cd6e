"""The rollout evaluator on real Meta-World episodes: it measures, it does not flatter."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal

import av
import numpy as np
import pytest
import torch

from ditvla.cli import main
from ditvla.contract import PolicySpec
from ditvla.envs.baselines import ExpertPolicy, RandomPolicy
from ditvla.envs.evaluate import evaluate, wilson_interval
from ditvla.envs.evaluation_runs import EvaluationRunError, merge_runs
from ditvla.errors import ConfigError
from ditvla.policies.config import PolicyConfig
from ditvla.policies.policy import DiTVLAPolicy

TASKS = "metaworld:reach-v3,drawer-close-v3"


def test_wilson_interval():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(
        0.2775, abs=1e-3
    )
    assert wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-3)
    lo, hi = wilson_interval(45, 50)
    assert lo < 0.9 < hi


def test_expert_succeeds_random_does_not_and_runs_repeat(tmp_path):
    expert = evaluate(
        ExpertPolicy(),
        TASKS,
        episodes_per_task=3,
        workers=2,
        max_steps=150,
        out=tmp_path / "expert",
        progress=False,
    )
    summary = json.loads((tmp_path / "expert" / "results.json").read_text())
    assert summary["tasks"]["reach-v3"]["success_rate"] == 1.0
    assert summary["tasks"]["drawer-close-v3"]["success_rate"] == 1.0
    assert summary["tasks"]["reach-v3"]["episodes"] == 3
    assert len(summary["tasks"]["reach-v3"]["ci95"]) == 2
    video = tmp_path / "expert" / "videos" / "reach-v3_seed100000.mp4"
    assert video.stat().st_size > 1000
    with av.open(str(video)) as container:  # what browsers play: H.264, not MPEG-4 Part 2
        assert container.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in container.decode(video=0)) > 10
    assert "| reach-v3 | 100% |" in (tmp_path / "expert" / "results.md").read_text()
    lines = (tmp_path / "expert" / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 6
    again = evaluate(
        ExpertPolicy(), TASKS, episodes_per_task=3, workers=1, max_steps=150, progress=False
    )
    steps = lambda r: sorted((e.task, e.seed, e.steps) for e in r.episodes)  # noqa: E731
    assert steps(again) == steps(expert)  # the same episodes, whatever the worker count

    random = evaluate(
        RandomPolicy(action_dim=4),
        "metaworld:reach-v3",
        episodes_per_task=3,
        workers=2,
        max_steps=150,
        progress=False,
    )
    assert random.summary()["tasks"]["reach-v3"]["success_rate"] == 0.0


class RecordingPolicy(DiTVLAPolicy):
    """A real (untrained) policy that keeps the chunks it returns, per episode seed."""

    def predict_action_chunk(self, observation, **kwargs):
        chunks = super().predict_action_chunk(observation, **kwargs)
        for seed, chunk in zip(observation["seed"], chunks, strict=True):
            self.chunks.setdefault(seed, []).append(chunk.clone())
        return chunks


def test_a_diffusion_policys_rollouts_do_not_depend_on_batching():
    config = PolicyConfig.preset(
        "tiny",
        cameras=["corner"],
        image_size=32,
        state_dim=39,
        action_dim=4,
        horizon=8,
        n_action_steps=4,  # three chunks in 12 steps
    )
    torch.manual_seed(0)
    policy = RecordingPolicy(config).eval()
    torch.nn.init.normal_(policy.head.action_out.weight, std=0.5)  # not the identity map
    runs = []
    for workers in (1, 2):
        policy.chunks = {}
        evaluate(
            policy,
            "metaworld:reach-v3",
            episodes_per_task=2,
            workers=workers,
            max_steps=12,
            progress=False,
        )
        runs.append(policy.chunks)
    alone, batched = runs
    assert sorted(alone) == sorted(batched) == [100000, 100001]
    # each episode's chunks: the same with 1 or 2 episodes per call, up to rounding. The
    # presets' convolutional eyes round differently at batch 1 and 2 (about 1e-5 of their
    # features), which ten denoising steps through this random head take to about 2e-3 on
    # actions of magnitude 3.6 with two threads; another episode's noise or frames would
    # move them by about 5.
    for seed in alone:
        assert len(alone[seed]) == len(batched[seed]) == 3
        for a, b in zip(alone[seed], batched[seed], strict=True):
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-3)
    assert not torch.allclose(alone[100000][0], alone[100001][0])  # each its own noise


class NaNPolicy:
    spec = PolicySpec(cameras=(), image_size=0, state_dim=0, action_dim=4, n_action_steps=4)

    def reset(self):
        pass

    def predict_action_chunk(self, observation):
        return torch.full((len(observation["instruction"]), 4, 4), float("nan"))


class WrongShapePolicy(NaNPolicy):
    def predict_action_chunk(self, observation):
        return torch.zeros(len(observation["instruction"]), 4, 3)


@pytest.mark.parametrize(
    ("policy", "reason"), [(NaNPolicy(), "NaN"), (WrongShapePolicy(), "shape")]
)
def test_bad_policy_output_fails_episodes_with_a_reason(tmp_path, policy, reason):
    report = evaluate(
        policy, "metaworld:reach-v3", episodes_per_task=3, workers=2, out=tmp_path, progress=False
    )
    assert len(report.episodes) == 3
    assert all(not e.success and reason in e.error for e in report.episodes)
    assert report.summary()["tasks"]["reach-v3"]["errors"] == 3


class KillsAWorkerOnce(ExpertPolicy):
    """Kills one simulator process mid-episode (as a crash would), once."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def predict_action_chunk(self, observation):
        self.calls += 1
        if self.calls == 10:
            os.kill(mp.active_children()[0].pid, signal.SIGKILL)
        return super().predict_action_chunk(observation)


def test_a_crashed_worker_is_replaced_and_its_episode_retried(tmp_path):
    report = evaluate(
        KillsAWorkerOnce(),
        TASKS,
        episodes_per_task=2,
        workers=2,
        max_steps=150,
        out=tmp_path,
        progress=False,
    )
    keys = sorted((e.task, e.seed) for e in report.episodes)
    assert keys == sorted(
        {(t, s) for t in ("reach-v3", "drawer-close-v3") for s in (100000, 100001)}
    )
    assert all(e.success and e.error is None for e in report.episodes)
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 4


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"valid: MT10, MT50, .*reach-v3"):
        evaluate(
            RandomPolicy(action_dim=4), "metaworld:fly-v3", episodes_per_task=1, progress=False
        )
    assert np.isfinite(wilson_interval(1, 2)).all()


class CountingExpert(ExpertPolicy):
    """The scripted expert, keeping which episodes it was asked to act in."""

    def __init__(self):
        super().__init__()
        self.episodes: set[tuple[str, int]] = set()

    def predict_action_chunk(self, observation, **kwargs):
        self.episodes.update(zip(observation["task"], observation["seed"], strict=True))
        return super().predict_action_chunk(observation, **kwargs)


def _results(folder):
    summary = json.loads((folder / "results.json").read_text())
    summary.pop("seconds")
    episodes = sorted((folder / "episodes.jsonl").read_text().splitlines())
    return summary, episodes


def test_shards_merge_into_the_report_of_one_machine(tmp_path):
    run = dict(episodes_per_task=3, max_steps=60, videos_per_task=0, progress=False)
    evaluate(ExpertPolicy(), TASKS, out=tmp_path / "whole", **run)
    for i in range(2):
        evaluate(ExpertPolicy(), TASKS, out=tmp_path / f"shard{i}", shard=f"{i}/2", **run)
    shards = [str(tmp_path / f"shard{i}") for i in range(2)]
    assert main(["eval", "merge", *shards, "--out", str(tmp_path / "merged")]) == 0
    assert _results(tmp_path / "merged") == _results(tmp_path / "whole")
    # merged again: an earlier report is replaced only when asked, a shard never
    shard_paths = [tmp_path / f"shard{i}" for i in range(2)]
    with pytest.raises(EvaluationRunError, match=r"holds 6 episodes.*; --overwrite replaces"):
        merge_runs(shard_paths, tmp_path / "merged")
    merge_runs(shard_paths, tmp_path / "merged", overwrite=True)
    assert _results(tmp_path / "merged") == _results(tmp_path / "whole")
    with pytest.raises(EvaluationRunError, match="is one of the shards"):
        merge_runs(shard_paths, tmp_path / "shard1", overwrite=True)
    with pytest.raises(EvaluationRunError, match=r"0/2 \.\. 1/2; got 0/2"):
        merge_runs([tmp_path / "shard0"], tmp_path / "x")
    with pytest.raises(EvaluationRunError, match=r"got 0/1, 0/2"):
        merge_runs([tmp_path / "shard0", tmp_path / "whole"], tmp_path / "x")
    other = tmp_path / "other"  # shard 1 of a run with another step limit
    shutil.copytree(tmp_path / "shard1", other)
    recorded = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**recorded, "max_steps": 50}))
    with pytest.raises(EvaluationRunError, match="hold different evaluations"):
        merge_runs([tmp_path / "shard0", other], tmp_path / "x")
    with pytest.raises(ConfigError, match="shard must be I/N with 0 <= I < N"):
        evaluate(ExpertPolicy(), TASKS, shard="2/2", **run)


def test_an_interrupted_evaluation_resumes_where_it_stopped(tmp_path):
    run = dict(episodes_per_task=3, max_steps=60, videos_per_task=0, progress=False)
    evaluate(ExpertPolicy(), TASKS, out=tmp_path / "whole", **run)
    folder = tmp_path / "interrupted"
    evaluate(ExpertPolicy(), TASKS, out=folder, **run)
    lines = (folder / "episodes.jsonl").read_text().splitlines()
    kept = lines[:2]
    (folder / "episodes.jsonl").write_text("\n".join(kept) + "\n" + lines[2][:17])  # torn
    (folder / "results.json").unlink()
    expert = CountingExpert()
    evaluate(expert, TASKS, out=folder, resume=True, **run)
    done = {(json.loads(line)["task"], json.loads(line)["seed"]) for line in kept}
    every = {(t, 100000 + i) for t in ("reach-v3", "drawer-close-v3") for i in range(3)}
    assert expert.episodes == every - done  # the torn line's episode ran again
    assert _results(folder) == _results(tmp_path / "whole")
    with pytest.raises(EvaluationRunError, match=r"max_steps differ"):
        evaluate(ExpertPolicy(), TASKS, out=folder, resume=True, **{**run, "max_steps": 50})


def test_a_resumed_evaluation_grows_to_more_episodes_keeping_those_it_ran(tmp_path):
    """10 episodes per task for a first look, then the official 50: the seeds already run
    are kept, only the new ones run, and the report is the one a run of 50 would write."""
    run = dict(max_steps=60, videos_per_task=1, progress=False)
    evaluate(ExpertPolicy(), TASKS, out=tmp_path / "whole", episodes_per_task=3, **run)
    folder = tmp_path / "grown"
    evaluate(ExpertPolicy(), TASKS, out=folder, episodes_per_task=2, **run)
    expert = CountingExpert()
    evaluate(expert, TASKS, out=folder, resume=True, episodes_per_task=3, **run)
    assert expert.episodes == {("reach-v3", 100002), ("drawer-close-v3", 100002)}
    assert _results(folder) == _results(tmp_path / "whole")
    videos = sorted(path.name for path in (folder / "videos").iterdir())
    assert videos == ["drawer-close-v3_seed100000.mp4", "reach-v3_seed100000.mp4"]  # as whole
    with pytest.raises(EvaluationRunError, match="holds an evaluation of 3 episodes per task"):
        evaluate(ExpertPolicy(), TASKS, out=folder, resume=True, episodes_per_task=2, **run)
    shard = tmp_path / "shard"
    sharded = dict(run, shard="0/2", videos_per_task=0)
    evaluate(ExpertPolicy(), TASKS, out=shard, episodes_per_task=2, **sharded)
    with pytest.raises(EvaluationRunError, match="a shard of 3 per task holds other episodes"):
        evaluate(ExpertPolicy(), TASKS, out=shard, resume=True, episodes_per_task=3, **sharded)
    assert len((shard / "episodes.jsonl").read_text().splitlines()) == 2  # nothing lost


def test_an_evaluation_never_replaces_another_unless_asked(tmp_path, capsys, monkeypatch):
    """A folder holding an evaluation's episodes is refused without --resume or
    --overwrite, and keeps them (one run once silently replaced another's episodes); the
    scratch folder used when none is named is replaced by each run."""
    run = dict(episodes_per_task=2, max_steps=40, videos_per_task=0, progress=False)
    folder = tmp_path / "run"
    evaluate(ExpertPolicy(), TASKS, out=folder, **run)
    held = (folder / "episodes.jsonl").read_bytes()
    with pytest.raises(EvaluationRunError, match="holds 4 episodes of an earlier evaluation"):
        evaluate(RandomPolicy(4), TASKS, out=folder, **run)
    command = ["eval", "--policy", "random", "--env", TASKS, "--out", str(folder)]
    assert main([*command, "--episodes-per-task", "2"]) == 2
    assert "--overwrite replaces it" in capsys.readouterr().err
    assert (folder / "episodes.jsonl").read_bytes() == held
    with pytest.raises(ConfigError, match="resume keeps a folder's episodes, overwrite"):
        evaluate(ExpertPolicy(), TASKS, out=folder, resume=True, overwrite=True, **run)
    evaluate(ExpertPolicy(), TASKS, out=folder, overwrite=True, **{**run, "max_steps": 30})
    assert json.loads((folder / "run.json").read_text())["max_steps"] == 30
    replaced = [json.loads(line) for line in (folder / "episodes.jsonl").read_text().splitlines()]
    assert len(replaced) == 4 and all(e["steps"] <= 30 for e in replaced)
    monkeypatch.chdir(tmp_path)
    scratch = ["eval", "--policy", "expert", "--env", "metaworld:reach-v3", "--max-steps", "20"]
    scratch += ["--episodes-per-task", "1", "--videos-per-task", "0"]
    assert main(scratch) == 0 and main(scratch) == 0
    assert len((tmp_path / "outputs" / "eval" / "episodes.jsonl").read_text().splitlines()) == 1


class ChunkCounter:
    """Chunks of 8 zero actions (executing 4 of them, its own setting); counts the calls."""

    spec = PolicySpec(
        cameras=(), image_size=0, state_dim=0, action_dim=4, horizon=8, n_action_steps=4
    )

    def __init__(self):
        self.calls = 0

    def reset(self):
        pass

    def predict_action_chunk(self, observation):
        self.calls += 1
        return torch.zeros(len(observation["instruction"]), 8, 4)


class ChunkedExpert:
    """The scripted expert's action held for a chunk of 8 (4 executed); records the
    episodes of each call."""

    spec = PolicySpec(
        cameras=(),
        image_size=0,
        state_dim=0,
        action_dim=4,
        horizon=8,
        n_action_steps=4,
        reads_expert_action=True,
    )

    def __init__(self):
        self.batches: list[set[tuple[str, int]]] = []

    def reset(self):
        pass

    def predict_action_chunk(self, observation):
        self.batches.append(set(zip(observation["task"], observation["seed"], strict=True)))
        action = torch.from_numpy(np.asarray(observation["expert_action"], np.float32))
        return action[:, None].expand(-1, 8, -1)


def test_every_policy_call_holds_every_episode_in_flight():
    """Episodes end at different steps; the next ones start when those in flight need a
    chunk too, so no call leaves out an episode between its first call and its last."""
    policy = ChunkedExpert()
    evaluate(policy, TASKS, episodes_per_task=4, max_steps=40, workers=3, progress=False)
    calls: dict[tuple[str, int], list[int]] = {}
    for call, episodes in enumerate(policy.batches):
        for episode in episodes:
            calls.setdefault(episode, []).append(call)
    assert len(calls) == 8
    assert len({c[-1] for c in calls.values()}) > 2  # episodes did end at different calls
    for episode, made in calls.items():
        assert made == list(range(made[0], made[-1] + 1)), episode  # none skipped
    assert all(len(batch) == 3 for batch in policy.batches[:3])  # three workers, all busy


def test_action_steps_sets_how_often_the_policy_is_asked(tmp_path):
    run = dict(episodes_per_task=1, max_steps=12, workers=1, videos_per_task=0, progress=False)
    own, every_other = ChunkCounter(), ChunkCounter()
    evaluate(own, "metaworld:reach-v3", out=tmp_path / "own", **run)
    evaluate(every_other, "metaworld:reach-v3", out=tmp_path / "two", action_steps=2, **run)
    assert (own.calls, every_other.calls) == (3, 6)  # 12 steps, 4 or 2 actions per chunk
    summary = json.loads((tmp_path / "two" / "results.json").read_text())
    assert summary["observation"]["action_steps"] == 2
    assert "2 actions per chunk" in (tmp_path / "two" / "results.md").read_text()
    assert (
        "action_steps"
        not in json.loads((tmp_path / "own" / "results.json").read_text())["observation"]
    )
    with pytest.raises(EvaluationRunError):  # another cadence is another evaluation
        evaluate(ChunkCounter(), "metaworld:reach-v3", out=tmp_path / "two", resume=True, **run)
    with pytest.raises(ConfigError, match=r"chunks of 8 actions \(its horizon\), so at most 8"):
        evaluate(ChunkCounter(), "metaworld:reach-v3", action_steps=9, **run)


class InpaintRecorder(RecordingPolicy):
    """A real (untrained) policy that also keeps what each call asked it to inpaint."""

    def predict_action_chunk(self, observation, **kwargs):
        self.inpaints.append(kwargs.get("inpaint"))
        return super().predict_action_chunk(observation, **kwargs)


def test_merge_rtc_pulls_each_chunk_towards_the_rest_of_the_last(tmp_path):
    config = PolicyConfig.preset(
        "tiny", cameras=["corner"], image_size=32, state_dim=39, action_dim=4, horizon=8
    )
    torch.manual_seed(0)
    policy = InpaintRecorder(config).eval()
    torch.nn.init.normal_(policy.head.action_out.weight, std=0.5)  # not the identity map
    run = dict(episodes_per_task=1, max_steps=12, workers=1, videos_per_task=0, progress=False)
    chunks = {}
    for merge in ("latest", "rtc"):
        policy.chunks, policy.inpaints = {}, []
        evaluate(
            policy, "metaworld:reach-v3", out=tmp_path / merge, action_steps=4, merge=merge, **run
        )
        chunks[merge] = policy.chunks[100000]
    assert len(chunks["rtc"]) == 3  # 12 steps, 4 actions per chunk
    first, second, _ = policy.inpaints
    assert not first[1].any()  # nothing planned before the episode's first chunk
    planned, weights = second
    np.testing.assert_allclose(planned[0, :4], chunks["rtc"][0][4:].numpy(), rtol=1e-6)
    assert (weights[0, 4:] == 0).all() and np.all(np.diff(weights[0, :4]) < 0)
    assert 0.5 < weights[0, 0] < 1  # pulled towards the plan, not frozen to it
    # the same episode and noise: with rtc the second chunk keeps closer to what the first
    # planned for its ticks than without
    distance = {
        merge: (chunks[merge][1][:4] - chunks[merge][0][4:]).abs().mean().item() for merge in chunks
    }
    assert distance["rtc"] < 0.7 * distance["latest"], distance
    summary = json.loads((tmp_path / "rtc" / "results.json").read_text())
    assert summary["observation"]["merge"] == "rtc"
    assert "real-time chunking" in (tmp_path / "rtc" / "results.md").read_text()
    assert (
        "merge" not in json.loads((tmp_path / "latest" / "results.json").read_text())["observation"]
    )
    with pytest.raises(EvaluationRunError):  # another merge is another evaluation
        evaluate(
            policy, "metaworld:reach-v3", out=tmp_path / "rtc", action_steps=4, resume=True, **run
        )
    with pytest.raises(ConfigError, match=r"ChunkCounter cannot \(ditvla's policies can\)"):
        evaluate(ChunkCounter(), "metaworld:reach-v3", merge="rtc", **run)
    with pytest.raises(ConfigError, match="unknown merge 'mean'; choose one of latest, rtc"):
        evaluate(ChunkCounter(), "metaworld:reach-v3", merge="mean", **run)

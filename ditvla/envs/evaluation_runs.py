"""An evaluation as a folder that can be split, resumed and merged.

``ditvla eval --out DIR`` writes ``DIR/run.json`` (what was evaluated: the environment, the
policy's observation, the episode seeds and limits, the shard) before its first episode and
appends each finished episode to ``DIR/episodes.jsonl``. Then:

- ``--shard I/N`` runs every N-th episode from the I-th of the run's canonical order (task
  by task, seed by seed), so N machines share one evaluation and their shards hold every
  task alike;
- ``--resume`` reads the folder back and runs only the episodes it lacks (a line torn by a
  crash is dropped and its episode run again), refusing a folder of another run;
- ``ditvla eval merge DIR... --out OUT`` joins the shards of one run into the report a
  single machine would have written for the same episodes (episode seeds fix the
  simulator and the policy's noise alike, so the episodes are the same wherever they ran).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ditvla.envs.evaluation_report import EpisodeResult, EvaluationReport
from ditvla.errors import ConfigError, DitvlaError

RUN_FILE, EPISODES_FILE = "run.json", "episodes.jsonl"
REPORT_FILES, VIDEOS_DIR = ("results.json", "results.md"), "videos"


class EvaluationRunError(DitvlaError):
    """An evaluation folder that cannot be resumed or merged as asked."""


def parse_shard(shard: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; ``""`` -> (0, 1), the whole run."""
    if not shard:
        return 0, 1
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        index = count = -1
    if not 0 <= index < count:
        raise ConfigError(f"shard must be I/N with 0 <= I < N (e.g. 0/4), got {shard!r}")
    return index, count


def episode_jobs(tasks: list[str], episodes_per_task: int, seed_start: int, shard: str):
    """The (task, seed) episodes of one shard, in the run's canonical order."""
    index, count = parse_shard(shard)
    every = [(task, seed_start + i) for task in tasks for i in range(episodes_per_task)]
    return every[index::count]


def read_episodes(folder: Path) -> list[EpisodeResult]:
    """The episodes ``folder/episodes.jsonl`` holds; a line a crash left unfinished (the
    last, unterminated or not JSON) is dropped."""
    path = folder / EPISODES_FILE
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    episodes = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            episodes.append(EpisodeResult(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if number < len(lines) - 1:  # not the torn tail: the file was damaged otherwise
                raise EvaluationRunError(
                    f"{path}:{number}: not an episode record ({exc})"
                ) from None
    return episodes


def write_episodes(folder: Path, episodes: list[EpisodeResult]) -> None:
    """``folder/episodes.jsonl`` holding exactly ``episodes`` (replaced at once)."""
    path = folder / EPISODES_FILE
    partial = path.with_suffix(".jsonl.partial")
    partial.write_text("".join(json.dumps(asdict(e)) + "\n" for e in episodes))
    os.replace(partial, path)


def claim_folder(folder: Path, *, resume: bool, overwrite: bool, resumable: bool = True) -> None:
    """Make ``folder`` ready for an evaluation. Kept as it is when ``resume``; otherwise a
    folder holding an earlier evaluation's episodes is refused unless ``overwrite`` (so
    that one run never silently replaces another), and what an earlier run left there
    (its record, episodes, report and videos) is removed. A folder not yet made, or
    something else at its path, is left to the run to make (or fail to). ``resumable``:
    whether the refusal offers ``--resume`` (a merge has nothing to finish)."""
    if resume or not folder.is_dir():
        return
    if not overwrite:
        held = len(read_episodes(folder))
        if held:
            finish = "--resume finishes it (same settings), " if resumable else ""
            raise EvaluationRunError(
                f"{folder} holds {held} episodes of an earlier evaluation; {finish}"
                "--overwrite replaces it, or choose another --out"
            )
    for name in (RUN_FILE, EPISODES_FILE, *REPORT_FILES):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / VIDEOS_DIR, ignore_errors=True)


def start_run(
    folder: Path, run: dict[str, Any], *, resume: bool, overwrite: bool
) -> list[EpisodeResult]:
    """Record ``run`` in ``folder`` (:func:`claim_folder` first) and return the episodes
    already done: those of the same run when ``resume`` (a folder of another run is
    refused; a whole run resumed with more episodes per task grows, keeping the seeds it
    ran), none otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    claim_folder(folder, resume=resume, overwrite=overwrite)
    done: list[EpisodeResult] = []
    recorded = folder / RUN_FILE
    if resume and recorded.exists():
        before = json.loads(recorded.read_text())
        changed = sorted(k for k in run.keys() | before.keys() if run.get(k) != before.get(k))
        if changed == ["episodes_per_task"]:
            _check_growth(folder, before, run)
        elif changed:
            raise EvaluationRunError(
                f"{folder} holds another evaluation ({', '.join(changed)} differ: "
                f"{ {k: before.get(k) for k in changed} } there); resume it with the same "
                "settings, or choose another --out"
            )
        done = read_episodes(folder)
    recorded.write_text(json.dumps(run, indent=2) + "\n")
    write_episodes(folder, done)
    return done


def _check_growth(folder: Path, before: dict[str, Any], run: dict[str, Any]) -> None:
    """A resumed run may ask for more episodes per task than ``folder`` recorded: seeds
    count up from the same start, so the episodes held are the first of the larger run.
    A shard of a larger run holds other episodes, and fewer would drop episodes."""
    held, wanted = before["episodes_per_task"], run["episodes_per_task"]
    if parse_shard(run["shard"])[1] > 1:
        advice = f"Resume the shard with {held}, or grow an unsharded run"
        raise _shard_resize_error(folder, run["shard"], held, wanted, advice)
    if wanted < held:
        raise EvaluationRunError(
            f"{folder} holds an evaluation of {held} episodes per task; resume it with "
            f"{held} or more (it never drops episodes), or choose another --out"
        )


def check_shard_size(folder: Path, shard: str, episodes_per_task: int) -> None:
    """Refuse, before any work, to resume the shard ``shard`` in ``folder`` with another
    number of episodes per task (a shard of another count holds other episodes)."""
    recorded = folder / RUN_FILE
    if not recorded.exists():
        return
    held = json.loads(recorded.read_text()).get("episodes_per_task")
    if held != episodes_per_task:
        advice = (
            f"It resumes only with --episodes-per-task {held}; to grow the run, resume its "
            "merged folder without --ray"
        )
        raise _shard_resize_error(folder, shard, held, episodes_per_task, advice)


def _shard_resize_error(
    folder: Path, shard: str, held: int, wanted: int, advice: str
) -> EvaluationRunError:
    return EvaluationRunError(
        f"{folder} holds shard {shard} of {held} episodes per task; a shard of {wanted} per "
        f"task holds other episodes. {advice}"
    )


def write_report(folder: Path, report: EvaluationReport) -> None:
    summary, markdown = REPORT_FILES
    (folder / summary).write_text(json.dumps(report.summary(), indent=2) + "\n")
    (folder / markdown).write_text(report.markdown() + "\n")


def _run_jobs(run: dict[str, Any], shard: str) -> list[tuple[str, int]]:
    return episode_jobs(run["tasks"], run["episodes_per_task"], run["seed_start"], shard)


def _read_runs(folders: list[Path]) -> tuple[dict[str, Any], list[str]]:
    """The run the shards in ``folders`` belong to (without its shard), and their shards;
    EvaluationRunError unless they are every shard of one run."""
    runs = []
    for folder in folders:
        if not (folder / RUN_FILE).exists():
            raise EvaluationRunError(f"{folder}: not an evaluation folder (no {RUN_FILE})")
        runs.append(json.loads((folder / RUN_FILE).read_text()))
    first = {k: v for k, v in runs[0].items() if k != "shard"}
    for folder, run in zip(folders, runs, strict=True):
        if {k: v for k, v in run.items() if k != "shard"} != first:
            raise EvaluationRunError(f"{folder} and {folders[0]} hold different evaluations")
    shards = sorted(parse_shard(run["shard"]) for run in runs)
    count = shards[0][1]
    if shards != [(i, count) for i in range(count)]:
        found = ", ".join(f"{i}/{n}" for i, n in shards)
        raise EvaluationRunError(
            f"the shards of one run are 0/{count} .. {count - 1}/{count}; got {found}"
        )
    return first, [run["shard"] for run in runs]


def merge_runs(folders: list[Path], out: Path, *, overwrite: bool = False) -> EvaluationReport:
    """The shards in ``folders`` (every shard of one run, each finished) as one report,
    written to ``out`` as a one-machine run of the same episodes would have been. An
    ``out`` holding another report is refused unless ``overwrite`` (:func:`claim_folder`);
    a shard's own folder always is."""
    if any(out.resolve() == folder.resolve() for folder in folders):
        raise EvaluationRunError(f"--out {out} is one of the shards: choose another folder")
    run, shards = _read_runs(folders)
    report = EvaluationReport(observation=run["observation"])
    found: dict[tuple[str, int], EpisodeResult] = {}
    for folder, shard in zip(folders, shards, strict=True):
        episodes = {(e.task, e.seed): e for e in read_episodes(folder)}
        missing = [job for job in _run_jobs(run, shard) if job not in episodes]
        if missing:
            raise EvaluationRunError(
                f"{folder} (shard {shard}) lacks {len(missing)} of its episodes; finish it "
                f"with `ditvla eval ... --shard {shard} --resume`"
            )
        found.update(episodes)
        results = folder / REPORT_FILES[0]
        if results.exists():  # the shards ran side by side: the slowest is the run's time
            report.seconds = max(report.seconds, json.loads(results.read_text())["seconds"])
    report.episodes = [found[job] for job in _run_jobs(run, "")]
    claim_folder(out, resume=False, overwrite=overwrite, resumable=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({**run, "shard": ""}, indent=2) + "\n")
    write_episodes(out, report.episodes)
    write_report(out, report)
    return report

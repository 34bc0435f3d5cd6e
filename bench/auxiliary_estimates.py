"""Does a policy's success hinge on where its auxiliary head puts things at the start?

A policy trained with auxiliary targets (``--auxiliary``: object poses, the goal) carries
an estimate of them; with ``--policy.auxiliary-input`` that estimate conditions its action
head. For every episode of an evaluation already run (``ditvla eval --out EVAL``), this
resets the same task and seed, reads the estimate from the first frame and measures how far
it is from the simulator's truth (in centimetres: Meta-World and robosuite positions are in
metres), then sets the errors of the episodes that succeeded beside those that failed.

    python -m bench.auxiliary_estimates --policy runs/x/policy --store mt10.zarr \\
        --eval runs/x_eval [--targets goal,objects:0:3] [--tasks reach-v3,push-v3]

Last line: ``auxiliary estimates at the first frame: <target> median <a> cm where the
episode succeeded, <b> cm where it failed ...``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from bench.privileged_targets import parse_targets


def estimate_columns(policy, stats) -> dict[str, tuple[slice, np.ndarray, np.ndarray]]:
    """Each auxiliary array's columns in the head's output, with its mean and std (the
    head predicts standardized values, as training standardized its targets)."""
    from ditvla.training.training_data import auxiliary_scale

    columns, start = {}, 0
    for key in policy.config.auxiliary_keys:
        mean, std = auxiliary_scale(stats, key)
        columns[key] = (slice(start, start + mean.size), mean, std)
        start += mean.size
    return columns


def first_frame_errors(policy, suite, task: str, seeds: list[int], columns, targets) -> dict:
    """{target: [error in cm per seed]} at the first frame of each episode."""
    env = suite.make(task, cameras=policy.config.cameras, image_size=policy.config.image_size)
    errors: dict[str, list[float]] = {label: [] for label, _, _ in targets}
    try:
        for seed in seeds:
            observation, _ = env.reset(seed=seed)
            with torch.no_grad():
                context = policy.encode(observation)
                estimate = policy.auxiliary(context.tokens, context.mask)[0].numpy()
            truth = env.state_parts()
            for label, key, part in targets:
                where, mean, std = columns[key]
                values = estimate[where] * std + mean
                gap = values[part] - np.asarray(truth[key], np.float32)[part]
                errors[label].append(100 * float(np.linalg.norm(gap)))
    finally:
        env.close()
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.auxiliary_estimates",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", required=True)
    parser.add_argument("--store", required=True, help="the store the policy was trained on")
    parser.add_argument("--eval", required=True, help="the output folder of a ditvla eval")
    parser.add_argument("--targets", default="goal", help="ARRAY[:FIRST:END],...")
    parser.add_argument("--tasks", default="", help="comma-separated (default: every task)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")

    from ditvla.contract import load_policy
    from ditvla.datasets.replay_buffer import ReplayBuffer
    from ditvla.datasets.statistics import load_or_compute_stats
    from ditvla.envs.evaluation_runs import read_episodes
    from ditvla.envs.registry import SUITES

    policy = load_policy(args.policy)
    if policy.auxiliary is None:
        parser.error(f"{args.policy} has no auxiliary head (trained without --auxiliary)")
    targets = parse_targets(args.targets)
    unknown = {key for _, key, _ in targets} - set(policy.config.auxiliary_keys)
    if unknown:
        parser.error(
            f"the policy estimates {', '.join(policy.config.auxiliary_keys)}, "
            f"not {', '.join(sorted(unknown))}"
        )
    columns = estimate_columns(policy, load_or_compute_stats(ReplayBuffer.open(args.store)))
    run = json.loads((Path(args.eval) / "run.json").read_text())
    suite = SUITES[run["suite"]]
    outcomes: dict[str, dict[int, bool]] = {}
    for episode in read_episodes(Path(args.eval)):
        outcomes.setdefault(episode.task, {})[episode.seed] = episode.success
    tasks = args.tasks.split(",") if args.tasks else list(outcomes)
    pooled = {label: {True: [], False: []} for label, _, _ in targets}
    for task in tasks:
        seeds = sorted(outcomes[task])
        errors = first_frame_errors(policy, suite, task, seeds, columns, targets)
        for label, values in errors.items():
            by_outcome = {True: [], False: []}
            for seed, error in zip(seeds, values, strict=True):
                by_outcome[outcomes[task][seed]].append(error)
                pooled[label][outcomes[task][seed]].append(error)
            print(f"{task} {label}: {summary(by_outcome)}", flush=True)
    parts = [f"{label} {summary(by_outcome)}" for label, by_outcome in pooled.items()]
    print(f"auxiliary estimates at the first frame: {'; '.join(parts)}")


def summary(by_outcome: dict[bool, list[float]]) -> str:
    def median(values: list[float]) -> str:
        return f"{np.median(values):.1f} cm ({len(values)})" if values else "none"

    return (
        f"median {median(by_outcome[True])} where the episode succeeded, "
        f"{median(by_outcome[False])} where it failed"
    )


if __name__ == "__main__":
    main()

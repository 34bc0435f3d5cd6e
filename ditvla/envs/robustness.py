"""A policy's perturbation profile: its success unperturbed and under each axis of
:mod:`ditvla.envs.perturbations` at one level, on the same episodes and noise
(``ditvla demo --robustness``, ``bench/robustness.py``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ditvla.envs.evaluate import EvalConfig, EvaluationReport, evaluate, wilson_interval
from ditvla.envs.perturbations import AXES, Perturbation, check_policy_reads
from ditvla.errors import ConfigError

MODERATE = "medium"


def robustness_profile(
    policy: Any,
    env: str,
    config: EvalConfig,
    *,
    axes: tuple[str, ...] = tuple(AXES),
    level: str = MODERATE,
    out: Path | None = None,
    unperturbed: EvaluationReport | None = None,
) -> dict[str, EvaluationReport]:
    """Reports by perturbation ("" unperturbed, then ``"axis=level"`` for each axis the
    policy reads: a policy without cameras skips the camera axes), each on the episodes of
    ``config`` (its own perturbation ignored); ``unperturbed``: a run of the same episodes
    already made, reused. ``out``: a folder per perturbation."""
    spec = policy.spec
    arms = [""]
    for axis in axes:
        try:
            check_policy_reads(Perturbation.parse(f"{axis}={level}"), spec.cameras, spec.state_dim)
        except ConfigError:
            continue
        arms.append(f"{axis}={level}")
    reports = {"": unperturbed} if unperturbed is not None else {}
    for arm in arms:
        if arm in reports:
            continue
        folder = None if out is None else Path(out) / (arm.replace("=", "_") or "unperturbed")
        episodes = replace(config, perturb=arm, rewordings="")
        reports[arm] = evaluate(policy, env, episodes, out=folder)
    return reports


def success(report: EvaluationReport, tasks: list[str] | None = None) -> tuple[int, int]:
    """(successes, episodes) over ``tasks`` (all when None)."""
    episodes = [e for e in report.episodes if tasks is None or e.task in tasks]
    return sum(e.success for e in episodes), len(episodes)


def profile_markdown(reports: dict[str, EvaluationReport], tasks: list[str] | None = None) -> str:
    """The profile as a table: success with its 95% interval and the change from
    unperturbed, over ``tasks`` (all when None; "" when none of them was evaluated)."""
    wins, n = success(reports[""], tasks)
    if n == 0:
        return ""
    rows = [
        "| perturbation | success | 95% interval | vs unperturbed |",
        "|---|---|---|---|",
    ]
    for arm, report in reports.items():
        arm_wins, arm_n = success(report, tasks)
        lo, hi = wilson_interval(arm_wins, arm_n)
        change = (arm_wins / arm_n - wins / n) * 100 if arm else 0.0
        rows.append(
            f"| {arm or 'none'} | {arm_wins / arm_n:.1%} | {lo:.0%}-{hi:.0%} | "
            + (f"{change:+.1f} points |" if arm else "|")
        )
    return "\n".join(rows)

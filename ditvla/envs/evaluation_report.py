"""What an evaluation reports: episodes, success rates with their 95% intervals, and what
the policy read.

Every success rate is published with its Wilson score interval and the observation it
came from (cameras, state keys, whether the state held privileged simulator state, any
probe), so that no figure travels without saying what it measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int
    error: str | None = None


@dataclass
class EvaluationReport:
    """Episodes, and what the policy read: ``observation`` = {"cameras", "state_keys",
    "privileged_state", "probe", "perturb"} (every report says which state the policy
    read, and what was perturbed)."""

    episodes: list[EpisodeResult] = field(default_factory=list)
    seconds: float = 0.0
    observation: dict[str, Any] = field(default_factory=dict)

    def per_task(self) -> dict[str, dict[str, Any]]:
        tasks: dict[str, list[EpisodeResult]] = {}
        for e in self.episodes:
            tasks.setdefault(e.task, []).append(e)
        out = {}
        for task, eps in tasks.items():
            wins = sum(e.success for e in eps)
            lo, hi = wilson_interval(wins, len(eps))
            out[task] = {
                "success_rate": wins / len(eps),
                "episodes": len(eps),
                "ci95": [round(lo, 4), round(hi, 4)],
                "mean_length": float(np.mean([e.steps for e in eps])),
                "errors": sum(e.error is not None for e in eps),
            }
        return out

    def summary(self) -> dict[str, Any]:
        tasks = self.per_task()
        mean = float(np.mean([t["success_rate"] for t in tasks.values()])) if tasks else 0.0
        return {
            "tasks": tasks,
            "mean_success": mean,
            "observation": self.observation,
            "seconds": round(self.seconds, 1),
        }

    def markdown(self) -> str:
        rows = [
            "| task | success | 95% interval | episodes | mean length |",
            "|---|---|---|---|---|",
        ]
        for task, t in self.per_task().items():
            rows.append(
                f"| {task} | {t['success_rate']:.0%} | {t['ci95'][0]:.0%}-{t['ci95'][1]:.0%} | "
                f"{t['episodes']} | {t['mean_length']:.0f} |"
            )
        rows.append(f"| **mean** | **{self.summary()['mean_success']:.1%}** | | | |")
        return "\n".join([*rows, "", f"The policy read: {describe_observation(self.observation)}."])


def describe_observation(observation: dict[str, Any]) -> str:
    """``cameras corner (64 px), state proprio (proprioception only), instruction``."""
    if not observation:
        return "unknown"
    cameras = ", ".join(observation["cameras"]) or "no camera"
    state = " + ".join(observation["state_keys"]) or "no state"
    kind = (
        "with privileged simulator state"
        if observation["privileged_state"]
        else ("proprioception only")
    )
    probe, perturb = observation.get("probe", "none"), observation.get("perturb", "")
    return (
        f"cameras {cameras}, state {state} ({kind}), instruction"
        + (f"; probe: {probe.replace('_', ' ')}" if probe != "none" else "")
        + (f"; perturbed: {perturb}" if perturb else "")
        + (f"; {steps} actions per chunk" if (steps := observation.get("action_steps")) else "")
        + ("; chunks merged by real-time chunking" if observation.get("merge") == "rtc" else "")
    )

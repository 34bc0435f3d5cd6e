"""Simulator throughput: env steps/s with two 128x128 cameras, and evaluator episodes/min.

- Each simulator through our environments (random actions, the fast render settings: no
  shadows, reflections or multisampling): Meta-World drawer-close-v3 (corner +
  gripperPOV), the four robosuite tasks and a task of each LIBERO suite (agentview + wrist
  camera); also without images. robosuite Lift with robosuite's own default rendering,
  for comparison.
- `ditvla eval` with Meta-World's experts on MT10-style episodes that render both cameras
  every step (the worst case: a policy reading images at every step), 1 and 2 workers.

    python -m bench.env_throughput [--steps 200] [--episodes 10]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def env_steps(spec: str, steps: int, cameras: tuple[str, ...]) -> float:
    """Random-action steps/s of one task through our env (fast rendering, 128x128)."""
    from ditvla.envs.registry import parse_env

    suite, (task,) = parse_env(spec)
    env = suite.make(task, cameras=cameras, image_size=128, max_episode_steps=10**6)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, suite.action_dim).astype(np.float32))
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def robosuite_default_rendering_steps(steps: int) -> float:
    """robosuite's own camera observations with its default rendering, for comparison."""
    import robosuite

    env = robosuite.make(
        "Lift",
        robots="Panda",
        has_renderer=False,
        has_offscreen_renderer=True,
        use_camera_obs=True,
        camera_names=["agentview", "robot0_eye_in_hand"],
        camera_heights=128,
        camera_widths=128,
    )
    env.reset()
    rng = np.random.default_rng(0)
    low, high = env.action_spec
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(low, high))
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def expert_reading_cameras():
    """Meta-World's experts, declared as reading two 128 px cameras at every step."""
    from ditvla.envs.baselines import ExpertPolicy

    expert = ExpertPolicy()
    expert.cameras = ("corner", "gripperPOV")
    expert.image_size = 128
    return expert


def evaluator_rate(episodes: int, workers: int) -> float:
    from ditvla.envs.evaluate import evaluate

    start = time.perf_counter()
    evaluate(
        expert_reading_cameras(),
        "metaworld:reach-v3,drawer-close-v3,button-press-topdown-v3",
        episodes_per_task=episodes,
        workers=workers,
        videos_per_task=0,
        progress=False,
    )
    return 3 * episodes / ((time.perf_counter() - start) / 60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.env_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--episodes", type=int, default=10, help="per task, 3 tasks")
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    metaworld_cams = ("corner", "gripperPOV")
    two_cams = "2 cameras 128x128, fast rendering"
    print(
        f"metaworld drawer-close, {two_cams}: {env_steps('metaworld:drawer-close-v3', args.steps, metaworld_cams):.1f} steps/s"
    )
    print(
        f"metaworld drawer-close, no images: {env_steps('metaworld:drawer-close-v3', args.steps * 10, ()):.0f} steps/s"
    )
    robosuite_cams = ("agentview", "robot0_eye_in_hand")
    print(
        f"robosuite Lift, 2 cameras 128x128, robosuite's default rendering: {robosuite_default_rendering_steps(args.steps):.1f} steps/s"
    )
    for task in ("Lift", "Stack", "PickPlaceCan", "NutAssemblySquare"):
        print(
            f"robosuite {task}, {two_cams}: {env_steps(f'robosuite:{task}', args.steps, robosuite_cams):.1f} steps/s"
        )
    print(
        f"robosuite Lift, no images: {env_steps('robosuite:Lift', args.steps * 2, ()):.0f} steps/s"
    )
    libero_cams = ("agentview", "eye_in_hand")
    for suite in ("spatial", "object", "goal", "10", "90"):
        print(
            f"libero {suite}/0, {two_cams}: {env_steps(f'libero:{suite}/0', args.steps // 2, libero_cams):.1f} steps/s"
        )
    print(f"libero goal/0, no images: {env_steps('libero:goal/0', args.steps, ()):.0f} steps/s")
    for workers in (1, 2):
        rate = evaluator_rate(args.episodes, workers)
        print(
            f"evaluator, metaworld experts reading 2 cameras every step, {workers} worker(s): {rate:.1f} episodes/min"
        )


if __name__ == "__main__":
    main()

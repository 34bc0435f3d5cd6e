"""Simulator throughput: env steps/s with two 128x128 cameras, and evaluator episodes/min.

- Meta-World (drawer-close-v3) through MetaWorldEnv: cameras corner + gripperPOV, the
  fast render settings; also without images.
- robosuite 1.5 (Lift, Panda, OSC pose control) with agentview + robot0_eye_in_hand, with
  robosuite's default rendering and with the fast settings (no shadows, reflections,
  multisampling).
- `ditvla eval` with Meta-World's experts on MT10-style episodes that render both cameras
  every step (the worst case: a policy reading images at every step), 1 and 2 workers.

    python bench/env_throughput.py [--steps 200] [--episodes 10]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def metaworld_steps(steps: int, cameras: tuple[str, ...]) -> float:
    from ditvla.envs.metaworld_env import MetaWorldEnv

    env = MetaWorldEnv("drawer-close-v3", cameras=cameras, image_size=128, max_episode_steps=10**6)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, 4).astype(np.float32))
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def robosuite_steps(steps: int, fast: bool) -> float:
    import mujoco
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
        renderer_config=None,
    )
    env.reset()
    if fast:  # robosuite made its GL context already: remake it with the cheap settings
        model = env.sim.model._model
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        context = env.sim._render_context_offscreen
        context.con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            context.scn.flags[flag] = 0
    rng = np.random.default_rng(0)
    low, high = env.action_spec
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(low, high))
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


class ExpertReadingCameras:
    """Meta-World's experts, declared as reading two 128 px cameras at every step."""

    cameras = ("corner", "gripperPOV")
    image_size = 128
    n_action_steps = 1

    def __init__(self):
        from ditvla.envs.evaluate import ExpertPolicy

        self._expert = ExpertPolicy()

    def predict_action_chunk(self, observation):
        return self._expert.predict_action_chunk(observation)


def evaluator_rate(episodes: int, workers: int) -> float:
    from ditvla.envs.evaluate import evaluate

    start = time.perf_counter()
    evaluate(
        ExpertReadingCameras(),
        "metaworld:reach-v3,drawer-close-v3,button-press-topdown-v3",
        episodes_per_task=episodes,
        workers=workers,
        videos_per_task=0,
        progress=False,
    )
    return 3 * episodes / ((time.perf_counter() - start) / 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--episodes", type=int, default=10, help="per task, 3 tasks")
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    cams = ("corner", "gripperPOV")
    print(f"metaworld drawer-close, 2 cameras 128x128: {metaworld_steps(args.steps, cams):.1f} steps/s")
    print(f"metaworld drawer-close, no images: {metaworld_steps(args.steps * 10, ()):.0f} steps/s")
    print(f"robosuite Lift, 2 cameras 128x128, default rendering: {robosuite_steps(args.steps, False):.1f} steps/s")
    print(f"robosuite Lift, 2 cameras 128x128, fast rendering: {robosuite_steps(args.steps, True):.1f} steps/s")
    for workers in (1, 2):
        rate = evaluator_rate(args.episodes, workers)
        print(f"evaluator, metaworld experts reading 2 cameras every step, {workers} worker(s): {rate:.1f} episodes/min")


if __name__ == "__main__":
    main()

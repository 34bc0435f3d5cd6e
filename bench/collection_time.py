"""Where the demo's collection spends its time: its seven tasks, a few detour episodes each,
in this one process under cProfile, split into rendering the cameras, the physics, the
scripted expert and the rest.

    python -m bench.collection_time [--episodes 4]

Last line: ``collection: <ms> ms per step; rendering <r>%, physics <p>%, expert <e>%,
other <o>% (<renderer>)``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

# the profile's built-in functions whose own time is each part's
PARTS = {
    "rendering": (
        "<built-in method mujoco._render.mjr_render>",
        "<built-in method mujoco._render.mjr_readPixels>",
        "<built-in method mujoco._functions.mjv_updateScene>",
    ),
    "physics": ("<built-in method mujoco._functions.mj_step>",),
}


def _renderer() -> str:
    try:
        from OpenGL import GL

        return GL.glGetString(GL.GL_RENDERER).decode()
    except Exception as error:  # no current context: say why, the figures stand
        return f"renderer unknown: {type(error).__name__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.collection_time",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--episodes", type=int, default=4, help="episodes per task")
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from ditvla.demo import DEMO_CAMERAS, DEMO_TASKS, FULL
    from ditvla.envs.collect import run_expert_episode
    from ditvla.envs.registry import SUITES

    envs = {
        task: SUITES["metaworld"].make(
            task, cameras=DEMO_CAMERAS, image_size=FULL.collect.image_size
        )
        for task in DEMO_TASKS
    }
    for env in envs.values():  # the first frame makes the GL context: not timed
        env.reset(seed=0)
        env.render_camera(DEMO_CAMERAS[0])
    profile, steps = cProfile.Profile(), 0
    start = time.perf_counter()
    profile.enable()
    for env in envs.values():
        for seed in range(args.episodes):
            episode, _ = run_expert_episode(env, seed, FULL.collect.episode_options)
            steps += len(episode["action"])
    profile.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tottime, cumtime, ..)}
    own = {name: row[2] for (_, _, name), row in stats.items()}
    shares = {part: sum(own.get(name, 0.0) for name in names) for part, names in PARTS.items()}
    shares["expert"] = sum(  # its whole time, Meta-World's policy included
        row[3] for (_, _, name), row in stats.items() if name == "expert_action"
    )
    total = sum(row[2] for row in stats.values())
    shares["other"] = max(0.0, total - sum(shares.values()))
    print(
        f"{len(envs)} tasks x {args.episodes} episodes: {steps} steps in {seconds:.1f} s "
        f"({total:.1f} s profiled), cameras {', '.join(DEMO_CAMERAS)} at "
        f"{FULL.collect.image_size} px"
    )
    for part, value in shares.items():
        print(f"  {part:10s} {value:6.2f} s  {100 * value / total:5.1f}%")
    print(
        f"collection: {1e3 * seconds / steps:.2f} ms per step; "
        + ", ".join(f"{part} {100 * value / total:.0f}%" for part, value in shares.items())
        + f" ({_renderer()})"
    )


if __name__ == "__main__":
    main()

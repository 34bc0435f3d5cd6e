"""Where a LIBERO pick-and-place policy's episodes fail: the grasp, the object or the place.

Runs a saved policy on LIBERO init states, one episode at a time, and records for each:
the instructed object (the goal's first predicate), how close the hand came to the point
the scripted expert grasps it at (the middle of its box, or ``neck`` below the top of a
tall one), where the hand was each time the policy's gripper command turned from open to
closed, how high the instructed object and every other object rose, success and length.
The policy acts as ``ditvla eval`` has it act (its own chunk, ``--action-steps`` of each,
each episode's initial noise drawn from its seed).

    python -m bench.libero_grasps --policy DIR [--suite object] [--tasks 0,1,...]
        [--inits 0,1,2] [--action-steps 4] [--out grasps.jsonl]

One JSON line per episode, then a summary: the failures that never lifted the instructed
object (the grasp), that lifted another (the object), that lifted it and still failed
(the place), and the median distance from the grasp point at the first closing, in
successes and failures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

LIFTED = 0.05  # an object this far above where it started was lifted (metres)


def _indices(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def episode(env, policy, seed: int, action_steps: int) -> dict:
    """One episode of ``policy`` on ``env`` from ``seed``: what :func:`main` reports."""
    import numpy as np
    import torch

    from ditvla.envs.evaluate import policy_batch
    from ditvla.envs.libero_experts import body_geoms, geoms_box, middle_grasp

    obs, _ = env.reset(seed=seed)
    domain, spec = env._env.env, policy.spec
    moved = domain.parsed_problem["goal_state"][0][1]
    geoms = {name: body_geoms(domain.sim.model, body) for name, body in domain.obj_body_id.items()}
    boxes = {name: geoms_box(domain.sim, *g) for name, g in geoms.items()}  # as they are now
    bottom = {name: low[2] for name, (low, _) in boxes.items()}
    rose = dict.fromkeys(geoms, 0.0)
    noise = torch.Generator().manual_seed(seed)
    closest, closings, gripper, queue, steps = np.inf, [], -1.0, [], 0
    success = truncated = False
    while not (success or truncated):
        if not queue:
            batch = policy_batch([obs], [(env.task, seed)], spec.cameras, "none", {})
            options = {}
            if spec.noise_shape is not None:
                options["noise"] = torch.randn(spec.noise_shape, generator=noise)[None]
            with torch.inference_mode():
                chunk = policy.predict_action_chunk(batch, **options)
            queue = list(torch.as_tensor(chunk).float().numpy()[0][:action_steps])
        action = queue.pop(0)
        grasp = middle_grasp(*boxes[moved])
        distance = float(np.linalg.norm(env._raw["robot0_eef_pos"] - grasp))
        closest = min(closest, distance)
        if action[6] > 0 >= gripper:
            closings.append(round(distance, 3))
        gripper = float(action[6])
        obs, _, success, truncated, _ = env.step(action, render=not queue)
        steps += 1
        boxes = {name: geoms_box(domain.sim, *g) for name, g in geoms.items()}
        for name, (low, _) in boxes.items():
            rose[name] = max(rose[name], float(low[2] - bottom[name]))
    others = {name: round(h, 3) for name, h in rose.items() if name != moved and h > LIFTED}
    return {
        "task": env.task,
        "seed": seed,
        "success": bool(success),
        "steps": steps,
        "object": moved,
        "closest": round(closest, 3),
        "closings": closings,
        "object_rose": round(rose[moved], 3),
        "others_lifted": others,
    }


def summary(rows: list[dict]) -> str:
    failed = [r for r in rows if not r["success"]]
    lifted = [r for r in failed if r["object_rose"] > LIFTED]

    def first_closing(group: list[dict]) -> str:
        firsts = [r["closings"][0] for r in group if r["closings"]]
        return f"{100 * statistics.median(firsts):.1f} cm" if firsts else "-"

    return (
        f"{len(rows) - len(failed)} of {len(rows)} succeeded; of the {len(failed)} failures, "
        f"{sum(not r['others_lifted'] and r['object_rose'] <= LIFTED for r in failed)} never "
        f"lifted the instructed object, {sum(bool(r['others_lifted']) for r in failed)} "
        f"lifted another, {len(lifted)} lifted it and failed later; first closing from the "
        f"grasp point: {first_closing([r for r in rows if r['success']])} (successes), "
        f"{first_closing(failed)} (failures)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.libero_grasps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", required=True, help="a saved policy folder")
    parser.add_argument("--suite", default="object", choices=("object", "spatial", "goal"))
    parser.add_argument("--tasks", default="0,1,2,3,4,5,6,7,8,9", help="task indices")
    parser.add_argument("--inits", default="0,1,2", help="init state indices")
    parser.add_argument("--action-steps", type=int, default=4, help="actions per chunk")
    parser.add_argument("--out", default="", help="also write the JSON lines here")
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from ditvla.contract import load_policy
    from ditvla.envs.libero_env import EVAL_SEED_START, LiberoEnv

    policy = load_policy(args.policy)
    rows = []
    for task in _indices(args.tasks):
        spec = policy.spec
        env = LiberoEnv(
            f"libero_{args.suite}/{task}", cameras=spec.cameras, image_size=spec.image_size
        )
        try:
            for init in _indices(args.inits):
                rows.append(episode(env, policy, EVAL_SEED_START + init, args.action_steps))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            env.close()
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(summary(rows))


if __name__ == "__main__":
    main()

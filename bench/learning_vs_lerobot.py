"""Learning efficiency: ditvla's demo policy against LeRobot's DiffusionPolicy, same data,
same wall-clock training budget, same evaluation episodes.

1. data: the demo's demonstrations (five Meta-World tasks, 50 scripted episodes each,
   64x64 corner camera + 39-D state), collected here or reused with ``--store``;
2. ditvla: the demo's training run (``ditvla.demo.FULL``: tiny preset, batch 32, lr 1e-3,
   its step count); its wall-clock time is the budget;
3. LeRobot: the store converted with ``ditvla convert to-lerobot`` (PNG frames, lossless),
   ``DiffusionPolicy`` with its default config and no pretrained backbone weights, trained
   with lerobot's own optimizer and scheduler presets, processors and batch size (8, the
   default of ``lerobot-train``) until the same wall-clock budget is spent;
4. both evaluated by ``ditvla eval``'s evaluator on the same seeds (100000 up).

On a CPU the default DiffusionPolicy (265M parameters, 254M in its 1-D U-Net; 100 DDPM
denoising steps) is slow to evaluate: ``--lerobot-inference-steps`` lowers its denoising
steps at evaluation (training is unchanged), ``--eval-episodes`` the episodes.

DiffusionPolicy reads no instruction: across the five tasks it tells them apart by the
state (Meta-World's state includes the goal position) and the image only.

    python bench/learning_vs_lerobot.py [--store demos.zarr] [--eval-episodes 50]

Last line: ``mean success: ditvla <x> vs lerobot diffusion <y>``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


class LeRobotAdapter:
    """A trained LeRobot policy behind the evaluator's policy API, with its observation
    history kept per episode (the evaluator names each row's task and seed)."""

    def __init__(self, policy, preprocessor, postprocessor, camera: str, n_action_steps: int):
        from ditvla.contract import PolicySpec

        self.policy = policy.eval()
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.camera = camera
        config = policy.config
        self.spec = PolicySpec(
            cameras=(camera,),
            image_size=config.input_features[f"observation.images.{camera}"].shape[-1],
            state_dim=config.input_features["observation.state"].shape[0],
            action_dim=config.output_features["action"].shape[0],
            horizon=config.horizon,
            n_action_steps=n_action_steps,
        )
        self.n_obs_steps = config.n_obs_steps
        self._history: dict[tuple[str, int], deque] = {}

    def reset(self) -> None:
        self._history.clear()

    def predict_action_chunk(self, observation, **_):
        images, states = [], []
        for i, key in enumerate(zip(observation["task"], observation["seed"], strict=True)):
            history = self._history.setdefault(key, deque(maxlen=self.n_obs_steps))
            frame = torch.from_numpy(observation["images"][self.camera][i]).permute(2, 0, 1)
            history.append((frame.float() / 255.0, torch.from_numpy(observation["state"][i])))
            while len(history) < self.n_obs_steps:  # the first step repeats (as lerobot pads)
                history.appendleft(history[0])
            images.append(torch.stack([h[0] for h in history]))
            states.append(torch.stack([h[1] for h in history]))
        batch = {
            f"observation.images.{self.camera}": torch.stack(images),
            "observation.state": torch.stack(states),
        }
        self.policy.reset()  # empty queues: predict_action_chunk uses the given history
        actions = self.policy.predict_action_chunk(self.preprocessor(batch))
        return self.postprocessor(actions)


def train_lerobot(
    store: Path, root: Path, budget_s: float, inference_steps: int | None = None, seed: int = 0
):
    from lerobot.configs.types import FeatureType
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors
    from lerobot.utils.feature_utils import dataset_to_policy_features

    from ditvla.datasets.convert_lerobot import zarr_to_lerobot

    if not root.exists():
        zarr_to_lerobot(store, root, repo_id="bench/demo", use_videos=False)
    meta_dataset = LeRobotDataset("bench/demo", root=root)
    features = dataset_to_policy_features(meta_dataset.meta.features)
    config = DiffusionConfig(
        pretrained_backbone_weights=None,
        num_inference_steps=inference_steps,
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
        device="cpu",
    )
    delta = resolve_delta_timestamps(config, meta_dataset.meta)
    dataset = LeRobotDataset("bench/demo", root=root, delta_timestamps=delta)
    torch.manual_seed(seed)
    policy = DiffusionPolicy(config)
    preprocessor, postprocessor = make_diffusion_pre_post_processors(config, dataset.meta.stats)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=8, shuffle=True, num_workers=1, drop_last=True
    )
    optimizer = config.get_optimizer_preset().build(policy.parameters())
    policy.train()
    start, steps, losses = time.perf_counter(), 0, []
    scheduler = None
    while time.perf_counter() - start < budget_s:
        for batch in loader:
            if time.perf_counter() - start >= budget_s:
                break
            loss, _ = policy.forward(preprocessor(batch))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
            optimizer.step()
            steps += 1
            losses.append(loss.item())
            if steps == 5:  # the cosine schedule spans the steps the budget allows
                per_step = (time.perf_counter() - start) / steps
                total = max(10, int(budget_s / per_step))
                scheduler = config.get_scheduler_preset().build(optimizer, total)
            if scheduler is not None:
                scheduler.step()
    seconds = time.perf_counter() - start
    print(
        f"lerobot diffusion: {steps} steps in {seconds / 60:.1f} min, loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}"
    )
    camera = next(iter(config.image_features)).removeprefix("observation.images.")
    return LeRobotAdapter(policy, preprocessor, postprocessor, camera, config.n_action_steps)


def train_ditvla(store: Path, out: Path) -> tuple[Path, float]:
    from ditvla.demo import FULL
    from ditvla.training.trainer import train

    start = time.perf_counter()
    policy_dir = train(
        replace(
            FULL.train, dataset=str(store), out=str(out / "ditvla"), save_every=FULL.train.steps
        )
    )
    budget = time.perf_counter() - start
    print(f"ditvla: {FULL.train.steps} steps in {budget / 60:.1f} min (the budget)")
    return policy_dir, budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="the demo's demonstrations (collected when missing)")
    parser.add_argument("--out", default="outputs/learning_vs_lerobot")
    parser.add_argument("--eval-episodes", type=int, default=50, help="per task (50)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--lerobot-inference-steps",
        type=int,
        help="DiffusionPolicy's denoising steps at evaluation (default: its config's, 100 "
        "DDPM steps: about 77 s per chunk of 2 on a 2-core CPU)",
    )
    parser.add_argument("--ditvla-policy", help="reuse a policy trained with the demo's settings")
    parser.add_argument("--budget-s", type=float, help="with --ditvla-policy: its training seconds")
    args = parser.parse_args()
    if bool(args.ditvla_policy) != bool(args.budget_s):
        parser.error("--ditvla-policy and --budget-s go together")
    os.environ.setdefault("MUJOCO_GL", "egl")
    from ditvla.contract import load_policy
    from ditvla.demo import FULL
    from ditvla.envs.collect import collect_demonstrations
    from ditvla.envs.evaluate import evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = FULL.env
    store = Path(args.store) if args.store else out / "demos.zarr"
    if not store.exists():
        collect_demonstrations(env, store, FULL.collect)

    if args.ditvla_policy:  # a finished run of the same settings, and what it took
        policy_dir, budget = Path(args.ditvla_policy), args.budget_s
    else:
        policy_dir, budget = train_ditvla(store, out)
    lerobot = train_lerobot(store, out / "lerobot_dataset", budget, args.lerobot_inference_steps)

    results = {}
    for name, policy in (("ditvla", load_policy(str(policy_dir))), ("lerobot diffusion", lerobot)):
        report = evaluate(
            policy,
            env,
            FULL.evaluate,
            episodes_per_task=args.eval_episodes,
            workers=args.workers,
            out=str(out / "eval" / name.replace(" ", "_")),
            videos_per_task=1,
        )
        results[name] = report.summary()
        print(f"{name}:\n{report.markdown()}")
    (out / "results.json").write_text(json.dumps({"budget_s": budget, **results}, indent=2))
    ours, theirs = results["ditvla"]["mean_success"], results["lerobot diffusion"]["mean_success"]
    print(f"mean success: ditvla {ours:.1%} vs lerobot diffusion {theirs:.1%}")


if __name__ == "__main__":
    main()

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

    python -m bench.learning_vs_lerobot [--store demos.zarr] [--eval-episodes 50]

Last line: ``mean success: ditvla <x> vs lerobot diffusion <y>``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.lerobot_adapter import LeRobotAdapter
from bench.lerobot_training import train_for


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

    from ditvla.contract import PolicySpec
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

    def batches():
        while True:
            yield from loader

    train_for(policy, preprocessor, batches(), budget_s, name="lerobot diffusion", seed=seed)
    camera = next(iter(config.image_features)).removeprefix("observation.images.")
    spec = PolicySpec(
        cameras=(camera,),
        image_size=config.input_features[f"observation.images.{camera}"].shape[-1],
        state_dim=config.input_features["observation.state"].shape[0],
        action_dim=config.output_features["action"].shape[0],
        horizon=config.horizon,
        n_action_steps=config.n_action_steps,
    )
    return LeRobotAdapter(policy, preprocessor, postprocessor, spec, reads_task=False)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.learning_vs_lerobot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    args = parser.parse_args(argv)
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

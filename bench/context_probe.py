"""Where a policy loses sight of small things: linear probes of privileged positions.

For frames of a store that records privileged state (Meta-World's ``objects`` and
``goal``), each stage of the policy's backbone is read out by ridge regression (fit on the
first 80% of every task's episodes, scored on the rest), per camera:

- ``pixels``: the frame as the vision encoder receives it (resized to its input side);
  besides the linear probe, ``pixels-cnn`` trains a small convolutional network with a
  spatial-softmax readout on these frames (a nonlinear reader: what the pixels carry);
- ``vision``: the vision encoder's patch features (before pooling);
- ``tokens``: the camera's image tokens after the projector (pixel shuffle + linear);
- ``context``: the camera's tokens in the context, after the language model;
- ``pooled``: the mean of every context token (what the auxiliary head reads).

A target that the pixels carry and a later stage does not is lost at that stage. Scores
are held-out R^2 (1 is perfect, 0 is the mean) and the mean error in centimetres (Meta-World
positions are in metres), averaged over the target's dimensions; a frozen, untrained
backbone (``--untrained``) shows what the architecture keeps before any learning.

    python -m bench.context_probe --policy runs/x/policy --store mt10.zarr \\
        [--targets objects:0:3,goal] [--frames 3000] [--tasks push-v3,pick-place-v3]

Last line: ``context probe: <target> R^2 pixels <a> -> context <b> (<camera>) ...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.privileged_targets import parse_targets

STAGES = ("pixels", "vision", "tokens", "context", "pooled")
TRAIN_SHARE = 0.8


def probe_frames(buffer, frames: int, tasks: set[str] | None, seed: int) -> tuple[list, list]:
    """Frame indices to fit on and to score on: the first 80% of each task's episodes
    against the rest, ``frames`` in all, drawn evenly over the episodes."""
    rng = np.random.default_rng(seed)
    by_task: dict[int, list[int]] = {}
    for episode, task in enumerate(buffer.episode_task_index):
        if tasks is None or buffer.tasks[task].name in tasks:
            by_task.setdefault(int(task), []).append(episode)
    fit, score = [], []
    per_episode = max(1, frames // max(1, sum(len(e) for e in by_task.values())))
    for episodes in by_task.values():
        cut = max(1, int(len(episodes) * TRAIN_SHARE))
        for i, episode in enumerate(episodes):
            start, stop = buffer.episode_bounds(episode)
            picks = rng.choice(np.arange(start, stop), min(per_episode, stop - start), False)
            (fit if i < cut else score).extend(int(p) for p in picks)
    return sorted(fit), sorted(score)


@torch.inference_mode()
def stage_features(policy, images: dict[str, np.ndarray], instructions: list[str]) -> dict:
    """{(stage, camera): (N, features)} for a batch of frames, every stage of the backbone."""
    from ditvla.policies.inputs import image_batch

    backbone, cameras = policy.backbone, policy.config.cameras
    pixels = image_batch(images, cameras, policy.config.image_size)
    n, n_cams = pixels.shape[:2]
    side = backbone.encoder_image_size
    flat = pixels.flatten(0, 1)
    resized = torch.nn.functional.interpolate(
        flat, size=(side, side), mode="bilinear", antialias=True
    )
    vision = backbone.vision_features(flat)
    tokens = backbone.image_tokens(flat)
    ids, mask = backbone.tokenize(instructions, policy.device)
    context, context_mask = backbone(pixels, ids, mask)
    per_camera = tokens.shape[1] + (backbone.keypoint_reader is not None)  # + a keypoint token
    out = {}
    for c, camera in enumerate(cameras):
        rows = slice(c, None, n_cams)
        out["pixels", camera] = resized[rows].reshape(n, -1)
        out["frames", camera] = resized[rows]
        out["vision", camera] = vision[rows].reshape(n, -1)
        out["tokens", camera] = tokens[rows].reshape(n, -1)
        start = c * per_camera  # the image tokens come first, camera by camera
        out["context", camera] = context[:, start : start + per_camera].reshape(n, -1)
    weights = context_mask[..., None].float()
    out["pooled", "all"] = (context * weights).sum(1) / weights.sum(1)
    return {k: v.float().numpy() for k, v in out.items()}


def ridge_r2(x_fit, y_fit, x_score, y_score) -> tuple[float, float]:
    """Held-out R^2 (mean over target dimensions) and mean absolute error of the best of a
    few ridge penalties (chosen on a slice of the fitting frames), in the dual form."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_score = (x_fit - mean) / std, (x_score - mean) / std
    y_mean = y_fit.mean(0)
    cut = int(len(x_fit) * 0.8)
    best = None
    for alpha in (1e-1, 1e0, 1e1, 1e2, 1e3, 1e4):
        prediction = _ridge(x_fit[:cut], y_fit[:cut] - y_mean, x_fit[cut:], alpha) + y_mean
        error = ((prediction - y_fit[cut:]) ** 2).mean()
        if best is None or error < best[0]:
            best = (error, alpha)
    prediction = _ridge(x_fit, y_fit - y_mean, x_score, best[1]) + y_mean
    residual = ((prediction - y_score) ** 2).sum(0)
    total = ((y_score - y_score.mean(0)) ** 2).sum(0) + 1e-12
    return float(np.mean(1 - residual / total)), float(np.abs(prediction - y_score).mean())


def cnn_r2(frames_fit, y_fit, frames_score, y_score, steps: int, seed: int) -> tuple[float, float]:
    """Held-out R^2 and mean absolute error of a small CNN with a spatial-softmax readout
    (keypoints, as Diffusion Policy reads its cameras) trained on (N, 3, S, S) frames."""
    torch.manual_seed(seed)
    mean, std = y_fit.mean(0), y_fit.std(0) + 1e-8
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(32, 16, 3, padding=1),
        SpatialSoftmax(),
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, y_fit.shape[1]),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    x = torch.as_tensor(frames_fit)
    y = torch.as_tensor((y_fit - mean) / std, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(x), (64,), generator=generator)
        loss = ((net(x[rows]) - y[rows]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.inference_mode():
        prediction = net(torch.as_tensor(frames_score)).numpy() * std + mean
    residual = ((prediction - y_score) ** 2).sum(0)
    total = ((y_score - y_score.mean(0)) ** 2).sum(0) + 1e-12
    return float(np.mean(1 - residual / total)), float(np.abs(prediction - y_score).mean())


class SpatialSoftmax(torch.nn.Module):
    """(N, K, H, W) feature maps -> (N, 2K): each map's expected (x, y) under its softmax."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        n, k, h, w = maps.shape
        weights = maps.flatten(2).softmax(-1).view(n, k, h, w)
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1)
        xs = torch.linspace(-1, 1, w).view(1, 1, 1, w)
        return torch.cat([(weights * xs).sum((2, 3)), (weights * ys).sum((2, 3))], dim=1)


def _ridge(x, y, x_new, alpha: float) -> np.ndarray:
    kernel = x @ x.T
    weights = np.linalg.solve(kernel + alpha * x.shape[1] * np.eye(len(x)), y)
    return x_new @ (x.T @ weights)


def collect_features(policy, buffer, frames: list[int], batch: int) -> dict:
    """Every stage's features of ``frames`` (in order)."""
    cameras = policy.config.cameras
    task_of_frame = np.repeat(buffer.episode_task_index, buffer.episode_lengths())
    parts: dict = {}
    for start in range(0, len(frames), batch):
        chunk = np.asarray(frames[start : start + batch])
        images = {cam: buffer.read_frames(cam, chunk) for cam in cameras}
        words = [buffer.tasks[task_of_frame[f]].instruction for f in chunk]
        for key, value in stage_features(policy, images, words).items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(value) for key, value in parts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.context_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", required=True, help="a trained policy folder")
    parser.add_argument("--store", required=True, help="a store with privileged arrays")
    parser.add_argument("--targets", default="objects:0:3,goal", help="ARRAY[:FROM:TO],...")
    parser.add_argument("--frames", type=int, default=3000, help="frames probed in all")
    parser.add_argument("--tasks", default="", help="only these tasks (comma-separated)")
    parser.add_argument("--untrained", action="store_true", help="probe a fresh backbone")
    parser.add_argument("--cnn-steps", type=int, default=600, help="0: no CNN probe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from ditvla.contract import load_policy
    from ditvla.datasets.replay_buffer import ReplayBuffer

    torch.manual_seed(args.seed)
    policy = load_policy(args.policy)
    if args.untrained:
        from ditvla.policies.policy import DiTVLAPolicy

        policy = DiTVLAPolicy(policy.config).eval()
    buffer = ReplayBuffer.open(args.store)
    tasks = {t for t in args.tasks.split(",") if t} or None
    fit, score = probe_frames(buffer, args.frames, tasks, args.seed)
    features = collect_features(policy, buffer, fit + score, batch=32)
    targets = parse_targets(args.targets)
    print(f"{Path(args.policy).name}: {len(fit)} frames to fit, {len(score)} held out")
    print("| target | stage | camera | R^2 | error (cm) |\n|---|---|---|---|---|")
    summary = []
    for label, array, columns in targets:
        values = buffer.read_frames(array, np.asarray(fit + score))[:, columns].astype(np.float64)
        y_fit, y_score = values[: len(fit)], values[len(fit) :]
        scores = {}
        for (stage, camera), x in features.items():
            if stage == "frames":
                if args.cnn_steps:
                    r2, error = cnn_r2(
                        x[: len(fit)], y_fit, x[len(fit) :], y_score, args.cnn_steps, args.seed
                    )
                    print(f"| {label} | pixels-cnn | {camera} | {r2:.3f} | {100 * error:.1f} |")
                continue
            r2, error = ridge_r2(x[: len(fit)], y_fit, x[len(fit) :], y_score)
            scores[stage, camera] = r2
            print(f"| {label} | {stage} | {camera} | {r2:.3f} | {100 * error:.1f} |")
        best = max((c for s, c in scores if s == "pixels"), key=lambda c: scores["pixels", c])
        summary.append(
            f"{label} R^2 pixels {scores['pixels', best]:.2f} -> context "
            f"{scores['context', best]:.2f} ({best}), pooled {scores['pooled', 'all']:.2f}"
        )
    print("context probe: " + "; ".join(summary))


if __name__ == "__main__":
    main()

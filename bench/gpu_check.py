"""CUDA paths, checked on a GPU machine: bf16 training, and action-head latency in fp32,
bf16 and under torch.compile.

    python -m bench.gpu_check [--out DIR]

1. ``ditvla train`` on CUDA (bf16 autocast) over a small synthetic store: the loss must
   fall and stay finite; samples/s is printed.
2. The DiT action head of ``bench.head_latency`` (width 384, 8 blocks, 256 context
   tokens, 10 Euler steps, batch 1): per-chunk latency in fp32, bf16, and fp32 +
   torch.compile of the denoising step.
3. The trained policy's ``encode`` and ``act`` latency on the GPU.
4. Post-training quantization on the GPU: the fbgemm recipe is refused by name; torchao's
   schemes quantize the trained policy on CUDA (calibrated on the store), with ``act``
   latency against the float policy and the relative action error (same noise).
Writes ``gpu_check.json`` in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_store(path: Path) -> None:
    from ditvla.datasets.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.create(path, fps=10, cameras=["cam"], overwrite=True)
    rng = np.random.default_rng(0)
    for e in range(12):
        length = 40
        target = rng.uniform(-1, 1, 7)
        state = np.cumsum(rng.normal(0, 0.05, (length, 8)), axis=0)
        image = np.full((length, 64, 64, 3), 40, np.uint8)
        x = int((target[0] + 1) * 28)
        image[:, :, x : x + 8] = 220
        action = target + 0.1 * state[:, :7]
        buffer.append_episode(
            {"cam": image, "state": state, "action": action},
            task=f"t{e % 3}",
            instruction=f"task number {e % 3}",
        )


def cuda_ms(fn, repeats: int = 30) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def head_latencies() -> dict[str, float]:
    from ditvla.policies.dit_head import ActionHeadConfig, DiTActionHead
    from ditvla.policies.noise_schedules import FlowMatching

    head = (
        DiTActionHead(
            ActionHeadConfig(
                width=384,
                depth=8,
                num_heads=8,
                context_dim=512,
                state_dim=8,
                action_dim=7,
                horizon=16,
            )
        )
        .cuda()
        .eval()
    )
    tokens = torch.randn(1, 256, 512, device="cuda")
    mask = torch.ones(1, 256, dtype=torch.bool, device="cuda")
    state = torch.randn(1, 8, device="cuda")
    noise = torch.randn(1, 16, 7, device="cuda")
    schedule = FlowMatching()
    steps = 10

    def chunk(step_fn):
        @torch.inference_mode()
        def run():
            cache = head.prepare_context(tokens, mask)
            conditions = head.condition_steps(schedule.step_times(steps), state, 1)
            return schedule.sample(lambda x, i: step_fn(x, conditions[i], cache), noise, steps)

        return run

    results = {"fp32_ms": cuda_ms(chunk(head))}

    def bf16_step(x, cond, cache):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return head(x, cond, cache).float()

    results["bf16_autocast_ms"] = cuda_ms(chunk(bf16_step))
    compiled = torch.compile(head)
    start = time.perf_counter()
    chunk(compiled)()
    results["compile_first_call_s"] = time.perf_counter() - start
    results["fp32_compiled_ms"] = cuda_ms(chunk(compiled))
    return results


def quantized_on_cuda(policy, store: Path) -> dict:
    from ditvla.datasets.observations import observations_from_store
    from ditvla.policies.quantization import (
        QuantizationConfig,
        QuantizationError,
        quantize_policy,
        relative_action_error,
    )

    results: dict = {}
    calibration = observations_from_store(store, policy.spec, 16)
    held_out = observations_from_store(store, policy.spec, 16, held_out=True)
    try:
        quantize_policy(policy, QuantizationConfig("w8a8", "fbgemm"), calibration)
        results["fbgemm"] = "accepted on CUDA (expected a refusal)"
    except QuantizationError as exc:
        results["fbgemm"] = f"refused: {exc}"
    obs = held_out[0]
    noise = torch.randn(len(obs["instruction"]), *policy.noise_shape, device="cuda")
    context = policy.encode(obs)
    results["float_act_ms"] = cuda_ms(lambda: policy.act(context, obs["state"], noise=noise))
    for scheme in ("w8a8", "w8", "w4a8"):
        try:
            config = QuantizationConfig(scheme, "torchao")
            model = quantize_policy(policy, config, calibration).model
            q_context = model.encode(obs)
            results[scheme] = {
                "act_ms": cuda_ms(lambda m=model, c=q_context: m.act(c, obs["state"], noise=noise)),
                "relative_action_error": relative_action_error(policy, model, held_out),
            }
        except Exception as exc:  # a scheme without CUDA kernels: record why
            results[scheme] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=".")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs on a GPU machine")
    from ditvla.policies.policy import DiTVLAPolicy
    from ditvla.training.trainer import TrainConfig, train

    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(report)
    work = Path(tempfile.mkdtemp(prefix="ditvla_gpu_"))
    write_store(work / "store.zarr")
    start = time.perf_counter()
    final = train(
        TrainConfig(
            dataset=str(work / "store.zarr"),
            out=str(work / "run"),
            preset="small",
            steps=args.steps,
            batch_size=64,
            warmup_steps=20,
            num_workers=4,
            save_every=100,
            device="cuda",
            progress=False,
            policy_overrides={"horizon": 16},
        )
    )
    train_s = time.perf_counter() - start
    curve = [
        json.loads(line)["loss"]
        for line in (work / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    report["train"] = {
        "steps": len(curve),
        "seconds": round(train_s, 1),
        "samples_per_s": round(len(curve) * 64 / train_s, 1),
        "loss_first10": float(np.mean(curve[:10])),
        "loss_last10": float(np.mean(curve[-10:])),
        "finite": bool(np.all(np.isfinite(curve))),
    }
    print("train (bf16 autocast):", report["train"])
    report["head_384x8_ctx256_10steps"] = head_latencies()
    print("head latency:", report["head_384x8_ctx256_10steps"])
    policy = DiTVLAPolicy.from_pretrained(final, map_location="cuda")
    obs = {
        "images": {"cam": np.zeros((64, 64, 3), np.uint8)},
        "state": np.zeros(8, np.float32),
        "instruction": "task number 1",
    }
    context = policy.encode(obs)
    report["trained_policy"] = {
        "encode_ms": cuda_ms(lambda: policy.encode(obs)),
        "act_ms": cuda_ms(lambda: policy.act(context, obs["state"])),
    }
    print("policy on GPU:", report["trained_policy"])
    report["quantized_on_cuda"] = quantized_on_cuda(policy, work / "store.zarr")
    print("quantized on GPU:", report["quantized_on_cuda"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""What a training run records as it goes: ``metrics.jsonl`` (every step), TensorBoard
scalars and the progress bar (every ``log_every`` steps, with samples per second).

Only the main process writes. A resumed run drops the lines past its checkpoint from
``metrics.jsonl`` and purges TensorBoard's, so the curve reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILE, TENSORBOARD_DIR = "metrics.jsonl", "tensorboard"


class TrainingLog:
    def __init__(
        self,
        out: Path,
        *,
        total_steps: int,
        start_step: int,
        log_every: int,
        enabled: bool,
        progress: bool,
    ):
        self.total_steps, self.log_every, self.enabled = total_steps, log_every, enabled
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not (progress and enabled),
        )
        self._window_start, self._window_samples = time.perf_counter(), 0
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=start_step or None)
        metrics_path = out / METRICS_FILE
        if start_step and metrics_path.exists():  # drop lines past the checkpoint
            lines = [
                line
                for line in metrics_path.read_text().splitlines()
                if json.loads(line)["step"] <= start_step
            ]
            metrics_path.write_text("".join(line + "\n" for line in lines))
        self.metrics_file = metrics_path.open("a")

    def record(self, step: int, samples: int, record: dict[str, Any]) -> None:
        """Step ``step`` (1-based) done, on ``samples`` samples, with its metrics."""
        self._window_samples += samples
        if self.enabled:
            self.metrics_file.write(json.dumps({"step": step, **record}) + "\n")
            if step % self.log_every == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - self._window_start
                rate = self._window_samples / max(elapsed, 1e-9)
                self._window_start, self._window_samples = time.perf_counter(), 0
                for key, value in record.items():
                    self.writer.add_scalar(f"train/{key}", value, step)
                self.writer.add_scalar("train/samples_per_s", rate, step)
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{rate:.0f}")
                self.metrics_file.flush()
        self.bar.update()

    def flush(self) -> None:
        """Make the curve so far survive a crash (before a checkpoint)."""
        if self.enabled:
            self.metrics_file.flush()

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.metrics_file.close()
            self.writer.close()

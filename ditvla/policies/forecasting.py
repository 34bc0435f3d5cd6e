"""Training-free feature forecasting across denoising steps (TaylorSeer).

Neighbouring denoising steps compute nearly the same features. TaylorSeer ("From Reusing
to Forecasting", Liu et al. 2025) runs the network at some steps, keeps a Taylor series
of a feature in the denoising time (its value and finite-difference derivatives at the
last full steps) and, at the other steps, forecasts the feature instead of computing it.
Here the forecast feature is the last block's output of the action head (what the final,
time-modulated layer reads), so a forecast step costs the embedding and the final layer.

- ``taylor``: the first ``warmup`` steps and every ``interval``-th step after run every
  block; the steps between are forecast.
- ``gated``: every step runs the first block and compares its output with that block's own
  forecast; when the relative error is below ``threshold`` the rest is forecast, else
  computed (the confidence gate of "Forecasting When to Forecast").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ditvla.errors import ConfigError

ForecastMode = Literal["off", "taylor", "gated"]
FORECAST_MODES = ("off", "taylor", "gated")


@dataclass
class ForecastConfig:
    """Feature forecasting in the sampler (see :mod:`ditvla.policies.forecasting`).

    Args:
        mode: off, taylor (a fixed plan of full and forecast steps) or gated (forecast
            when the first block agrees with its forecast).
        interval: taylor: a full step every this many steps after the warm-up.
        order: the Taylor series' order (1: value + first derivative).
        warmup: the first steps always run every block (they seed the series).
        threshold: gated: the largest relative error of the first block's forecast at
            which the rest is forecast.
    """

    mode: ForecastMode = "off"
    interval: int = 2
    order: int = 1
    warmup: int = 2
    threshold: float = 0.05

    def __post_init__(self) -> None:
        if self.mode not in FORECAST_MODES:
            raise ConfigError(
                f"forecast mode {self.mode!r} is not one of {', '.join(FORECAST_MODES)}"
            )
        if self.interval < 2:
            raise ConfigError(
                f"forecast interval must be >= 2 (1 forecasts nothing), got {self.interval}"
            )
        if not 1 <= self.order <= 3:
            raise ConfigError(f"forecast order must be 1, 2 or 3, got {self.order}")
        if self.warmup < self.order + 1:
            raise ConfigError(
                f"forecast warmup must be >= order + 1 ({self.order + 1}): a series of order "
                f"{self.order} needs that many full steps, got {self.warmup}"
            )
        if self.threshold <= 0:
            raise ConfigError(f"forecast threshold must be > 0, got {self.threshold}")


class TaylorSeries:
    """A feature's value and divided-difference derivatives at its last update."""

    def __init__(self, order: int):
        self.order = order
        self.terms: list[torch.Tensor] = []
        self.time: float | None = None
        self.dtype = torch.float32

    def update(self, value: torch.Tensor, time: float) -> None:
        # differences in float32 whatever the head computes in: a bfloat16 difference of
        # two close features divided by a small dt would be mostly rounding
        self.dtype = value.dtype
        terms = [value.float()]
        if self.time is not None and time != self.time:
            dt = time - self.time
            for i in range(min(self.order, len(self.terms))):
                terms.append((terms[i] - self.terms[i]) / dt)
        self.terms, self.time = terms, time

    def forecast(self, time: float) -> torch.Tensor:
        dt = time - self.time
        out = self.terms[0]
        for i, term in enumerate(self.terms[1:], start=1):
            out = out + term * (dt**i / math.factorial(i))
        return out.to(self.dtype)


RunBlocks = Callable[[torch.Tensor, int, int], torch.Tensor]


class Forecaster:
    """One chunk's forecasting state: which steps run the blocks, and the series."""

    def __init__(self, config: ForecastConfig, times: torch.Tensor, depth: int):
        self.config, self.times, self.depth = config, [float(t) for t in times], depth
        self.output = TaylorSeries(config.order)
        self.first = TaylorSeries(config.order)
        self.step = 0
        self.full_steps = 0
        self.forecast_steps = 0

    def run(self, x: torch.Tensor, run_blocks: RunBlocks) -> torch.Tensor:
        """The last block's output for this step: computed by ``run_blocks(x, start,
        stop)`` (blocks start..stop-1) or forecast."""
        step, config = self.step, self.config
        self.step += 1
        time = self.times[step]
        warm = step >= config.warmup
        if config.mode == "taylor":
            if warm and (step - config.warmup + 1) % config.interval:
                self.forecast_steps += 1
                return self.output.forecast(time)
            out = run_blocks(x, 0, self.depth)
            self.output.update(out, time)
            self.full_steps += 1
            return out
        first = run_blocks(x, 0, 1)
        if warm:
            predicted = self.first.forecast(time)
            error = (first - predicted).norm() / first.norm().clamp(min=1e-12)
            if float(error) < config.threshold:
                self.forecast_steps += 1
                return self.output.forecast(time)
        out = run_blocks(first, 1, self.depth)
        self.first.update(first, time)
        self.output.update(out, time)
        self.full_steps += 1
        return out

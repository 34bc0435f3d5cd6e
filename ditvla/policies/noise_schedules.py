"""Training targets and samplers for the action head: flow matching and DDPM/DDIM.

Both expose the same three calls:

- ``training_example(actions, noise) -> (noisy, time, target)``: what the head is given
  and what it must predict, for a batch of clean action chunks (B, H, A); random draws
  come from torch's global generator, which the trainer seeds and checkpoints;
- ``step_times(num_steps) -> (S,)``: the time of each denoising step, known before
  sampling starts (so a head can prepare its conditioning for all steps at once);
- ``sample(predict, noise, num_steps, guide=None) -> actions``: denoise from pure noise,
  calling ``predict(x, step)`` once per step with the step's index into ``step_times``.
  ``guide(x0)``, if given, may move each step's estimate of the clean actions (inpainting:
  real-time chunking pulls the new chunk towards the actions already committed to); the
  step then continues from the moved estimate.

``time`` is a float tensor (B,) in [0, 1] for both (DDPM's integer step k is passed as
k / num_train_timesteps), so the head's timestep embedding does not care which is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ditvla.errors import ConfigError

Predict = Callable[[torch.Tensor, int], torch.Tensor]
Guide = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow as in pi0: ``x_t = t * noise + (1 - t) * action``, the head predicts
    the velocity ``noise - action``; training times follow Beta(alpha, beta) stretched to
    [t_min, 1] (alpha > beta puts more weight on the noisy end); sampling is Euler from
    t = 1 down to 0."""

    beta_alpha: float = 1.5
    beta_beta: float = 1.0
    t_min: float = 0.001

    def training_example(
        self, actions: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = actions.shape[0]
        beta = torch.distributions.Beta(
            torch.full((batch,), self.beta_alpha), torch.full((batch,), self.beta_beta)
        )
        t = beta.sample() * (1 - self.t_min) + self.t_min
        t = t.to(actions.device, actions.dtype)
        tt = t[:, None, None]
        noisy = tt * noise + (1 - tt) * actions
        return noisy, t, noise - actions

    def step_times(self, num_steps: int) -> torch.Tensor:
        return 1.0 - torch.arange(num_steps, dtype=torch.float32) / num_steps

    def sample(
        self, predict: Predict, noise: torch.Tensor, num_steps: int, guide: Guide | None = None
    ) -> torch.Tensor:
        x = noise
        dt = 1.0 / num_steps
        for i in range(num_steps):
            velocity = predict(x, i)
            if guide is not None:  # x_t = x0 + t * velocity: move x0, keep x_t
                t = 1.0 - i * dt
                velocity = (x - guide(x - t * velocity)) / t
            x = x - dt * velocity
        return x


def _cosine_alpha_bars(steps: int) -> torch.Tensor:
    """Improved-DDPM cosine schedule: cumulative signal fractions for k = 1..steps."""
    s = 0.008
    k = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((k + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


@dataclass(frozen=True)
class DDPM:
    """DDPM training (the head predicts the noise, cosine schedule over
    ``num_train_timesteps``) with deterministic DDIM sampling over ``num_steps``."""

    num_train_timesteps: int = 100

    @property
    def alpha_bars(self) -> torch.Tensor:
        return _cosine_alpha_bars(self.num_train_timesteps)

    def training_example(
        self, actions: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = torch.randint(0, self.num_train_timesteps, (actions.shape[0],))
        ab = self.alpha_bars[k].to(actions.device, actions.dtype)[:, None, None]
        noisy = ab.sqrt() * actions + (1 - ab).sqrt() * noise
        t = ((k + 1).float() / self.num_train_timesteps).to(actions.device, actions.dtype)
        return noisy, t, noise

    def _step_indices(self, num_steps: int) -> list[int]:
        return torch.linspace(self.num_train_timesteps - 1, 0, num_steps).round().long().tolist()

    def step_times(self, num_steps: int) -> torch.Tensor:
        ks = torch.tensor(self._step_indices(num_steps), dtype=torch.float32)
        return (ks + 1) / self.num_train_timesteps

    def sample(
        self, predict: Predict, noise: torch.Tensor, num_steps: int, guide: Guide | None = None
    ) -> torch.Tensor:
        alpha_bars = self.alpha_bars.to(noise.device, noise.dtype)
        ks = self._step_indices(num_steps)
        x = noise
        for i, k in enumerate(ks):
            eps = predict(x, i)
            ab = alpha_bars[k]
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            if guide is not None:
                x0 = guide(x0)
                eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            ab_prev = alpha_bars[ks[i + 1]] if i + 1 < len(ks) else torch.ones((), device=x.device)
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return x


NoiseSchedule = FlowMatching | DDPM


Objective = Literal["flow_matching", "ddpm"]


def make_schedule(objective: str, num_train_timesteps: int = 100) -> NoiseSchedule:
    if objective == "flow_matching":
        return FlowMatching()
    if objective == "ddpm":
        return DDPM(num_train_timesteps=num_train_timesteps)
    raise ConfigError(f"unknown objective {objective!r}; expected 'flow_matching' or 'ddpm'")

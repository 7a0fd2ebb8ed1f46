"""The two kinds of sampling step (docs/method.md section 2) and the noise-aware step weights (section 5).

Every function here is pure: tensors and numbers in, tensors out; no step counters. Steps are
computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tempflow.math.flow import _expand, ode_step

__all__ = ["StepOutput", "ode_step", "sde_step", "sde_sigma", "step_std", "gaussian_log_prob", "noise_weights"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """One SDE transition: the next state, its log-probability (B,), the Gaussian's mean and std."""

    sample: torch.Tensor  # (B, ...) x_next
    log_prob: torch.Tensor  # (B,) mean over non-batch dims of the Gaussian log-density
    mean: torch.Tensor  # (B, ...)
    std: torch.Tensor  # () or (B, 1, ...) broadcastable against mean


def sde_sigma(t: torch.Tensor, t_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """sigma_t = a * sqrt(t / (1 - t)); at t = 1 the denominator uses 1 - t_next (no division by zero)."""
    denom = torch.where(t >= 1.0, 1.0 - t_next, 1.0 - t)
    return noise_level * torch.sqrt(t / denom)


def step_std(t: torch.Tensor | float, t_next: torch.Tensor | float, noise_level: float) -> torch.Tensor:
    """Standard deviation sigma_t * sqrt(-dt) of the SDE step from t to t_next."""
    t = torch.as_tensor(t, dtype=torch.float32)
    t_next = torch.as_tensor(t_next, dtype=torch.float32)
    return sde_sigma(t, t_next, noise_level) * torch.sqrt(t - t_next)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std^2), averaged (not summed) over all non-batch dimensions -> (B,).

    The average makes log-probabilities, and so clip ranges such as 1e-4, independent of image size.
    """
    lp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.flatten(1).mean(1) if lp.ndim > 1 else lp


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    noise_level: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prev: torch.Tensor | None = None,
) -> StepOutput:
    """Euler-Maruyama step of Flow-GRPO's reverse SDE (same marginals as the ODE).

    mean = x + dt * [v + sigma_t^2 / (2 t) * (x + (1 - t) v)],  std = sigma_t * sqrt(-dt).
    Give `prev` to score a stored next state instead of drawing one (recomputing log pi).
    With noise_level 0 this is exactly the ODE step.
    """
    xf, vf = x.float(), v.float()
    tt, tn = _expand(t, xf), _expand(t_next, xf)
    dt = tn - tt
    sigma = sde_sigma(tt, tn, noise_level)
    mean = xf + dt * (vf + sigma**2 / (2 * tt) * (xf + (1 - tt) * vf))
    std = sigma * torch.sqrt(-dt)
    if prev is not None:
        sample = prev.float()
    elif noise_level == 0:
        sample = mean
    else:
        if noise is None:
            noise = torch.randn(xf.shape, generator=generator, device=xf.device if generator is None else "cpu")
        sample = mean + std * noise.to(xf.device, torch.float32)
    if noise_level == 0:
        log_prob = torch.zeros(xf.shape[0], device=xf.device)
    else:
        log_prob = gaussian_log_prob(sample, mean, std.expand_as(mean))
    return StepOutput(sample, log_prob, mean, std)


def noise_weights(sigmas: torch.Tensor, noise_level: float, trained_steps: list[int] | torch.Tensor) -> torch.Tensor:
    """w_j = std_j / mean_k std_k over the trained steps (docs/method.md section 5); the weights average 1."""
    steps = torch.as_tensor(trained_steps, dtype=torch.long)
    s = sigmas.to(torch.float32)
    std = step_std(s[steps], s[steps + 1], noise_level)
    return std / std.mean()

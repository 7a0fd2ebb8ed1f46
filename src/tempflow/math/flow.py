"""The one time convention of tempflow (docs/method.md section 1).

t lies in [0, 1]; t = 1 is pure noise and t = 0 is data, as in SD3, FLUX and diffusers:

    x_t = (1 - t) * x0 + t * eps,   eps ~ N(0, I),   velocity target v = eps - x0.

Sampling runs on a grid s_0 = 1 > s_1 > ... > s_T = 0; step j goes from s_j to s_{j+1}.
"""

from __future__ import annotations

import torch


def sigma_grid(num_steps: int, shift: float) -> torch.Tensor:
    """Shifted sigma grid of length ``num_steps + 1``, from 1 down to 0 (float32).

    u = linspace(1, 1/1000, T); s = shift*u / (1 + (shift - 1)*u); then 0 is appended.
    This is the construction of diffusers' FlowMatchEulerDiscreteScheduler with a static shift.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.linspace(1.0, 1.0 / 1000.0, num_steps, dtype=torch.float64)
    s = shift * u / (1.0 + (shift - 1.0) * u)
    return torch.cat([s, s.new_zeros(1)]).to(torch.float32)


def _expand(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-row time (B,) against a batch ``like`` of shape (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t a float or one value per row."""
    t = _expand(t, x0)
    return (1.0 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity d x_t / d t = eps - x0."""
    return eps - x0


def logit_normal_t(
    n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training times t = sigmoid(N(mean, std)), the logit-normal sampling of SD3."""
    z = torch.randn(n, generator=generator) * std + mean
    return torch.sigmoid(z)


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and target velocity."""
    return (v_pred.float() - velocity_target(x0, eps).float()).pow(2).mean()


def ode_step(
    x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float
) -> torch.Tensor:
    """Deterministic Euler step x_next = x + (t_next - t) v, computed in float32."""
    xf = x.float()
    dt = _expand(t_next, xf) - _expand(t, xf)
    return xf + dt * v.float()

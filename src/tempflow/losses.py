"""The clipped surrogate with per-step weights and the KL term (method.md 4.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # () weighted clipped surrogate
    ratio: torch.Tensor  # (N,) pi_theta / pi_old
    clip_frac: torch.Tensor  # () fraction of rows where the clip was active


def policy_loss(
    log_prob: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """mean over rows of w * max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(log pi - log pi_old)."""
    ratio = torch.exp(log_prob - log_prob_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_row = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_row = per_row * weights
    clip_frac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return PolicyLossOutput(per_row.mean(), ratio.detach(), clip_frac.detach())


def kl_loss(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """mean over rows of ||mean - mean_ref||^2 (averaged over dims) / (2 std^2); std is (N,) or scalar."""
    sq = (mean - mean_ref).pow(2).flatten(1).mean(1)  # (N,)
    std = std.reshape(-1) if std.ndim else std
    return (sq / (2 * std**2)).mean()

"""The losses of every algorithm, as pure functions of tensors and numbers (docs/method.md).

- Likelihood-based (Flow-GRPO, TempFlow-GRPO): the clipped surrogate with per-step weights, the KL
  term of two SDE means, and GRPO-Guard's normalised log-ratio.
- Likelihood-free (DiffusionNFT, AWM, TempFlow credit): forward-process losses on clean samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # () weighted clipped surrogate
    ratio: torch.Tensor  # (N,) pi_theta / pi_old
    clip_frac: torch.Tensor  # () fraction of rows where the clip was active


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                      weights: torch.Tensor | None = None) -> PolicyLossOutput:
    """mean over rows of w * max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(log_ratio)."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_row = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_row = per_row * weights
    clip_frac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return PolicyLossOutput(per_row.mean(), ratio.detach(), clip_frac.detach())


def policy_loss(log_prob: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                weights: torch.Tensor | None = None) -> PolicyLossOutput:
    """The clipped surrogate of the ratio pi_theta / pi_old = exp(log_prob - log_prob_old)."""
    return clipped_surrogate(log_prob - log_prob_old, advantages, clip_range, weights)


def kl_loss(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """mean over rows of ||mean - mean_ref||^2 (averaged over dims) / (2 std^2); std is (N,) or scalar."""
    sq = (mean - mean_ref).pow(2).flatten(1).mean(1)  # (N,)
    std = std.reshape(-1) if std.ndim else std
    return (sq / (2 * std**2)).mean()


def guard_log_ratio(sample: torch.Tensor, mean: torch.Tensor, mean_old: torch.Tensor,
                    std: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio (N,): mean over dims of z * (mean - mean_old), z = (sample -
    mean_old) / std the noise the rollout injected. It is the plain log-ratio times the step's std plus
    the squared mean shift over 2 std, which removes the ratio's negative bias and evens the steps."""
    z = (sample - mean_old) / std
    return (z * (mean - mean_old)).flatten(1).mean(1)


# ---- likelihood-free ------------------------------------------------------------------------------------


def nft_reward(advantages: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's optimality probability r = clip(clip(A, -c, c) / c / 2 + 1/2, 0, 1)."""
    return (advantages.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0.0, 1.0)


def normalised_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor, floor: float = 1e-5) -> torch.Tensor:
    """(N,) mean squared error of an x0-prediction divided by its own stop-gradient mean absolute
    error (at least `floor`): each sample's loss is of order one whatever its scale."""
    err = (x0_pred - x0).flatten(1)
    norm = err.abs().mean(1).detach().clamp_min(floor)
    return err.pow(2).mean(1) / norm


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, beta: float, scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiffusionNFT's loss per row (N,) and its two parts (l+, l-).

    The implicit positive and negative policies v+ = beta v + (1 - beta) sg(v_old) and
    v- = (1 + beta) sg(v_old) - beta v each predict x0 = x_t - t v; l+- is their normalised x0 error
    (`normalised_x0_error`); the loss is scale * (r l+ + (1 - r) l-) / beta. t is (N,)."""
    v_old = v_old.detach()
    tt = t.reshape(-1, *([1] * (x_t.ndim - 1)))
    pos = normalised_x0_error(x_t - tt * (beta * v + (1 - beta) * v_old), x0)
    neg = normalised_x0_error(x_t - tt * ((1 + beta) * v_old - beta * v), x0)
    return scale * (r * pos + (1 - r) * neg) / beta, pos.detach(), neg.detach()


def flow_matching_error(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(N,) mean over dims of (v - (eps - x0))^2: the flow-matching error of a velocity at x_t."""
    return (v - (eps - x0)).flatten(1).pow(2).mean(1)


def awm_log_prob(error: torch.Tensor, t: torch.Tensor, p: float = 0.25, floor: float = 1e-10) -> torch.Tensor:
    """AWM's pseudo log-probability (generalised Huber form): -((l + floor)^p - floor^p) t / p."""
    return -((error + floor).pow(p) - floor**p) * t / p


def anchored_loss(v: torch.Tensor, x_k: torch.Tensor, x0: torch.Tensor, advantages: torch.Tensor,
                  sigma: torch.Tensor) -> torch.Tensor:
    """TempFlow credit at a branch state, one row per child (N,): A ||v - (x_k - x0) / sigma||^2 (summed
    over dims), where v is the velocity at the child's branch state x_k (time sigma) and x0 its clean
    sample. The mean over the K children of one state is (1/K) sum_j A_j ||v - (x_k - x0_j) / sigma||^2,
    whose gradient in v is (2 / (K sigma)) sum_j A_j x0_j for zero-sum advantages: the x0-prediction
    x_k - sigma v moves toward the clean samples of the better children and away from the worse."""
    s = sigma.reshape(-1, *([1] * (x_k.ndim - 1)))
    return advantages * (v - (x_k - x0) / s).flatten(1).pow(2).sum(1)


def old_policy_decay(step: int, decay_type: int) -> float:
    """DiffusionNFT's decay of the old-policy EMA after `step` updates: type 0 keeps none (old = theta),
    type 1 min(0.001 step, 0.5), type 2 0 before step 75 then min(0.0075 (step - 75), 0.999)."""
    if decay_type == 0:
        return 0.0
    if decay_type == 1:
        return min(0.001 * step, 0.5)
    if decay_type == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"decay_type must be 0, 1 or 2, got {decay_type}")

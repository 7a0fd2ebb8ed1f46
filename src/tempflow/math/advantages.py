"""Group-relative advantages (docs/method.md): prompt groups or seed groups, the divisor (the group's
std, a pooled or a batch-wide one), clipping, and a mask for groups that carry no signal (all rewards
equal, or any reward not finite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor  # (N,) advantage per row; 0 where not valid
    valid: torch.Tensor  # (N,) bool: the row's group has finite rewards with some spread
    finite: torch.Tensor  # (N,) bool: the row's group has finite rewards (spread or not)
    zero_std_frac: float  # fraction of groups whose rewards are all equal
    nonfinite_frac: float  # fraction of groups holding a NaN or infinite reward


def group_ids(*keys: torch.Tensor) -> torch.Tensor:
    """Dense group ids (N,) from one or more integer key columns, e.g. (prompt, seed, step)."""
    stacked = torch.stack([k.long() for k in keys], dim=1)  # (N, K)
    _, ids = torch.unique(stacked, dim=0, return_inverse=True)
    return ids


STDS = ("group", "pooled", "batch")


def group_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    std: str = "group",
    eps: float = 1e-4,
    clip: float = 5.0,
) -> Advantages:
    """A = (R - mean_group) / (s + eps), clipped to [-clip, clip], where s is

    - group: the group's own standard deviation;
    - pooled: the root mean square of the deviations R - mean_group over every valid row;
    - batch: the standard deviation of all finite-group rewards together (Flow-GRPO's global std,
      which also counts the spread between groups).

    Standard deviations are population ones (numpy's default). Groups whose rewards are all equal or
    not all finite get advantage 0 and valid False.
    """
    if std not in STDS:
        raise ValueError(f"std must be one of {STDS}, got {std!r}")
    r = rewards.double()
    g = torch.unique(groups, return_inverse=True)[1]
    n_groups = int(g.max()) + 1 if g.numel() else 0
    finite = torch.isfinite(r)
    bad = torch.zeros(n_groups, dtype=torch.bool).index_put_((g[~finite],), torch.tensor(True))
    r = torch.where(finite, r, torch.zeros_like(r))
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, r) / count
    dev = r - mean[g]
    var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, dev**2) / count
    flat = var <= 1e-12
    ok_group = ~bad & ~flat
    valid = ok_group[g]
    zero = torch.tensor(0.0, dtype=torch.float64)
    if std == "pooled":
        denom = (dev[valid].pow(2).mean().sqrt() if valid.any() else zero).expand_as(r)
    elif std == "batch":
        kept = ~bad[g]
        denom = (r[kept].std(unbiased=False) if kept.any() else zero).expand_as(r)
    else:
        denom = var.sqrt()[g]
    adv = (dev / (denom + eps)).clamp(-clip, clip)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    return Advantages(
        values=adv.to(torch.float32),
        valid=valid,
        finite=~bad[g],
        zero_std_frac=float((flat & ~bad).double().mean()) if n_groups else 0.0,
        nonfinite_frac=float(bad.double().mean()) if n_groups else 0.0,
    )

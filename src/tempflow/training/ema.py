"""Exponential moving average of weights, shared by pretraining and RL fine-tuning."""

from __future__ import annotations

import torch


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warm-up: min(decay, (1 + step) / (10 + step)), so early averages follow the model."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params."""
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)

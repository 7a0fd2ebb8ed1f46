"""Reward registry. A reward is ``fn(images, prompts, metadata) -> scores``.

images: (B, 3, H, W) float in [0, 1]; prompts: B strings; metadata: B dicts; scores: (B,) float32.
Factories import what they need inside, so ``import tempflow`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tempflow.errors import TempflowError

RewardFn = Callable[[torch.Tensor, list[str], list[dict]], torch.Tensor]


def _shapes(**kwargs: Any) -> RewardFn:
    from tempflow.shapes.reward import make_shapes_reward

    return make_shapes_reward(**kwargs)


REWARDS: dict[str, Callable[..., RewardFn]] = {"shapes": _shapes}


def make_reward(name: str, **kwargs: Any) -> RewardFn:
    """Build a registered reward by name."""
    if name not in REWARDS:
        raise TempflowError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**kwargs)

"""The `shapes` reward: the verifier's fraction of satisfied constraints, in [0, 1]."""

from __future__ import annotations

import torch

from tempflow.shapes.grammar import parse_prompt
from tempflow.shapes.verifier import score


def make_shapes_reward(strict: bool = False):
    """fn(images, prompts, metadata) -> (B,) scores; with strict=True, 1 only if all constraints hold.

    Each metadata dict receives 'strict' (bool) and 'category' (str) for per-category reporting.
    """

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        specs = [parse_prompt(p) for p in prompts]
        frac, ok = score(images, specs)
        for meta, spec, good in zip(metadata or [], specs, ok):
            meta["strict"], meta["category"] = bool(good), spec.category
        values = ok.astype("float32") if strict else frac
        return torch.from_numpy(values)

    return reward

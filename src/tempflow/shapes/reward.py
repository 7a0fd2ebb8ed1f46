"""The `shapes` reward: the verifier's fraction of satisfied constraints, in [0, 1]; `shapes_strict`:
1 where every constraint holds (the evaluation's accuracy), else 0."""

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


def make_shapes_strict_reward():
    """The `shapes_strict` reward: 1 where the verifier finds every constraint of the prompt, else 0.
    Beside `shapes` in a spec (``shapes:1,shapes_strict:1``) it adds a bonus for a wholly right image."""
    return make_shapes_reward(strict=True)

"""The `shapes` reward: the verifier's fraction of satisfied constraints, in [0, 1]; `shapes_strict`:
1 where every constraint holds (the evaluation's accuracy), else 0; `shapes_graded`: the fraction
with partial credit for near misses (shapes by their likeness, counts off by a little,
relations by their margin)."""

from __future__ import annotations

import torch

from tempflow.worlds.shapes.grammar import parse_prompt
from tempflow.worlds.shapes.verifier import score


def make_shapes_reward(strict: bool = False, graded: bool = False):
    """fn(images, prompts, metadata) -> (B,) scores; with strict=True, 1 only if all constraints hold;
    with graded=True, the mean of the verifier's graded constraint values (`constraint_values`).

    Each metadata dict receives 'strict' (bool) and 'category' (str) for per-category reporting.
    """

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        specs = [parse_prompt(p) for p in prompts]
        frac, ok = score(images, specs, graded=graded)
        for meta, spec, good in zip(metadata or [], specs, ok):
            meta["strict"], meta["category"] = bool(good), spec.category
        values = ok.astype("float32") if strict else frac
        return torch.from_numpy(values)

    return reward


def make_shapes_strict_reward():
    """The `shapes_strict` reward: 1 where the verifier finds every constraint of the prompt, else 0.
    Beside `shapes` in a spec (``shapes:1,shapes_strict:1``) it adds a bonus for a wholly right image."""
    return make_shapes_reward(strict=True)


def make_shapes_graded_reward():
    """The `shapes_graded` reward: like `shapes`, with partial credit for a component that nearly has
    the asked-for shape, a count that is off by a little and a relation by how far it holds or fails,
    so that children which all miss a constraint still differ in reward."""
    return make_shapes_reward(graded=True)

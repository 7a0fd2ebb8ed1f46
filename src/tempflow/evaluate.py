"""Evaluation of a model on a prompt set with the shapes verifier (GenEval-style accuracies)."""

from __future__ import annotations

import numpy as np
import torch

from tempflow.models.base import FlowModel
from tempflow.sampling import generate
from tempflow.shapes.grammar import CATEGORIES, Spec
from tempflow.shapes.verifier import score


def summarise(specs: list[Spec], frac: np.ndarray, strict: np.ndarray) -> dict:
    """GenEval-style summary: overall = mean of the per-category strict accuracies present."""
    per_cat = {}
    for cat in CATEGORIES:
        rows = [i for i, s in enumerate(specs) if s.category == cat]
        if rows:
            per_cat[cat] = float(np.mean(strict[rows]))
    return {
        "overall": float(np.mean(list(per_cat.values()))),
        "per_category": per_cat,
        "reward_mean": float(np.mean(frac)),
        "n": len(specs),
    }


def evaluate(
    model: FlowModel, specs: list[Spec], num_steps: int, guidance: float, seed: int, batch_size: int = 128
) -> tuple[dict, torch.Tensor]:
    """(summary, images); line i of the prompt set is sampled with seed `seed + i`."""
    prompts = [s.text() for s in specs]
    images = generate(model, prompts, [seed + i for i in range(len(specs))], num_steps, guidance, batch_size)
    frac, strict = score(images, specs)
    return summarise(specs, frac, strict), images


def format_table(summary: dict) -> str:
    """A plain-text table of per-category accuracy."""
    lines = [f"{'category':<15}{'accuracy':>9}"]
    for cat, acc in summary["per_category"].items():
        lines.append(f"{cat:<15}{acc:>9.3f}")
    lines.append(f"{'overall':<15}{summary['overall']:>9.3f}")
    lines.append(f"{'reward_mean':<15}{summary['reward_mean']:>9.3f}   (n = {summary['n']})")
    return "\n".join(lines)

"""Evaluation of a model on a prompt set with the shapes verifier (GenEval-style accuracies)."""

from __future__ import annotations

import numpy as np
import torch

from tempflow.models.base import FlowModel
from tempflow.sampling import generate
from tempflow.worlds.shapes.grammar import CATEGORIES, Spec
from tempflow.worlds.shapes.verifier import FAILURES, detect, failure, score_detections


def summarise(specs: list[Spec], frac: np.ndarray, strict: np.ndarray, failures: np.ndarray | None = None) -> dict:
    """GenEval-style summary: overall = mean of the per-category strict accuracies present.

    frac and strict are (n,) or (n, K) for K samples per line; with K > 1 the summary also holds
    pass@K, the fraction of lines with at least one strictly correct sample, per category and overall.
    failures, shaped like strict, holds each sample's `failure` kind (None where right); with it the
    summary gains "failures": per category, the share of its samples that fail for each kind."""
    strict = strict.reshape(len(specs), -1)
    kinds = None if failures is None else failures.reshape(len(specs), -1)
    k = strict.shape[1]
    per_cat, passed, missed = {}, {}, {}
    for cat in CATEGORIES:
        rows = [i for i, s in enumerate(specs) if s.category == cat]
        if rows:
            per_cat[cat] = float(np.mean(strict[rows]))
            passed[cat] = float(np.mean(strict[rows].max(1)))
            if kinds is not None:
                missed[cat] = {kind: float(np.mean(kinds[rows] == kind)) for kind in FAILURES}
    out = {
        "overall": float(np.mean(list(per_cat.values()))),
        "per_category": per_cat,
        "reward_mean": float(np.mean(frac)),
        "n": len(specs),
    }
    if k > 1:
        out.update({"samples": k, "pass_at_k": passed, "pass_at_k_overall": float(np.mean(list(passed.values())))})
    if kinds is not None:
        out["failures"] = missed
    return out


def line_seeds(seed: int, sample: int, lines: int, lo: int = 0, hi: int | None = None) -> list[int]:
    """Seeds of sample `sample` of lines lo..hi-1 of `lines`: sample k of line i is drawn with
    seed + k * lines + i (one sample: line i with seed + i)."""
    return [seed + sample * lines + i for i in range(lo, lines if hi is None else hi)]


def evaluate(
    model: FlowModel, specs: list[Spec], num_steps: int, guidance: float, seed: int, batch_size: int = 128,
    samples: int = 1, solver: str = "euler",
) -> tuple[dict, torch.Tensor]:
    """(summary, images of the first sample per line); seeds from `line_seeds`; `solver` as in `solve`."""
    prompts = [s.text() for s in specs]
    n = len(specs)
    fracs, stricts, kinds, first = [], [], [], None
    for k in range(samples):
        images = generate(model, prompts, line_seeds(seed, k, n), num_steps, guidance, batch_size, solver)
        dets = detect(images)
        frac, strict = score_detections(dets, specs)
        fracs.append(frac)
        stricts.append(strict)
        kinds.append(np.asarray([failure(d, s) for d, s in zip(dets, specs)], dtype=object))
        first = images if first is None else first
    return summarise(specs, np.stack(fracs, 1), np.stack(stricts, 1), np.stack(kinds, 1)), first


def format_table(summary: dict) -> str:
    """A plain-text table of per-category accuracy (and pass@K with several samples per line)."""
    k = summary.get("samples", 1)
    passed = summary.get("pass_at_k", {})
    head = f"{'category':<15}{'accuracy':>9}" + (f"{f'pass@{k}':>9}" if passed else "")
    lines = [head]
    for cat, acc in summary["per_category"].items():
        lines.append(f"{cat:<15}{acc:>9.3f}" + (f"{passed[cat]:>9.3f}" if passed else ""))
    lines.append(f"{'overall':<15}{summary['overall']:>9.3f}"
                 + (f"{summary['pass_at_k_overall']:>9.3f}" if passed else ""))
    n = f"n = {summary['n']}" + (f" lines x {k} samples" if passed else "")
    lines.append(f"{'reward_mean':<15}{summary['reward_mean']:>9.3f}   ({n})")
    return "\n".join(lines)


def format_failures(summary: dict) -> str:
    """A plain-text table: per category, the share of samples that fail for each `failure` kind."""
    failures = summary["failures"]
    head = f"{'misses':<15}" + "".join(f"{k:>{max(9, len(k) + 2)}}" for k in FAILURES)
    lines = [head]
    for cat, shares in failures.items():
        lines.append(f"{cat:<15}" + "".join(f"{shares[k]:>{max(9, len(k) + 2)}.3f}" for k in FAILURES))
    return "\n".join(lines)

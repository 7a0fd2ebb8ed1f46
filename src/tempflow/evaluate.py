"""Evaluation of a model on prompt sets: one table and one JSON for a verifier and for a reward.

A world with a verifier (`tempflow.worlds.World.judge`) gives GenEval-style accuracy: per category,
the share of samples whose every constraint holds, and overall the mean of the categories present.
Prompts outside any such world are scored by a reward model instead: per prompt set, the mean
reward, and overall the mean of the sets. Both summaries have the same keys (``overall``,
``per_category``, ``reward_mean``, ``n``, with K samples per line ``samples``; with a verifier also
``pass_at_k`` and ``failures``), and ``metric`` / ``group`` say which kind they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tempflow.errors import PromptError
from tempflow.models.base import FlowModel
from tempflow.prompts import load_prompts, set_name
from tempflow.rewards import WeightedReward
from tempflow.sampling import generate
from tempflow.worlds import Verdict, World, all_worlds, world_of


@dataclass
class Scoring:
    """How the lines of an evaluation are scored and grouped.

    judge(images, prompts) -> Verdict for the lines in order; labels: each line's row of the table
    (a category, or a prompt set); order: the rows' order."""

    judge: Callable[[torch.Tensor, list[str]], Verdict]
    labels: list[str]
    order: tuple[str, ...]
    metric: str = "accuracy"  # accuracy (a verifier's strict share) | reward (the reward's mean)
    failure_kinds: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        return "category" if self.metric == "accuracy" else "prompt set"


def verifier_scoring(world: World, prompts: list[str]) -> Scoring:
    """Accuracy per category by the world's verifier."""
    return Scoring(world.judge, [str(world.category(p)) for p in prompts], world.categories, "accuracy",
                   world.failure_kinds)


def reward_scoring(reward: WeightedReward, labels: list[str]) -> Scoring:
    """The mean reward per prompt set; `labels` names each line's set. The reward's running
    statistics are left as they are (scores of one pass are normalised together, frozen)."""

    def judge(images: torch.Tensor, prompts: list[str]) -> Verdict:
        with reward.frozen():
            scores = reward.combine(reward.raw_scores(images, prompts, [{} for _ in prompts])).float().numpy()
        return Verdict(scores, np.zeros(len(prompts), dtype=bool), [None] * len(prompts))

    return Scoring(judge, labels, tuple(dict.fromkeys(labels)), "reward")


def prompt_sets_scoring(sets: list[str], reward: WeightedReward | None = None, limit: int = 0
                        ) -> tuple[list[str], Scoring]:
    """(lines, scoring) of `tempflow eval`: the lines of every set in order; with a reward, the mean
    reward per set; without, accuracy per category by the verifier of the lines' world (one line,
    naming --reward, when they have none)."""
    per_set = [(s, load_prompts(s, limit)) for s in sets]
    lines = [p for _, ps in per_set for p in ps]
    if reward is not None:
        return lines, reward_scoring(reward, [set_name(s) for s, ps in per_set for _ in ps])
    world = world_of(lines, sets)
    if world is None or not world.has_verifier:
        raise PromptError(_no_verifier(lines, sets))
    return lines, verifier_scoring(world, lines)


def _no_verifier(lines: list[str], sets: list[str]) -> str:
    """Why `lines` have no verifier, in one line: a world with a verifier that knows most of them names
    the first line it does not know (a typo in a prompt file, most likely)."""
    best, known = None, 0
    for world in all_worlds():
        if world.has_verifier:
            k = sum(world.category(p) is not None for p in lines)
            best, known = (world, k) if k > known else (best, known)
    if best is not None and 2 * known >= len(lines):
        bad = next(p for p in lines if best.category(p) is None)
        return (f"{known} of {len(lines)} prompts of {', '.join(sets)} are prompts of the {best.name} world, but "
                f"{bad!r} is not: fix it, or score every line with a reward model: --reward SPEC")
    return (f"the prompts of {', '.join(sets)} are not of a world with a verifier; score them with a reward model: "
            "--reward SPEC (e.g. pickscore)")


def summarise(scoring: Scoring, frac: np.ndarray, strict: np.ndarray, failures: np.ndarray | None = None) -> dict:
    """The summary of an evaluation (see the module docstring).

    frac, strict and failures are (n,) or (n, K) for K samples per line: the verifier's fraction (or
    the reward), whether every constraint holds, the kind of miss. With K > 1 and a verifier the
    summary also holds pass@K, the fraction of lines with at least one strictly correct sample."""
    n = len(scoring.labels)
    frac, strict = frac.reshape(n, -1), strict.reshape(n, -1)
    kinds = None if failures is None or not scoring.failure_kinds else failures.reshape(n, -1)
    accuracy = scoring.metric == "accuracy"
    per_row, passed, missed = {}, {}, {}
    for label in scoring.order:
        rows = [i for i, lab in enumerate(scoring.labels) if lab == label]
        if not rows:
            continue
        per_row[label] = float(np.mean(strict[rows] if accuracy else frac[rows]))
        if accuracy:
            passed[label] = float(np.mean(strict[rows].max(1)))
        if kinds is not None:
            missed[label] = {kind: float(np.mean(kinds[rows] == kind)) for kind in scoring.failure_kinds}
    out = {"metric": scoring.metric, "group": scoring.group, "overall": float(np.mean(list(per_row.values()))),
           "per_category": per_row, "reward_mean": float(np.mean(frac)), "n": n}
    if frac.shape[1] > 1:
        out["samples"] = frac.shape[1]
        if accuracy:
            out.update({"pass_at_k": passed, "pass_at_k_overall": float(np.mean(list(passed.values())))})
    if kinds is not None:
        out["failures"] = missed
    return out


def line_seeds(seed: int, sample: int, lines: int, lo: int = 0, hi: int | None = None) -> list[int]:
    """Seeds of sample `sample` of lines lo..hi-1 of `lines`: sample k of line i is drawn with
    seed + k * lines + i (one sample: line i with seed + i)."""
    return [seed + sample * lines + i for i in range(lo, lines if hi is None else hi)]


def evaluate(
    model: FlowModel, prompts: list[str], scoring: Scoring, num_steps: int, guidance: float, seed: int,
    batch_size: int = 128, samples: int = 1, solver: str = "euler",
) -> tuple[dict, torch.Tensor]:
    """(summary, images of the first sample per line); seeds from `line_seeds`; `solver` as in `solve`."""
    n = len(prompts)
    fracs, stricts, kinds, first = [], [], [], None
    for k in range(samples):
        images = generate(model, prompts, line_seeds(seed, k, n), num_steps, guidance, batch_size, solver)
        verdict = scoring.judge(images, prompts)
        fracs.append(np.asarray(verdict.frac, dtype=np.float64))
        stricts.append(np.asarray(verdict.strict, dtype=bool))
        kinds.append(np.asarray(verdict.failures, dtype=object))
        first = images if first is None else first
    return summarise(scoring, np.stack(fracs, 1), np.stack(stricts, 1), np.stack(kinds, 1)), first


def format_table(summary: dict) -> str:
    """A plain-text table: per category the accuracy (per prompt set the mean reward), with pass@K
    beside it for several samples per line."""
    k = summary.get("samples", 1)
    passed = summary.get("pass_at_k", {})
    group, metric = summary.get("group", "category"), summary.get("metric", "accuracy")
    width = max(15, 2 + max(map(len, [group, *summary["per_category"]])))
    head = f"{group:<{width}}{metric:>9}" + (f"{f'pass@{k}':>9}" if passed else "")
    lines = [head]
    for row, value in summary["per_category"].items():
        lines.append(f"{row:<{width}}{value:>9.3f}" + (f"{passed[row]:>9.3f}" if passed else ""))
    lines.append(f"{'overall':<{width}}{summary['overall']:>9.3f}"
                 + (f"{summary['pass_at_k_overall']:>9.3f}" if passed else ""))
    n = f"n = {summary['n']}" + (f" lines x {k} samples" if k > 1 else "")
    lines.append(f"{'reward_mean':<{width}}{summary['reward_mean']:>9.3f}   ({n})")
    return "\n".join(lines)


def format_failures(summary: dict) -> str:
    """A plain-text table: per category, the share of samples that fail for each kind of miss."""
    failures = summary["failures"]
    kinds = list(next(iter(failures.values()), {}))
    head = f"{'misses':<15}" + "".join(f"{k:>{max(9, len(k) + 2)}}" for k in kinds)
    lines = [head]
    for cat, shares in failures.items():
        lines.append(f"{cat:<15}" + "".join(f"{shares[k]:>{max(9, len(k) + 2)}.3f}" for k in kinds))
    return "\n".join(lines)

"""The final models and the starting model of `tempflow bench learning` on the whole evaluation set,
each drawn the same way (lines, samples, seeds, guidance) so that the gain is measured on equal terms,
and kept beside the runs so that a continued benchmark evaluates nothing twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tempflow.training.config import TrainConfig


def evaluation_key(model: str, cfg: TrainConfig, limit: int, samples: int | None, seed: int | None,
                    guidance: float | None = None) -> dict:
    """What decides an evaluation's result: the model, the config's evaluation prompts, steps and
    guidance, the lines (`limit`), `samples` per line and the first `seed` (None: the config's own)."""
    e = cfg.eval
    return {"model": model, "prompts": e.prompts, "limit": limit, "steps": e.num_steps,
            "guidance": e.guidance if guidance is None else guidance,
            "seed": e.seed if seed is None else seed, "samples": e.samples if samples is None else samples}


def _cache_file(folder: Path, stem: str, cfg: TrainConfig, guidance: float | None) -> Path:
    """folder/stem.json at the config's own evaluation guidance, folder/stem_g<guidance>.json at another."""
    own = guidance is None or guidance == cfg.eval.guidance
    return folder / (f"{stem}.json" if own else f"{stem}_g{guidance:g}.json")


def _cached_evaluation(model: str, cfg: TrainConfig, cache: Path, limit: int, samples: int | None,
                       seed: int | None, guidance: float | None = None) -> dict | None:
    """`model` on the config's evaluation prompts (all of them, limit 0, or an even spread of `limit`)
    with its evaluation steps and guidance (or `guidance`); `samples` per line from `seed` (None: the
    config's own). Computed once and kept in `cache`. None for prompts of no world with a verifier."""
    from tempflow.evaluate import evaluate, verifier_scoring
    from tempflow.models import load_model
    from tempflow.prompts import load_prompts
    from tempflow.worlds import world_of

    key = evaluation_key(model, cfg, limit, samples, seed, guidance)
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return data["summary"]
    lines = load_prompts(key["prompts"], limit)
    world = world_of(lines)
    if world is None or not world.has_verifier:
        return None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    summary, _ = evaluate(load_model(model), lines, verifier_scoring(world, lines), key["steps"], key["guidance"],
                          key["seed"], samples=key["samples"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "summary": summary}, indent=1))
    return summary


def final_evaluation(run: Path, cfg: TrainConfig, limit: int = 0, samples: int | None = None,
                     seed: int | None = None, guidance: float | None = None) -> dict | None:
    """The run's final model (EMA weights) on its evaluation prompts: all of them (limit 0) or an even
    spread of `limit`, with the training run's evaluation steps and guidance (or `guidance`), `samples`
    per line from `seed` (None: the run's own eval.samples and eval.seed). Kept in RUN/final_eval.json
    (RUN/final_eval_g<guidance>.json at another guidance)."""
    return _cached_evaluation(str(run / "final"), cfg, _cache_file(run, "final_eval", cfg, guidance), limit,
                              samples, seed, guidance)


def base_evaluation(out: Path, cfg: TrainConfig, limit: int = 0, samples: int | None = None,
                    seed: int | None = None, guidance: float | None = None) -> dict | None:
    """The starting model (cfg.model) evaluated exactly as `final_evaluation` evaluates the final
    ones, so that the gain is measured on the same lines and seeds. Kept in OUT/base_eval.json."""
    return _cached_evaluation(cfg.model, cfg, _cache_file(out, "base_eval", cfg, guidance), limit, samples, seed,
                              guidance)

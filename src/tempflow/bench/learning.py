"""`tempflow bench learning`: several presets from the same base with the same seeds under one budget.

Each run trains into OUT/<preset>/seed<k> (a finished run is kept and an interrupted one resumed);
the summary (learning_summary) covers these runs and every other finished run in OUT that the same
command with another preset or seed would have made, with the final models and the starting model on
the whole evaluation set (evaluations), its tables and a plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from tempflow.bench.evaluations import base_evaluation, evaluation_key, final_evaluation
from tempflow.bench.learning_summary import RunCurve, learning_table, plot_learning, summarise_learning
from tempflow.bench.presets import PRESET_DIR, Budget, load_preset
from tempflow.errors import TempflowError
from tempflow.training.config import TrainConfig

Runs = list[tuple[str, int, TrainConfig]]  # (preset stem, seed, config) of each run


def _changed_settings(run: Path, cfg: TrainConfig) -> list[str]:
    """Dotted keys whose value in the run's saved config differs from `cfg` (threads aside: it
    changes speed, not results). Empty for a run folder without a saved config."""
    from dataclasses import asdict

    from tempflow.training.run import resume_config

    if not (run / "config.yaml").is_file():
        return []

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    saved, wanted = flat(asdict(resume_config(run, []))), flat(asdict(cfg))
    return [f"{k} ({saved[k]!r} there, {wanted[k]!r} asked)" for k in wanted
            if k != "threads" and saved[k] != wanted[k]]


def _kept_runs(out: Path, asked: set[tuple[str, int]], overrides: list[str],
               preset_dir: str | Path) -> Runs:
    """Finished runs in `out` beside the `asked` (preset, seed) pairs that the same command with another
    preset or seed would have made, settings and all: a benchmark continued seed by seed, or preset by
    preset, into one folder is summarised whole. A run's folder names its preset in `preset_dir`; runs
    trained with other settings are named and left out."""
    kept = []
    for done in out.glob("*/seed*/final/model_index.json"):
        run = done.parent.parent
        preset, seed = run.parent.name, run.name.removeprefix("seed")
        if not seed.isdigit() or (preset, int(seed)) in asked:
            continue
        try:
            cfg = load_preset(preset, [*overrides, f"seed={seed}"], preset_dir)
        except TempflowError:  # no preset of that name in preset_dir: a run of some other command
            continue
        if _changed_settings(run, cfg):
            print(f"bench: {run} was trained with other settings; left out of the summary", flush=True)
            continue
        print(f"bench: {preset} seed {seed} finished earlier in {out}; in the summary too", flush=True)
        kept.append((preset, int(seed), cfg))
    return kept


def bench_learning(presets: list[str], seeds: list[int], budget: Budget, out: str | Path,
                   overrides: list[str] | None = None, thresholds: list[float] | None = None,
                   baseline: str | None = None, method: str | None = None, final_eval: int | None = 0,
                   final_samples: int | None = None, final_seed: int | None = None,
                   final_guidance: list[float] | None = None, preset_dir: str | Path = PRESET_DIR) -> dict:
    """Train every preset (a name in `preset_dir` or a YAML path) with every seed for `budget`;
    RUN = out/<preset>/seed<k>; summary in out/ over these runs and every other finished run there that
    this command with another preset or seed would have made (same settings), so a benchmark continued
    one seed or preset at a time is summarised whole.

    baseline, method: the presets whose budgets to reach each threshold are compared, method / baseline
    (None: the first and the second of `presets`).

    final_eval: evaluate every final model on the whole evaluation set (0) or an even spread of that
    many lines, for final accuracies less noisy than the runs' own small evaluations; None: skip.
    final_samples, final_seed: samples per line and first seed of that evaluation (None: the runs'
    eval.samples and eval.seed). The starting model is evaluated the same way, for the gain.
    final_guidance: also evaluate every final model and the starting model at each of these guidances
    (each algorithm at guidance 1 and at its best, side by side)."""
    if final_samples is not None and final_samples < 1:
        raise TempflowError(f"--final-samples must be >= 1, got {final_samples}")
    if not presets:
        raise TempflowError("bench learning needs at least one preset")
    baseline = baseline or presets[0]
    method = method or (presets[1] if len(presets) > 1 else None)
    out = Path(out)
    common = [*(overrides or []), *budget.overrides()]
    cfgs = {p: {s: load_preset(p, [*common, f"seed={s}"], preset_dir) for s in seeds}
            for p in presets}  # every config is validated before anything runs
    runs = _train_runs(out, cfgs, budget)
    order = {p: i for i, p in enumerate(dict.fromkeys(p for p, _, _ in runs))}  # asked presets first
    runs += _kept_runs(out, {(p, s) for p, s, _ in runs}, common, preset_dir)
    runs.sort(key=lambda r: (order.get(r[0], len(order)), r[0], r[1]))
    final = (final_eval, final_samples, final_seed)
    curves = [_curve(out, p, s, cfg, final, final_guidance) for p, s, cfg in runs]
    base = None if final_eval is None else _base(out, runs, final, final_guidance)
    summary = summarise_learning(curves, sorted(thresholds or []), Path(baseline).stem,
                                 Path(method).stem if method else None, base)
    summary["budget"] = str(budget)
    summary["seeds"] = sorted({c.seed for c in curves})
    summary["overrides"] = overrides or []
    summary["final_eval"] = final_eval
    summary["final_samples"] = final_samples
    summary["final_seed"] = final_seed
    summary["final_guidance"] = final_guidance
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = learning_table(summary)
    (out / "summary.md").write_text(table + "\n")
    plot_learning(curves, out / "learning.png")
    summary["table"] = table
    return summary


def _train_runs(out: Path, cfgs: dict[str, dict[int, TrainConfig]], budget: Budget) -> Runs:
    """Train (or resume) every preset x seed run that has not finished; (preset stem, seed, config) of each.
    A kept run is reused or resumed only with the settings it was trained with."""
    from tempflow.training.run import train

    runs = []
    for p, by_seed in cfgs.items():
        for s, cfg in by_seed.items():
            run = out / Path(p).stem / f"seed{s}"
            changed = _changed_settings(run, cfg)
            if changed:
                raise TempflowError(f"{run} was trained with other settings: {', '.join(changed[:3])}"
                                    f"{' ...' if len(changed) > 3 else ''}; pass the same --set values, "
                                    "or another --out")
            if not (run / "final" / "model_index.json").is_file():  # an interrupted benchmark continues
                print(f"bench: {p} seed {s} for {budget} -> {run}", flush=True)
                train(cfg, run, resume=(run / "checkpoints").exists())
            runs.append((Path(p).stem, s, cfg))
    return runs


def _curve(out: Path, preset: str, seed: int, cfg: TrainConfig, final: tuple, guidances: list[float] | None
           ) -> RunCurve:
    """A run's curve from its metrics, with its final model evaluated as `final` = (lines, samples, seed)
    says (lines None: not evaluated), at its own guidance and at each of `guidances`."""
    from tempflow.training.run import read_metrics

    run = out / preset / f"seed{seed}"
    curve = RunCurve.from_metrics(preset, seed, read_metrics(run / "metrics.jsonl"))
    curve.guidance = cfg.eval.guidance
    if final[0] is not None:
        curve.full = final_evaluation(run, cfg, *final)
        for g in guidances or []:
            curve.by_guidance[f"{g:g}"] = final_evaluation(run, cfg, *final, g)
    return curve


def _base(out: Path, runs: Runs, final: tuple, guidances: list[float] | None
          ) -> dict | None:
    """The starting model, evaluated as every run's final one was, at each guidance; None when the runs
    do not share one starting model and evaluation."""
    keys = {json.dumps(evaluation_key(c.model, c, *final, 0.0)) for _, _, c in runs}
    if len(keys) != 1:
        return None
    cfg0 = runs[0][2]
    wanted = sorted({c.eval.guidance for _, _, c in runs} | set(guidances or []))
    base = {f"{g:g}": base_evaluation(out, cfg0, *final, g) for g in wanted}
    return {g: b for g, b in base.items() if b is not None} or None

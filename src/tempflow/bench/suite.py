"""`tempflow bench learning|gradient|system`: the measurements that decide between algorithms and settings.

learning: several presets from the same base with the same seeds under one budget (wall-clock
seconds, model calls or iterations); per-run metrics, a summary table (final accuracy per category,
mean and spread over seeds; budget to first reach accuracy thresholds; TempFlow / Flow-GRPO ratios)
and plots of accuracy against iterations, NFE and wall-clock with spread bands.

gradient: how much of one iteration's policy gradient is signal, and the wall-clock each preset needs
to one unit of gradient signal-to-noise, from independent rollouts at the same weights.

system: one preset's iteration broken into phases, NFE, images per second and peak memory, against
the compute limit: the same forward and backward work run back to back in the largest batches.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tempflow.config import find_preset, load_config
from tempflow.errors import TempflowError
from tempflow.training.config import TrainConfig

DEFAULT_PRESETS = ("flow_grpo", "tempflow", "nft", "awm", "tempflow_nft")
BUDGET_UNITS = {"s": "seconds", "nfe": "nfe", "it": "iterations"}


# ---- budgets and presets ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    amount: float
    unit: str  # seconds | nfe | iterations

    @staticmethod
    def parse(text: str) -> Budget:
        """'600s', '2e6nfe', '100it' -> Budget."""
        t = text.strip().lower()
        for suffix, unit in sorted(BUDGET_UNITS.items(), key=lambda kv: -len(kv[0])):
            if t.endswith(suffix):
                try:
                    amount = float(t[: -len(suffix)])
                except ValueError:
                    break
                if amount > 0 and math.isfinite(amount):
                    return Budget(amount, unit)
                break
        raise TempflowError(f"budget {text!r} must be a positive number with a unit: 600s, 2e6nfe or 100it")

    def overrides(self) -> list[str]:
        """Config overrides that make `tempflow train` stop at this budget."""
        if self.unit == "seconds":
            return [f"max_minutes={self.amount / 60}", "iterations=1000000"]
        if self.unit == "nfe":
            return [f"max_nfe={int(self.amount)}", "iterations=1000000"]
        return [f"iterations={int(self.amount)}"]

    def __str__(self) -> str:
        return f"{self.amount:g} {self.unit}"


def preset_path(name: str) -> Path:
    """A preset name (tempflow, flow_grpo, ...) under configs/shapes/, or a YAML path."""
    if name.endswith((".yaml", ".yml")):
        return find_preset(name)
    return find_preset(f"configs/shapes/{name}.yaml")


def load_preset(name: str, overrides: list[str]) -> TrainConfig:
    return load_config(TrainConfig, preset_path(name), overrides)


# ---- learning -----------------------------------------------------------------------------------------

@dataclass
class RunCurve:
    """One run's evaluation curve with the budget spent at each evaluation."""

    preset: str
    seed: int
    iterations: list[float] = field(default_factory=list)
    nfe: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    overall: list[float] = field(default_factory=list)
    categories: dict[str, list[float]] = field(default_factory=dict)
    full: dict | None = None  # the final model on the whole evaluation set (final_evaluation)
    guidance: float = 0.0  # the guidance of `full`: the run's own evaluation guidance
    by_guidance: dict[str, dict] = field(default_factory=dict)  # the final model at other guidances too

    @staticmethod
    def from_metrics(preset: str, seed: int, rows: list[dict]) -> RunCurve:
        c = RunCurve(preset, seed)
        nfe_at: dict[int, float] = {0: 0.0}
        total = 0.0
        for r in rows:
            if "nfe" in r:
                total += r["nfe"]
                nfe_at[r["step"]] = total
        for r in rows:
            if "eval_overall" not in r:
                continue
            c.iterations.append(float(r["step"]))
            c.nfe.append(nfe_at.get(r["step"], total))
            c.seconds.append(float(r.get("time_s", 0.0)))
            c.overall.append(float(r["eval_overall"]))
            for k, v in r.items():
                if k.startswith("eval_") and k not in ("eval_overall", "eval_reward", "eval_s", "eval_guidance",
                                                       "eval_pass_at_k"):
                    c.categories.setdefault(k[5:], []).append(float(v))
        return c

    def axis(self, name: str) -> list[float]:
        return {"iterations": self.iterations, "nfe": self.nfe, "seconds": self.seconds}[name]

    def first_reach(self, threshold: float, axis: str) -> float | None:
        """Budget spent when the evaluation first reached `threshold` (None: never)."""
        for x, y in zip(self.axis(axis), self.overall):
            if y >= threshold - 1e-9:
                return x
        return None


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def summarise_learning(curves: list[RunCurve], thresholds: list[float], baseline: str, method: str,
                       base: dict | None = None) -> dict:
    """Per preset: final accuracy (mean, std over seeds) overall and per category; budget to first
    reach each threshold (mean over the seeds that reach it, and how many do); ratios method/baseline.
    Also: the accuracy the baseline ends at, and the wall-clock the method needs to reach it.
    base: the starting model's evaluation summary, drawn as the final models' were (gains are
    measured from it), or {guidance: summary} when the presets are evaluated at several guidances."""
    presets = list(dict.fromkeys(c.preset for c in curves))
    bases = base if base is None or "overall" not in base else {"": base}  # "": the base at every guidance

    def base_at(g: float) -> dict | None:
        return None if bases is None else bases.get("", bases.get(f"{g:g}"))

    first = next((c for c in curves if c.full), None)
    out: dict = {"presets": {}, "thresholds": thresholds, "baseline": baseline, "method": method,
                 "base_full": base_at(first.guidance) if first else base_at(0.0),
                 "base_by_guidance": {g: b["overall"] for g, b in (bases or {}).items() if g}}
    for p in presets:
        cs = [c for c in curves if c.preset == p and c.overall]
        finals = [c.overall[-1] for c in cs]
        m, s = _mean_std(finals)
        cats = {}
        for cat in (cs[0].categories if cs else {}):
            cats[cat] = _mean_std([c.categories[cat][-1] for c in cs])
        reach = {}
        for th in thresholds:
            reach[str(th)] = {}
            for axis in ("iterations", "nfe", "seconds"):
                hits = [x for x in (c.first_reach(th, axis) for c in cs) if x is not None]
                reach[str(th)][axis] = {"mean": _mean_std(hits)[0] if hits else None, "reached": len(hits),
                                        "runs": len(cs)}
        fulls = [c.full for c in cs if c.full]
        full = None
        if fulls and len(fulls) == len(cs):
            fm, fs = _mean_std([f["overall"] for f in fulls])
            full = {"mean": fm, "std": fs, "values": [f["overall"] for f in fulls], "n": fulls[0]["n"],
                    "samples": fulls[0].get("samples", 1),
                    "categories": {k: _mean_std([f["per_category"][k] for f in fulls])[0]
                                   for k in fulls[0]["per_category"]}}
            if all("pass_at_k_overall" in f for f in fulls):
                full["pass_at_k"] = _mean_std([f["pass_at_k_overall"] for f in fulls])[0]
            full["guidance"] = cs[0].guidance
            if base_at(cs[0].guidance) is not None:
                full["gain"] = fm - base_at(cs[0].guidance)["overall"]
        by_g = {}
        for g in (cs[0].by_guidance if cs else {}):
            vals = [c.by_guidance[g]["overall"] for c in cs if g in c.by_guidance]
            if len(vals) == len(cs):
                gm, gs = _mean_std(vals)
                b = base_at(float(g))
                by_g[g] = {"mean": gm, "std": gs, "gain": gm - b["overall"] if b else None}
        out["presets"][p] = {
            "final_full": full,
            "final_by_guidance": by_g,
            "best_guidance": max(by_g, key=lambda g: by_g[g]["mean"]) if by_g else None,
            "final_overall": {"mean": m, "std": s, "seeds": [c.seed for c in cs], "values": finals},
            "start_overall": _mean_std([c.overall[0] for c in cs])[0],
            "final_categories": {k: {"mean": v[0], "std": v[1]} for k, v in cats.items()},
            "final_budget": {axis: _mean_std([c.axis(axis)[-1] for c in cs])[0]
                             for axis in ("iterations", "nfe", "seconds")},
            "reach": reach,
        }
    ps = out["presets"]
    if baseline in ps and method in ps:
        out["ratios"] = {}
        for th in thresholds:
            out["ratios"][str(th)] = {}
            for axis in ("iterations", "nfe", "seconds"):
                a = ps[method]["reach"][str(th)][axis]["mean"]
                b = ps[baseline]["reach"][str(th)][axis]["mean"]
                out["ratios"][str(th)][axis] = (a / b) if a is not None and b else None
        target = ps[baseline]["final_overall"]["mean"]
        per_seed = [c.first_reach(target, "seconds") for c in curves if c.preset == method and c.overall]
        hits = [x for x in per_seed if x is not None]
        base_s = ps[baseline]["final_budget"]["seconds"]
        out["match_baseline"] = {
            "target": target, "baseline_seconds": base_s, "method_seconds": _mean_std(hits)[0] if hits else None,
            "reached": len(hits), "runs": len(per_seed),
            "fraction": (_mean_std(hits)[0] / base_s) if hits and base_s else None,
            # the baseline ended where the method started: nothing to catch up, the fraction means nothing
            "trivial": target <= ps[method]["start_overall"] + 1e-9,
        }
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def learning_table(summary: dict) -> str:
    """Markdown tables of a learning summary."""
    ps = summary["presets"]
    cats = list(next(iter(ps.values()))["final_categories"]) if ps else []
    head = "| preset | start | final overall | " + " | ".join(cats) + " | iterations | NFE | seconds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p, s in ps.items():
        f = s["final_overall"]
        cells = [f"{_fmt(s['start_overall'])}", f"{_fmt(f['mean'])} ± {_fmt(f['std'])}"]
        cells += [_fmt(s["final_categories"][c]["mean"]) for c in cats]
        b = s["final_budget"]
        cells += [_fmt(b["iterations"], 0), _fmt(b["nfe"], 0), _fmt(b["seconds"], 0)]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    fulls = {p: s["final_full"] for p, s in ps.items() if s.get("final_full")}
    if fulls:
        first = next(iter(fulls.values()))
        fcats = list(first["categories"])
        k = first.get("samples", 1)
        drawn = f"{first['n']} lines x {k} samples" if k > 1 else f"{first['n']} samples"
        base = summary.get("base_full")
        with_pass = all("pass_at_k" in f for f in fulls.values())
        cols = ["overall", *(["gain"] if base else []), *([f"pass@{k}"] if with_pass else []), *fcats, "guidance"]
        lines += ["", f"Final models on the whole evaluation set ({drawn} each, at each run's own evaluation "
                      "guidance; mean ± spread over seeds):", "",
                  "| preset | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        if base:
            cells = [_fmt(base["overall"]), "-",
                     *([_fmt(base.get("pass_at_k_overall"))] if with_pass else []),
                     *(_fmt(base["per_category"].get(c)) for c in fcats), f"{first['guidance']:g}"]
            lines.append("| base | " + " | ".join(cells) + " |")
        for p, f in fulls.items():
            gain = f"{f['gain']:+.3f}" if f.get("gain") is not None else "-"
            cells = [f"{_fmt(f['mean'])} ± {_fmt(f['std'])}", *([gain] if base else []),
                     *([_fmt(f["pass_at_k"])] if with_pass else []), *(_fmt(f["categories"][c]) for c in fcats),
                     f"{f['guidance']:g}"]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += guidance_table(summary)
    if summary["thresholds"]:
        lines += ["", "Budget to first reach an overall accuracy (mean over the seeds that reach it; "
                      "reached/runs):", "",
                  "| preset | threshold | iterations | NFE | seconds |", "|---|---|---|---|---|"]
        for p, s in ps.items():
            for th, r in s["reach"].items():
                it, nf, sec = r["iterations"], r["nfe"], r["seconds"]
                lines.append(f"| {p} | {th} | {_fmt(it['mean'], 0)} | {_fmt(nf['mean'], 0)} | "
                             f"{_fmt(sec['mean'], 0)} ({sec['reached']}/{sec['runs']}) |")
    if "ratios" in summary:
        lines += ["", f"Ratio of budgets {summary['method']} / {summary['baseline']} to reach a threshold:", "",
                  "| threshold | iterations | NFE | seconds |", "|---|---|---|---|"]
        for th, r in summary["ratios"].items():
            lines.append(f"| {th} | {_fmt(r['iterations'], 2)} | {_fmt(r['nfe'], 2)} | {_fmt(r['seconds'], 2)} |")
        mb = summary["match_baseline"]
        ends = f"{summary['baseline']} ends at {_fmt(mb['target'])} after {_fmt(mb['baseline_seconds'], 0)} s"
        if mb.get("trivial"):
            lines += ["", f"{ends}, not above where {summary['method']} starts "
                          f"({_fmt(summary['presets'][summary['method']]['start_overall'])}): there is nothing to "
                          "catch up, so the time to match it says nothing on this budget."]
        else:
            lines += ["", f"{ends}; {summary['method']} first reaches it after {_fmt(mb['method_seconds'], 0)} s "
                          f"({mb['reached']}/{mb['runs']} seeds; fraction of the baseline's time: "
                          f"{_fmt(mb['fraction'], 2)})."]
    return "\n".join(lines)


def guidance_table(summary: dict) -> list[str]:
    """Lines of the final models' overall accuracy at each evaluated guidance, with the gain over the
    starting model at that guidance and the best guidance of each preset."""
    ps = {p: s for p, s in summary["presets"].items() if s.get("final_by_guidance")}
    if not ps:
        return []
    gs = sorted({g for s in ps.values() for g in s["final_by_guidance"]}, key=float)
    base = summary.get("base_by_guidance", {})
    lines = ["", "Final models at each guidance (overall; mean ± spread over seeds, gain over the starting model "
                 "at that guidance):", "", "| preset | " + " | ".join(f"guidance {g}" for g in gs) + " | best |",
             "|---|" + "---|" * (len(gs) + 1)]
    if base:
        best = max((g for g in gs if g in base), key=lambda g: base[g], default=None)
        lines.append("| base | " + " | ".join(_fmt(base.get(g)) for g in gs) + f" | {best or '-'} |")
    for p, s in ps.items():
        cells = []
        for g in gs:
            e = s["final_by_guidance"].get(g)
            gain = f" ({e['gain']:+.3f})" if e and e.get("gain") is not None else ""
            cells.append(f"{_fmt(e['mean'])} ± {_fmt(e['std'])}{gain}" if e else "-")
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {s['best_guidance']} |")
    return lines


def plot_learning(curves: list[RunCurve], path: Path) -> Path:
    """Eval accuracy against iterations, NFE and wall-clock; mean over seeds with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, axis, label in zip(axes, ("iterations", "nfe", "seconds"),
                               ("iteration", "model calls (NFE)", "training wall-clock (s)")):
        for p in dict.fromkeys(c.preset for c in curves):
            cs = [c for c in curves if c.preset == p and c.overall]
            if not cs:
                continue
            end = min(c.axis(axis)[-1] for c in cs)
            grid = np.linspace(0, end, 50) if end > 0 else np.zeros(1)
            ys = np.stack([np.interp(grid, c.axis(axis), c.overall) for c in cs])
            line, = ax.plot(grid, ys.mean(0), label=f"{p} ({len(cs)} seed{'s' if len(cs) > 1 else ''})")
            ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel(label)
        if axis == "nfe":  # 200k, 1.5M: plain counts overlap
            ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
        ax.set_ylabel("eval accuracy (overall)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _evaluation_key(model: str, cfg: TrainConfig, limit: int, samples: int | None, seed: int | None,
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

    key = _evaluation_key(model, cfg, limit, samples, seed, guidance)
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


def _kept_runs(out: Path, asked: set[tuple[str, int]], overrides: list[str]) -> list[tuple[str, int, TrainConfig]]:
    """Finished runs in `out` beside the `asked` (preset, seed) pairs that the same command with another
    preset or seed would have made, settings and all: a benchmark continued seed by seed, or preset by
    preset, into one folder is summarised whole. Runs trained with other settings are named and left out."""
    kept = []
    for done in out.glob("*/seed*/final/model_index.json"):
        run = done.parent.parent
        preset, seed = run.parent.name, run.name.removeprefix("seed")
        if not seed.isdigit() or (preset, int(seed)) in asked:
            continue
        try:
            cfg = load_preset(preset, [*overrides, f"seed={seed}"])
        except TempflowError:  # not a preset of configs/shapes/: a run of some other command
            continue
        if _changed_settings(run, cfg):
            print(f"bench: {run} was trained with other settings; left out of the summary", flush=True)
            continue
        print(f"bench: {preset} seed {seed} finished earlier in {out}; in the summary too", flush=True)
        kept.append((preset, int(seed), cfg))
    return kept


def bench_learning(presets: list[str], seeds: list[int], budget: Budget, out: str | Path,
                   overrides: list[str] | None = None, thresholds: list[float] | None = None,
                   baseline: str = "flow_grpo", method: str = "tempflow", final_eval: int | None = 0,
                   final_samples: int | None = None, final_seed: int | None = None,
                   final_guidance: list[float] | None = None) -> dict:
    """Train every preset with every seed for `budget`; RUN = out/<preset>/seed<k>; summary in out/ over
    these runs and every other finished run there that this command with another preset or seed would
    have made (same settings), so a benchmark continued one seed or preset at a time is summarised whole.

    final_eval: evaluate every final model on the whole evaluation set (0) or an even spread of that
    many lines, for final accuracies less noisy than the runs' own small evaluations; None: skip.
    final_samples, final_seed: samples per line and first seed of that evaluation (None: the runs'
    eval.samples and eval.seed). The starting model is evaluated the same way, for the gain.
    final_guidance: also evaluate every final model and the starting model at each of these guidances
    (each algorithm at guidance 1 and at its best, side by side)."""
    from tempflow.training.run import read_metrics, train

    if final_samples is not None and final_samples < 1:
        raise TempflowError(f"--final-samples must be >= 1, got {final_samples}")
    out = Path(out)
    common = [*(overrides or []), *budget.overrides()]
    cfgs = {p: {s: load_preset(p, [*common, f"seed={s}"]) for s in seeds}
            for p in presets}  # every config is validated before anything runs
    runs = []  # (preset stem, seed, config) of every run the summary covers
    for p in presets:
        for s in seeds:
            run = out / Path(p).stem / f"seed{s}"
            done = run / "final" / "model_index.json"
            changed = _changed_settings(run, cfgs[p][s])
            if changed:  # a kept run is reused or resumed only with the settings it was trained with
                raise TempflowError(f"{run} was trained with other settings: {', '.join(changed[:3])}"
                                    f"{' ...' if len(changed) > 3 else ''}; pass the same --set values, "
                                    "or another --out")
            if not done.is_file():  # finished runs are kept: an interrupted benchmark continues
                print(f"bench: {p} seed {s} for {budget} -> {run}", flush=True)
                train(cfgs[p][s], run, resume=(run / "checkpoints").exists())
            runs.append((Path(p).stem, s, cfgs[p][s]))
    order = {p: i for i, p in enumerate(dict.fromkeys(p for p, _, _ in runs))}  # asked presets first
    runs += _kept_runs(out, {(p, s) for p, s, _ in runs}, common)
    runs.sort(key=lambda r: (order.get(r[0], len(order)), r[0], r[1]))
    curves = []
    for p, s, cfg in runs:
        run = out / p / f"seed{s}"
        curve = RunCurve.from_metrics(p, s, read_metrics(run / "metrics.jsonl"))
        curve.guidance = cfg.eval.guidance
        if final_eval is not None:
            curve.full = final_evaluation(run, cfg, final_eval, final_samples, final_seed)
            for g in final_guidance or []:
                curve.by_guidance[f"{g:g}"] = final_evaluation(run, cfg, final_eval, final_samples, final_seed, g)
        curves.append(curve)
    base = None
    if final_eval is not None:  # one starting model, evaluated as every run's final one was, at each guidance
        keys = {json.dumps(_evaluation_key(c.model, c, final_eval, final_samples, final_seed, 0.0))
                for _, _, c in runs}
        if len(keys) == 1:
            cfg0 = runs[0][2]
            guidances = sorted({c.eval.guidance for _, _, c in runs} | set(final_guidance or []))
            base = {f"{g:g}": base_evaluation(out, cfg0, final_eval, final_samples, final_seed, g) for g in guidances}
            base = {g: b for g, b in base.items() if b is not None} or None
    summary = summarise_learning(curves, sorted(thresholds or []), Path(baseline).stem, Path(method).stem, base)
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


# ---- system ---------------------------------------------------------------------------------------------

def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int = 3) -> float:
    """Best of `repeats` wall-clock seconds of fn()."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _largest_batch_rate(make_fn, start: int, cap: int, device: torch.device) -> tuple[float, int]:
    """(seconds per row, batch) at the fastest of batches start, 2*start, ... <= cap that fit."""
    best, best_b, b = float("inf"), start, start
    while b <= cap:
        try:
            fn = make_fn(b)
            fn()  # warm-up
            per_row = _time(fn, device) / b
        except torch.OutOfMemoryError:
            break
        if per_row < best:
            best, best_b = per_row, b
        b *= 2
    return best, best_b


def compute_limit(trainer, cond_rows: int, forward_images: int, update_rows: int, cap: int = 1024) -> dict:
    """Seconds that `forward_images` guided velocity rows (no grad) and `update_rows` forward+backward
    rows (with the reference forward when KL is on) take back to back in the largest batches."""
    model, r = trainer.model, trainer.cfg.rollout
    dev = model.device
    cond_all = trainer.encode(trainer.sampler.prompts[:cond_rows])
    shape = model.latent_shape()

    def rows_cond(b: int):
        return cond_all.index(torch.arange(b) % len(cond_all))

    def fwd(b: int):
        x, t, c = torch.randn(b, *shape, device=dev), torch.full((b,), 0.5, device=dev), rows_cond(b)

        def run() -> None:
            with torch.no_grad(), trainer.policy.autocast():
                model.velocity(x, t, c, r.guidance)
        return run

    def fwd_bwd(b: int):
        x, t, c = torch.randn(b, *shape, device=dev), torch.full((b,), 0.5, device=dev), rows_cond(b)

        def run() -> None:
            model.train()
            with trainer.policy.autocast():
                v = model.velocity(x, t, c, r.guidance)
            v.float().pow(2).mean().backward()
            if getattr(trainer.cfg.algorithm, "kl_beta", 0) > 0:
                with torch.no_grad(), model.reference(), trainer.policy.autocast():
                    model.velocity(x, t, c, r.guidance)
            for p in trainer.params:
                p.grad = None
            model.eval()
        return run

    f_rate, f_batch = _largest_batch_rate(fwd, 16, cap, dev)
    b_rate, b_batch = _largest_batch_rate(fwd_bwd, 16, cap, dev)
    return {"limit_forward_s": f_rate * forward_images, "limit_forward_batch": f_batch,
            "limit_update_s": b_rate * update_rows, "limit_update_batch": b_batch,
            "limit_s": f_rate * forward_images + b_rate * update_rows}


def bench_system(preset: str, iterations: int = 3, overrides: list[str] | None = None,
                 out: str | Path | None = None) -> dict:
    """Time `iterations` training iterations (after one warm-up) phase by phase, and the limit."""
    import tempfile

    from tempflow.algorithms.rollout import PHASES
    from tempflow.training.loop import Trainer

    cfg = load_preset(preset, overrides or [])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp)
        dev = trainer.model.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        trainer.iteration()  # warm-up: caches, allocator, lazy initialisation
        rows = []
        for _ in range(iterations):
            _sync(dev)
            t0 = time.perf_counter()
            row = trainer.iteration()
            _sync(dev)
            row["iteration_s"] = time.perf_counter() - t0
            rows.append(row)
        mean = {k: statistics.fmean(r[k] for r in rows)
                for k in ("iteration_s", "rollout_s", "reward_s", "update_s", "nfe", "images", "update_rows",
                          *PHASES)}
        peak = _peak_memory_mb(dev)  # of training, before the limit's large batches
        nfe_rows = mean["nfe"]  # single-image evaluations, CFG counted twice
        guided = 2 if cfg.rollout.guidance != 1.0 else 1
        limit = compute_limit(trainer, cfg.rollout.prompts_per_iter, int(nfe_rows / guided),
                              int(mean["update_rows"]))
        result = {
            "preset": str(preset), "device": str(dev), "threads": torch.get_num_threads(),
            "iterations": iterations, **mean, "images_per_s": mean["images"] / mean["iteration_s"],
            "peak_memory_mb": peak, **limit,
        }
        result["ratio"] = mean["iteration_s"] / limit["limit_s"]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "system.json").write_text(json.dumps(result, indent=1))
    return result


def system_table(res: dict) -> str:
    order = [("iteration_s", "iteration (s)"), ("main_s", "  rollout: main path"),
             ("branch_s", "  rollout: SDE steps + child completion"), ("decode_s", "  rollout: decoding"),
             ("reward_s", "  reward"), ("update_s", "  update"), ("nfe", "NFE per iteration"),
             ("images_per_s", "images per second"), ("peak_memory_mb", "peak memory (MiB)"),
             ("limit_forward_s", "limit: forward calls, no grad (s)"),
             ("limit_update_s", "limit: forward + backward (s)"), ("limit_s", "limit (s)"),
             ("ratio", "iteration / limit")]
    lines = [f"{res['preset']} on {res['device']} ({res['threads']} threads), mean of {res['iterations']} iterations"]
    for k, label in order:
        if k in res:
            lines.append(f"  {label:<42}{_fmt(float(res[k]), 3):>12}")
    return "\n".join(lines)


# ---- gradient noise -------------------------------------------------------------------------------------

def gradient_noise(gram: torch.Tensor) -> dict:
    """How much of a one-iteration policy gradient is signal, from the Gram matrix (n, n) of n >= 2
    gradients g_i of independent rollouts at the same weights.

    E[g_i . g_j] (i != j) = |G|^2, the squared true gradient; E|g_i|^2 = |G|^2 + noise. So
    signal_share = mean off-diagonal / mean diagonal estimates |G|^2 / E|g|^2, and
    iterations_to_snr1 = noise / |G|^2 is how many iterations' gradients must be averaged before
    their mean holds as much signal as noise (the gradient noise scale, counted in iterations).
    The standard error comes from the spread of the rows' off-diagonal means; `resolved` is false
    while the signal is under two standard errors (more iterations are needed to tell)."""
    g = gram.double()
    n = g.shape[0]
    if n < 2 or g.shape != (n, n):
        raise ValueError("gradient_noise needs a square Gram matrix of at least 2 gradients")
    total = g.diagonal().mean().item()
    off = g[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    signal = off.mean().item()
    se = off.mean(1).std().item() / math.sqrt(n) if n > 2 else float("nan")
    noise = total - signal
    resolved = signal > 2 * se if math.isfinite(se) else False
    share = signal / total if total > 0 else float("nan")
    return {"n": n, "signal": signal, "signal_se": se, "total": total, "signal_share": share,
            "signal_share_se": se / total if total > 0 else float("nan"), "resolved": bool(resolved),
            "iterations_to_snr1": noise / signal if resolved else None}


def preconditioned(grads: torch.Tensor) -> torch.Tensor:
    """The gradients (n, P) as Adam steps them: each coordinate divided by its root mean square over
    the n rollouts, Adam's sqrt(v) once its second moment has settled (coordinates that never move
    stay 0). Their Gram matrix gives the signal share of what the optimizer applies, in which every
    parameter counts alike instead of the few with the largest raw gradients."""
    rms = grads.pow(2).mean(0, dtype=torch.float64).sqrt().to(grads.dtype)  # no float64 copy of all n x P
    return torch.where(rms > 0, grads / rms.clamp_min(torch.finfo(grads.dtype).tiny), 0.0)


def _memory_bytes() -> int:
    """Physical memory of this machine (POSIX), or 2**62 where it cannot be read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 2**62


def bench_gradient(presets: list[str], iterations: int, overrides: list[str] | None = None,
                   out: str | Path | None = None) -> dict:
    """For each preset: `iterations` independent rollouts' policy gradients at the starting weights
    (Trainer.policy_gradient), their signal share and the wall-clock to one unit of signal-to-noise.
    The gradients are kept on the CPU (iterations x trainable parameters floats)."""
    import tempfile

    from tempflow.training.loop import Trainer

    if iterations < 2:
        raise TempflowError("--iterations must be >= 2: the signal is measured between independent gradients")
    results = {}
    for name in presets:
        cfg = load_preset(name, overrides or [])
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, tmp)
            need = iterations * sum(p.numel() for p in trainer.params) * 4
            if need > 0.5 * _memory_bytes():
                raise TempflowError(f"{iterations} gradients of {name}'s trainable parameters need "
                                    f"{need / 2**30:.1f} GiB, more than half this machine's memory: train LoRA "
                                    "adapters (--set lora.enabled=true) or pass fewer --iterations")
            grads, infos = [], []
            for _ in tqdm(range(iterations), desc=f"gradient {name}", unit="it", dynamic_ncols=True):
                grad, info = trainer.policy_gradient()
                grads.append(grad)
                infos.append(info)
        gm = torch.stack(grads)
        res = gradient_noise(gm @ gm.T)
        pre = preconditioned(gm)
        res["adam"] = gradient_noise(pre @ pre.T)
        del pre
        mean = {k: statistics.fmean(i[k] for i in infos) for k in ("images", "trained_rows", "nfe", "seconds")}
        its = res["iterations_to_snr1"]
        res.update({"preset": name, **{f"{k}_per_iter": v for k, v in mean.items()},
                    "seconds_to_snr1": its * mean["seconds"] if its is not None else None,
                    "images_to_snr1": its * mean["images"] if its is not None else None})
        results[name] = res
        del grads, gm
    summary = {"iterations": iterations, "overrides": list(overrides or []), "presets": results,
               "table": gradient_table(results)}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gradient.json").write_text(json.dumps(summary, indent=1))
        (Path(out) / "gradient.md").write_text(summary["table"] + "\n")
    return summary


def gradient_table(results: dict) -> str:
    lines = ["| preset | gradients | s / iteration | images / iteration | signal share | "
             "iterations to SNR 1 | seconds to SNR 1 | signal share, Adam-scaled |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        share = f"{r['signal_share']:.4f} ± {r['signal_share_se']:.4f}"
        adam_share = f"{r['adam']['signal_share']:.4f} ± {r['adam']['signal_share_se']:.4f}"
        unresolved = "not resolved"
        lines.append(f"| {name} | {r['n']} | {r['seconds_per_iter']:.1f} | {r['images_per_iter']:.0f} | {share} | "
                     f"{_fmt(r['iterations_to_snr1'], 1) if r['resolved'] else unresolved} | "
                     f"{_fmt(r['seconds_to_snr1'], 0) if r['resolved'] else unresolved} | {adam_share} |")
    return "\n".join(lines)

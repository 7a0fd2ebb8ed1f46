"""What the runs of `tempflow bench learning` add up to: each run's evaluation curve with the budget
spent at each evaluation, the summary over presets and seeds (final accuracy per category, budget to
first reach accuracy thresholds, method / baseline ratios, gains over the starting model) and its
markdown tables, and the plot of accuracy against iterations, NFE and wall-clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tempflow.bench.numbers import fmt, mean_std


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


AXES = ("iterations", "nfe", "seconds")


def _reach(cs: list[RunCurve], thresholds: list[float]) -> dict:
    """Per threshold and axis: the mean budget of the seeds that first reach it, and how many do."""
    reach: dict = {}
    for th in thresholds:
        reach[str(th)] = {}
        for axis in AXES:
            hits = [x for x in (c.first_reach(th, axis) for c in cs) if x is not None]
            reach[str(th)][axis] = {"mean": mean_std(hits)[0] if hits else None, "reached": len(hits),
                                    "runs": len(cs)}
    return reach


def _final_full(cs: list[RunCurve], base_at) -> dict | None:
    """The final models' evaluation on the whole set over the seeds (None unless every seed has one)."""
    fulls = [c.full for c in cs if c.full]
    if not fulls or len(fulls) != len(cs):
        return None
    fm, fs = mean_std([f["overall"] for f in fulls])
    full = {"mean": fm, "std": fs, "values": [f["overall"] for f in fulls], "n": fulls[0]["n"],
            "samples": fulls[0].get("samples", 1),
            "categories": {k: mean_std([f["per_category"][k] for f in fulls])[0] for k in fulls[0]["per_category"]}}
    if all("pass_at_k_overall" in f for f in fulls):
        full["pass_at_k"] = mean_std([f["pass_at_k_overall"] for f in fulls])[0]
    full["guidance"] = cs[0].guidance
    if base_at(cs[0].guidance) is not None:
        full["gain"] = fm - base_at(cs[0].guidance)["overall"]
    return full


def _by_guidance(cs: list[RunCurve], base_at) -> dict:
    """Per extra guidance: the final models' overall accuracy over the seeds and its gain over the base."""
    by_g = {}
    for g in (cs[0].by_guidance if cs else {}):
        vals = [c.by_guidance[g]["overall"] for c in cs if g in c.by_guidance]
        if len(vals) == len(cs):
            gm, gs = mean_std(vals)
            b = base_at(float(g))
            by_g[g] = {"mean": gm, "std": gs, "gain": gm - b["overall"] if b else None}
    return by_g


def _preset_summary(cs: list[RunCurve], thresholds: list[float], base_at) -> dict:
    finals = [c.overall[-1] for c in cs]
    m, s = mean_std(finals)
    cats = {cat: mean_std([c.categories[cat][-1] for c in cs]) for cat in (cs[0].categories if cs else {})}
    by_g = _by_guidance(cs, base_at)
    return {
        "final_full": _final_full(cs, base_at),
        "final_by_guidance": by_g,
        "best_guidance": max(by_g, key=lambda g: by_g[g]["mean"]) if by_g else None,
        "final_overall": {"mean": m, "std": s, "seeds": [c.seed for c in cs], "values": finals},
        "start_overall": mean_std([c.overall[0] for c in cs])[0],
        "final_categories": {k: {"mean": v[0], "std": v[1]} for k, v in cats.items()},
        "final_budget": {axis: mean_std([c.axis(axis)[-1] for c in cs])[0] for axis in AXES},
        "reach": _reach(cs, thresholds),
    }


def _comparison(ps: dict, curves: list[RunCurve], thresholds: list[float], baseline: str, method: str) -> dict:
    """The method / baseline ratios of the budgets to each threshold, and the wall-clock the method needs
    to reach the accuracy the baseline ends at."""
    ratios: dict = {}
    for th in thresholds:
        ratios[str(th)] = {}
        for axis in AXES:
            a = ps[method]["reach"][str(th)][axis]["mean"]
            b = ps[baseline]["reach"][str(th)][axis]["mean"]
            ratios[str(th)][axis] = (a / b) if a is not None and b else None
    target = ps[baseline]["final_overall"]["mean"]
    per_seed = [c.first_reach(target, "seconds") for c in curves if c.preset == method and c.overall]
    hits = [x for x in per_seed if x is not None]
    base_s = ps[baseline]["final_budget"]["seconds"]
    match = {
        "target": target, "baseline_seconds": base_s, "method_seconds": mean_std(hits)[0] if hits else None,
        "reached": len(hits), "runs": len(per_seed),
        "fraction": (mean_std(hits)[0] / base_s) if hits and base_s else None,
        # the baseline ended where the method started: nothing to catch up, the fraction means nothing
        "trivial": target <= ps[method]["start_overall"] + 1e-9,
    }
    return {"ratios": ratios, "match_baseline": match}


def summarise_learning(curves: list[RunCurve], thresholds: list[float], baseline: str, method: str | None,
                       base: dict | None = None) -> dict:
    """Per preset: final accuracy (mean, std over seeds) overall and per category; budget to first
    reach each threshold (mean over the seeds that reach it, and how many do); ratios method/baseline.
    Also: the accuracy the baseline ends at, and the wall-clock the method needs to reach it.
    base: the starting model's evaluation summary, drawn as the final models' were (gains are
    measured from it), or {guidance: summary} when the presets are evaluated at several guidances."""
    bases = base if base is None or "overall" not in base else {"": base}  # "": the base at every guidance

    def base_at(g: float) -> dict | None:
        return None if bases is None else bases.get("", bases.get(f"{g:g}"))

    first = next((c for c in curves if c.full), None)
    out: dict = {"presets": {}, "thresholds": thresholds, "baseline": baseline, "method": method,
                 "base_full": base_at(first.guidance) if first else base_at(0.0),
                 "base_by_guidance": {g: b["overall"] for g, b in (bases or {}).items() if g}}
    for p in dict.fromkeys(c.preset for c in curves):
        out["presets"][p] = _preset_summary([c for c in curves if c.preset == p and c.overall], thresholds, base_at)
    if baseline in out["presets"] and method in out["presets"]:
        out.update(_comparison(out["presets"], curves, thresholds, baseline, method))
    return out


def learning_table(summary: dict) -> str:
    """Markdown tables of a learning summary."""
    ps = summary["presets"]
    cats = list(next(iter(ps.values()))["final_categories"]) if ps else []
    head = "| preset | start | final overall | " + " | ".join(cats) + " | iterations | NFE | seconds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p, s in ps.items():
        f = s["final_overall"]
        cells = [f"{fmt(s['start_overall'])}", f"{fmt(f['mean'])} ± {fmt(f['std'])}"]
        cells += [fmt(s["final_categories"][c]["mean"]) for c in cats]
        b = s["final_budget"]
        cells += [fmt(b["iterations"], 0), fmt(b["nfe"], 0), fmt(b["seconds"], 0)]
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
            cells = [fmt(base["overall"]), "-",
                     *([fmt(base.get("pass_at_k_overall"))] if with_pass else []),
                     *(fmt(base["per_category"].get(c)) for c in fcats), f"{first['guidance']:g}"]
            lines.append("| base | " + " | ".join(cells) + " |")
        for p, f in fulls.items():
            gain = f"{f['gain']:+.3f}" if f.get("gain") is not None else "-"
            cells = [f"{fmt(f['mean'])} ± {fmt(f['std'])}", *([gain] if base else []),
                     *([fmt(f["pass_at_k"])] if with_pass else []), *(fmt(f["categories"][c]) for c in fcats),
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
                lines.append(f"| {p} | {th} | {fmt(it['mean'], 0)} | {fmt(nf['mean'], 0)} | "
                             f"{fmt(sec['mean'], 0)} ({sec['reached']}/{sec['runs']}) |")
    if "ratios" in summary:
        lines += ["", f"Ratio of budgets {summary['method']} / {summary['baseline']} to reach a threshold:", "",
                  "| threshold | iterations | NFE | seconds |", "|---|---|---|---|"]
        for th, r in summary["ratios"].items():
            lines.append(f"| {th} | {fmt(r['iterations'], 2)} | {fmt(r['nfe'], 2)} | {fmt(r['seconds'], 2)} |")
        mb = summary["match_baseline"]
        ends = f"{summary['baseline']} ends at {fmt(mb['target'])} after {fmt(mb['baseline_seconds'], 0)} s"
        if mb.get("trivial"):
            lines += ["", f"{ends}, not above where {summary['method']} starts "
                          f"({fmt(summary['presets'][summary['method']]['start_overall'])}): there is nothing to "
                          "catch up, so the time to match it says nothing on this budget."]
        else:
            lines += ["", f"{ends}; {summary['method']} first reaches it after {fmt(mb['method_seconds'], 0)} s "
                          f"({mb['reached']}/{mb['runs']} seeds; fraction of the baseline's time: "
                          f"{fmt(mb['fraction'], 2)})."]
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
        lines.append("| base | " + " | ".join(fmt(base.get(g)) for g in gs) + f" | {best or '-'} |")
    for p, s in ps.items():
        cells = []
        for g in gs:
            e = s["final_by_guidance"].get(g)
            gain = f" ({e['gain']:+.3f})" if e and e.get("gain") is not None else ""
            cells.append(f"{fmt(e['mean'])} ± {fmt(e['std'])}{gain}" if e else "-")
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

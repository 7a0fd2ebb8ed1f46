"""The reward curve a person looks at: reward and evaluation accuracy against step and wall-clock."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def curve_figure(rows: list[dict], title: str = "") -> Figure:
    """Two by two: reward and eval_overall against step (top) and training wall-clock (bottom). The
    divergence warnings of the run (rows with "warnings") are dashed red lines, labelled with their kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "reward_mean" in r and r.get("reward_mean") is not None]
    evals = [r for r in rows if "eval_overall" in r]
    warned = [r for r in rows if r.get("warnings")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (key, label) in enumerate([("reward_mean", "train reward (mean)"), ("eval_overall", "eval accuracy")]):
        src = train if key == "reward_mean" else evals
        for row, (xkey, xlabel) in enumerate([("step", "iteration"), ("time_s", "training wall-clock (s)")]):
            ax = axes[row][col]
            ax.plot([r.get(xkey, 0) for r in src], [r[key] for r in src], marker="o" if col else None, ms=3)
            for r in warned:
                ax.axvline(r.get(xkey, 0), color="tab:red", ls="--", lw=1, alpha=0.7)
                if col == 0:
                    ax.annotate(", ".join(r["warnings"]), (r.get(xkey, 0), 1), xycoords=("data", "axes fraction"),
                                rotation=90, va="top", ha="right", fontsize=7, color="tab:red")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curve(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """`curve_figure` written to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = curve_figure(rows, title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

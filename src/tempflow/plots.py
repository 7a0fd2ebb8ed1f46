"""The reward curve a person looks at: reward and evaluation accuracy against step and wall-clock."""

from __future__ import annotations

from pathlib import Path


def plot_curve(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Two by two: reward and eval_overall against step (top) and training wall-clock (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "reward_mean" in r and r.get("reward_mean") is not None]
    evals = [r for r in rows if "eval_overall" in r]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (key, label) in enumerate([("reward_mean", "train reward (mean)"), ("eval_overall", "eval accuracy")]):
        src = train if key == "reward_mean" else evals
        for row, (xkey, xlabel) in enumerate([("step", "iteration"), ("time_s", "training wall-clock (s)")]):
            ax = axes[row][col]
            ax.plot([r.get(xkey, 0) for r in src], [r[key] for r in src], marker="o" if col else None, ms=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

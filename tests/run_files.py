"""Reading a run folder in tests: metrics without timings, the newest checkpoint's step."""

from pathlib import Path

from tempflow.training.run import TIMING_KEYS, read_metrics


def metric_rows(run: str | Path) -> list[dict]:
    """metrics.jsonl rows less the wall-clock timings, which differ between otherwise equal runs."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(Path(run) / "metrics.jsonl")]


def latest_step(run: str | Path) -> int:
    """Step of the newest complete checkpoint, -1 before the first."""
    latest = Path(run) / "checkpoints" / "latest"
    return int(latest.read_text().split("_")[1]) if latest.is_file() else -1

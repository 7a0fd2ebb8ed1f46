"""Learning-rate schedules over a run's budget (iterations, wall-clock or model calls).

The schedule follows whichever budget binds first, so a 30-minute run decays over its 30 minutes
whatever its iteration count says. Both functions are pure: a resumed run, which restores step,
elapsed time and model calls, continues the schedule where it stopped.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def budget_fraction(step: int, iterations: int, elapsed_s: float = 0.0, max_minutes: float = 0.0,
                    nfe: int = 0, max_nfe: int = 0) -> float:
    """How much of the run's budget is spent, in [0, 1]: the largest of step / iterations,
    elapsed / max_minutes and nfe / max_nfe (a limit of 0 is no limit)."""
    parts = [step / iterations if iterations > 0 else 0.0]
    if max_minutes > 0:
        parts.append(elapsed_s / (max_minutes * 60.0))
    if max_nfe > 0:
        parts.append(nfe / max_nfe)
    return min(1.0, max(0.0, *parts))


def lr_factor(fraction: float, schedule: str = "constant", warmup: float = 0.0, final: float = 0.0) -> float:
    """Multiplier of the peak learning rate at `fraction` of the budget: a linear warm-up from 0 over
    the first `warmup` of the budget, then constant, or a linear or cosine decay to `final` times the
    peak at the end of the budget."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    f = min(1.0, max(0.0, fraction))
    if warmup > 0 and f < warmup:
        return f / warmup
    if schedule == "constant":
        return 1.0
    d = (f - warmup) / (1.0 - warmup) if warmup < 1.0 else 1.0  # progress through the decay
    shape = 1.0 - d if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * d))
    return final + (1.0 - final) * shape

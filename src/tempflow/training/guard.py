"""Divergence guards: non-finite weights never kept or saved, and warnings for a run going wrong.

- `first_non_finite`: the name of the first tensor holding NaN or inf (checkpoints and model folders
  are checked with it before they are written and when they are read).
- `StepGuard`: keeps what an optimizer step changes (the trained weights and the optimizer's state),
  so that a step whose weights come out non-finite is undone.
- `divergence_warnings`: the finite signs of divergence, read from the run's metric rows: the reward
  collapsing (its windowed mean far below its best) and a jump of the KL or the gradient norm.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from tempflow.errors import TempflowError


class RunStopped(TempflowError):
    """The run cannot usefully go on (it diverged, its rewards stayed non-finite, the disk is full);
    the newest checkpoint is the last good state."""


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor with a NaN or infinite value, or None."""
    for name, t in named:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


def non_finite_in_files(folder: Path) -> str | None:
    """'FILE: TENSOR' of the first tensor with a NaN or infinite value in the safetensors files under
    `folder` (read one tensor at a time), or None."""
    from safetensors import safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if first_non_finite([(key, f.get_tensor(key))]) is not None:
                    return f"{path.relative_to(folder)}: {key}"
    return None


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of `tensors` is finite, with one fused norm (a NaN or inf anywhere makes it
    non-finite; finite float32 weights do not overflow it)."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=2.0, foreach=None).float()))


class StepGuard:
    """Undo an optimizer step: `keep()` before the step copies the trained weights and the optimizer's
    state tensors into buffers kept for the run (allocated once, on their device), `undo()` puts them
    back. Costs one copy of the trained weights and of the optimizer state (for AdamW 3x the trained
    weights: nothing for LoRA, much for full fine-tuning, where guard.rollback=false turns it off)."""

    def __init__(self, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> None:
        self.params, self.opt = params, opt
        self._buffers: list[torch.Tensor] = []
        self._had_state: list[bool] = []

    def _tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [p.data for p in self.params]
        for p in self.params:
            st = self.opt.state.get(p, {})
            out += [st[k] for k in sorted(st) if torch.is_tensor(st[k])]
        return out

    @torch.no_grad()
    def keep(self) -> None:
        tensors = self._tensors()
        if [b.shape for b in self._buffers] != [t.shape for t in tensors]:  # first step, or state just created
            self._buffers = [t.detach().clone() for t in tensors]
        else:
            torch._foreach_copy_(self._buffers, tensors)
        self._had_state = [p in self.opt.state and bool(self.opt.state[p]) for p in self.params]

    @torch.no_grad()
    def undo(self) -> None:
        kept = iter(self._buffers)
        for p in self.params:
            p.data.copy_(next(kept))
        for p, had in zip(self.params, self._had_state):
            st = self.opt.state.get(p, {})
            if not had:  # the step created the state: remove it
                self.opt.state.pop(p, None)
                continue
            for k in sorted(st):
                if torch.is_tensor(st[k]):
                    st[k].copy_(next(kept))


@dataclass
class Alert:
    step: int
    kind: str  # reward_collapse | kl_spike | grad_norm_spike
    message: str


def _windowed(values: list[float], window: int) -> float:
    vals = [v for v in values[-window:] if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _collapsed(rows: list[dict], window: int, drop: float) -> tuple[bool, float, float]:
    """(collapsed, windowed reward mean now, its best so far): the windowed mean has fallen more than
    `drop` reward standard deviations (the windowed mean of reward_std) below its best."""
    rewards = [r.get("reward_mean") for r in rows]
    if len(rewards) < 2 * window:
        return False, math.nan, math.nan
    means = [_windowed(rewards[: i + 1], window) for i in range(window - 1, len(rewards))]
    now, best = means[-1], max((m for m in means if math.isfinite(m)), default=math.nan)
    std = _windowed([r.get("reward_std") for r in rows], window)
    if not (math.isfinite(now) and math.isfinite(best) and math.isfinite(std)) or std <= 0:
        return False, now, best
    return best - now > drop * std, now, best


def _spiked(rows: list[dict], key: str, window: int, factor: float) -> tuple[bool, float, float]:
    """(spiked, value now, median of the `window` values before it): the value is over `factor` times
    the median (and the median is positive)."""
    values = [r.get(key) for r in rows]
    if len(values) <= window or values[-1] is None or not math.isfinite(values[-1]):
        return False, math.nan, math.nan
    before = [v for v in values[-window - 1:-1] if v is not None and math.isfinite(v)]
    if len(before) < window // 2 + 1:
        return False, values[-1], math.nan
    median = statistics.median(before)
    return median > 0 and values[-1] > factor * median, values[-1], median


def divergence_warnings(rows: list[dict], window: int = 10, reward_drop: float = 1.0,
                        spike: float = 10.0) -> list[Alert]:
    """The warnings raised by the newest of the run's training rows (`rows`, oldest first): a condition
    warns on the row where it starts, not again while it lasts. reward_drop = 0 or spike = 0 turns that
    check off."""
    if not rows:
        return []
    step, out = rows[-1].get("step", len(rows)), []
    if reward_drop > 0:
        now, before = _collapsed(rows, window, reward_drop), _collapsed(rows[:-1], window, reward_drop)
        if now[0] and not before[0]:
            out.append(Alert(step, "reward_collapse", f"the reward is collapsing: its mean over the last {window} "
                                                        f"iterations is {now[1]:.4g}, down from {now[2]:.4g}"))
    if spike > 0:
        for key in ("kl", "grad_norm"):
            hit = _spiked(rows, key, window, spike)
            if hit[0] and not _spiked(rows[:-1], key, window, spike)[0]:
                out.append(Alert(step, f"{key}_spike", f"{key} jumped to {hit[1]:.4g}, over {spike:g}x its median "
                                                          f"{hit[2]:.4g} of the last {window} iterations"))
    return out

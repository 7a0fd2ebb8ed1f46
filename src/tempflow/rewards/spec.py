"""Reward specs: several rewards, each normalised its own way, combined into one weighted sum.

Spec syntax (one string, as in a config file or ``--set reward=...``)::

    spec    := term ("," term)*
    term    := name ["(" option ("," option)* ")"] [":" weight]
    option  := key "=" value

    shapes                                          one reward, weight 1, raw scores
    pickscore:1.0,jpeg_compressibility:0.5          a weighted sum of raw scores
    pickscore(norm=running):1,aesthetic(norm=batch, weights=/ckpt/sac.pth):0.5

``weight`` defaults to 1 and may be negative. The option ``norm`` picks the normalisation of that
reward before weighting; every other option is a keyword argument of the reward's factory (values
are read as int, float, true/false/none, otherwise kept as strings, so they cannot contain commas
or parentheses; pass such values as keyword arguments of ``make_reward`` instead).

Normalisations (``NORMS``):

- ``none``: the raw score.
- ``batch``: z-score over the finite scores of this call, ``(x - mean) / (std + 1e-6)`` with the
  population std.
- ``running``: z-score with the mean and std of every finite score seen so far, this call's
  included (the statistics are updated first). Its state (count, mean, sum of squared deviations)
  is in ``WeightedReward.state_dict()`` so a resumed run continues with the same statistics.

NaN or infinite scores are never replaced: they are left out of the statistics and stay NaN or
infinite in the sum, where the trainer reports and skips them.

Non-finite images score NaN, for every reward: an image with a NaN or infinite pixel is not shown to
any term (each is called with the finite images only) and its raw score is NaN in every term
(``score_finite``). No reward quantises or clamps such an image into a finite score, and a batch
scores its finite images exactly as they would score alone.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tempflow.errors import TempflowError

RewardFn = Callable[[torch.Tensor, list[str], list[dict]], torch.Tensor]  # images, prompts, metadata -> (B,)
NORMS = ("none", "batch", "running")
EPS = 1e-6  # added to the std of the z-score normalisations
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class RewardSpec:
    """One term of a reward spec."""

    name: str  # registered reward name
    weight: float = 1.0  # factor of this reward in the sum
    norm: str = "none"  # none | batch | running
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the reward's factory


def _split_top(text: str) -> list[str]:
    """Split at commas that are outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise TempflowError(f"unbalanced ')' in reward spec {text!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise TempflowError(f"unbalanced '(' in reward spec {text!r}")
    return [*parts, text[start:]]


def _value(text: str) -> Any:
    """An option value: int, float, bool, None, or the string itself (quotes removed)."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def _options(text: str, term: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(str.strip, _split_top(text)):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise TempflowError(f"bad option {item.strip()!r} in reward term {term!r}; write key=value")
        out[key] = _value(val.strip())
    return out


def _term(text: str) -> RewardSpec:
    term = text.strip()
    m = re.fullmatch(r"([^():,\s]+)\s*(?:\((.*)\))?\s*(?::\s*([^()]*))?", term)
    if not term or not m or not _NAME.fullmatch(m.group(1)):
        raise TempflowError(f"bad reward term {term!r}; write name, name:weight or name(key=value, ...):weight")
    name, opts, weight = m.group(1), _options(m.group(2) or "", term), m.group(3)
    try:
        w = 1.0 if weight is None else float(weight)
    except ValueError:
        raise TempflowError(f"bad weight {weight.strip()!r} in reward term {term!r}; write a number") from None
    if not math.isfinite(w):
        raise TempflowError(f"the weight of reward term {term!r} must be finite")
    norm = opts.pop("norm", "none")
    if norm not in NORMS:
        raise TempflowError(f"unknown norm {norm!r} in reward term {term!r}; use one of: {', '.join(NORMS)}")
    return RewardSpec(name, w, norm, opts)


def parse_reward_spec(spec: str) -> list[RewardSpec]:
    """Parse a reward spec (grammar in the module docstring) into its terms, in order.

    Names are checked only for syntax and uniqueness here; ``make_reward`` checks them against the
    registry.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TempflowError("empty reward spec; name a reward, e.g. 'shapes' or 'pickscore:1,aesthetic:0.5'")
    terms = [_term(t) for t in _split_top(spec)]
    names = [t.name for t in terms]
    for n in names:
        if names.count(n) > 1:
            raise TempflowError(f"reward {n!r} appears twice in the reward spec {spec!r}; name each once")
    return terms


# ---- non-finite images -----------------------------------------------------------------------------


def finite_images(images: torch.Tensor) -> torch.Tensor:
    """(B,) bool on the CPU: True where every pixel of image b is finite (the reward layer's one rule)."""
    return torch.isfinite(images.detach()).reshape(images.shape[0], -1).all(dim=1).cpu()


class FiniteRows:
    """The images of a call that a reward is shown: those whose every pixel is finite.

    ``images``, ``prompts`` and ``metadata`` hold only those rows (the metadata dicts are the
    caller's own, so what a reward writes into them arrives); ``scatter`` puts their scores back in
    place, NaN for the others.
    """

    def __init__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict], name: str | None = None
                 ) -> None:
        count = images.shape[0] if images.ndim else 0
        if count != len(prompts) or len(metadata) != len(prompts):
            who = f"reward {name!r}" if name else "the reward"
            raise TempflowError(f"{who} got {count} images, {len(prompts)} prompts and {len(metadata)} "
                                "metadata dicts; give one of each per image")
        self.total, self.name = count, name
        self.rows = finite_images(images).nonzero().flatten().tolist() if count else []
        if len(self.rows) < count:
            images = images[torch.tensor(self.rows, dtype=torch.long, device=images.device)]
            prompts, metadata = [prompts[i] for i in self.rows], [metadata[i] for i in self.rows]
        self.images, self.prompts, self.metadata = images, prompts, metadata

    def score(self, fn: RewardFn, name: str | None = None) -> torch.Tensor:
        """(B,) float32 on the CPU: ``fn`` on the finite rows, NaN for the others (``fn`` is not called
        when there are none)."""
        out = torch.full((self.total,), float("nan"), dtype=torch.float32)
        if not self.rows:
            return out
        raw = torch.as_tensor(fn(self.images, self.prompts, self.metadata)).detach().float().cpu().reshape(-1)
        if raw.shape[0] != len(self.rows):
            raise TempflowError(f"reward {name or self.name or 'reward'!r} returned {raw.shape[0]} scores for "
                                f"{len(self.rows)} images")
        out[self.rows] = raw
        return out


def score_finite(fn: RewardFn, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None,
                 name: str | None = None) -> torch.Tensor:
    """(B,) float32 on the CPU: ``fn`` on the images whose every pixel is finite, NaN for the others,
    which ``fn`` never sees."""
    metadata = metadata if metadata is not None else [{} for _ in prompts]
    return FiniteRows(images, prompts, metadata, name).score(fn)


# ---- normalisation -----------------------------------------------------------------------------


class Normalizer(Protocol):
    def __call__(self, x: torch.Tensor, update: bool = True) -> torch.Tensor: ...


class Identity:
    """norm=none."""

    def __call__(self, x: torch.Tensor, update: bool = True) -> torch.Tensor:
        return x


class BatchNorm:
    """norm=batch: z-score over the finite entries of this batch."""

    def __call__(self, x: torch.Tensor, update: bool = True) -> torch.Tensor:
        x64 = x.double()
        finite = x64[torch.isfinite(x64)]
        if finite.numel() == 0:
            return x
        return ((x64 - finite.mean()) / (finite.std(unbiased=False) + EPS)).float()


class RunningNorm:
    """norm=running: z-score with the mean and std of all finite scores seen so far (float64)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        """Merge a batch into the statistics (the parallel form of Welford's update)."""
        finite = x.double()[torch.isfinite(x)]
        n = finite.numel()
        if n == 0:
            return
        b_mean = float(finite.mean())
        b_m2 = float(((finite - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta * delta * self.count * n / total
        self.count = total

    def __call__(self, x: torch.Tensor, update: bool = True) -> torch.Tensor:
        if update:
            self.update(x)
        if self.count == 0:
            return x
        std = math.sqrt(self.m2 / self.count)
        return ((x.double() - self.mean) / (std + EPS)).float()

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def make_normalizer(norm: str) -> Normalizer:
    return {"none": Identity, "batch": BatchNorm, "running": RunningNorm}[norm]()


# ---- the combination -----------------------------------------------------------------------------


class WeightedReward:
    """A RewardFn: ``sum_i weight_i * norm_i(reward_i(images, prompts, metadata))``, (B,) float32 on CPU.

    Each term's raw score is written into every metadata dict as ``meta["rewards"][name]`` (a
    float) so the trainer can log each reward alone.
    """

    def __init__(self, terms: list[tuple[RewardSpec, RewardFn]]) -> None:
        self.specs = [s for s, _ in terms]
        self.fns = [f for _, f in terms]
        self.norms = {s.name: make_normalizer(s.norm) for s in self.specs}
        self.update_stats = True  # False inside frozen()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def image_size(self) -> int | None:
        """The side of the images the combination is made for: the largest its terms declare (their
        ``image_size`` attribute), or None when a term declares none (it takes any size)."""
        sizes = [getattr(fn, "image_size", None) for fn in self.fns]
        return None if any(s is None for s in sizes) else max(sizes)  # type: ignore[type-var]

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        return self.combine(self.raw_scores(images, prompts, metadata))

    def raw_scores(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
                   ) -> torch.Tensor:
        """(B, K) raw score of each term, float32 on CPU, NaN in every term for an image with a
        non-finite pixel (``score_finite``). Scoring and combining are separate steps so that several
        processes can each score their own images and combine the gathered scores."""
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        shown = FiniteRows(images, prompts, metadata)  # every term sees the finite images only
        cols = []
        for spec, fn in zip(self.specs, self.fns):
            raw = shown.score(fn, spec.name)  # (B,), NaN for an image with a non-finite pixel
            for meta, value in zip(metadata, raw.tolist()):
                meta.setdefault("rewards", {})[spec.name] = value
            cols.append(raw)
        return torch.stack(cols, 1)

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """(B,) weighted sum of the normalised terms of `raw` (B, K); running statistics are updated
        (outside frozen()) with this batch."""
        total = torch.zeros(raw.shape[0], dtype=torch.float32)
        for k, spec in enumerate(self.specs):
            total += spec.weight * self.norms[spec.name](raw[:, k], update=self.update_stats)
        return total

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Score without updating running statistics (evaluation); they are still applied."""
        before, self.update_stats = self.update_stats, False
        try:
            yield
        finally:
            self.update_stats = before

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The running statistics, per reward name (empty when no term uses norm=running)."""
        return {name: n.state_dict() for name, n in self.norms.items() if isinstance(n, RunningNorm)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        running = {name for name, n in self.norms.items() if isinstance(n, RunningNorm)}
        if set(state) != running:
            raise TempflowError(f"saved reward statistics are for {sorted(state)} but this reward spec keeps "
                                f"running statistics for {sorted(running)}; resume with the same reward spec")
        for name, s in state.items():
            self.norms[name].load_state_dict(s)  # type: ignore[union-attr]

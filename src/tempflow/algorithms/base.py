"""The algorithm seam: what an algorithm owns and what the trainer lends it.

An algorithm owns three things: its typed config section (`algorithm:` in a preset, chosen by
`algorithm.name`), its rollout (what is sampled and what is kept for the update, a `Batch`), and its
loss on a minibatch of that batch's rows. It may keep state of its own (an old policy, a running
estimate), saved in every checkpoint.

The trainer keeps the generic loop: prompts, units and their seeds, scoring and gathering, group
advantages, minibatches, the optimizer, the evaluation EMA, logging and checkpoints. It lends the
algorithm a `Policy`: the model and the three ways of calling it (sampling, training, reference).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tempflow.models.base import Conditioning
from tempflow.sampling import initial_noise

if TYPE_CHECKING:
    from tempflow.training.config import TrainConfig

GROUPINGS = ("prompt", "prompt_step", "seed_step")  # advantage.group_by: the image keys a group shares


@dataclass
class AlgorithmConfig:
    """Base of every algorithm's config section. `name` picks the algorithm: a registered name or a
    dotted path `package.module:Class`."""

    name: str = ""

    def check(self, cfg: TrainConfig) -> None:
        """Checks that involve other sections of the config (called once the whole config is read)."""


@dataclass
class Units:
    """The units a process rolls out: one initial noise each, (prompt, seed slot) in the iteration."""

    prompt: torch.Tensor  # (n,) row of the iteration's prompt list (and of its conditioning)
    slot: torch.Tensor  # (n,) index of the seed within its prompt
    seed: list[int]  # n seeds: every random draw of the unit derives from it
    prompt_seed: list[int]  # n seeds: the first seed of the unit's prompt (the same for a prompt's units)

    def __len__(self) -> int:
        return len(self.seed)

    def noise(self, shape: tuple[int, ...], device: torch.device | str = "cpu", shared: bool = False) -> torch.Tensor:
        """(n, *shape) initial noise from each unit's seed, or (shared) from its prompt's first seed."""
        return initial_noise(shape, self.prompt_seed if shared else self.seed, device)


class SharedRows:
    """N rows stored as S <= N distinct rows and an index: row i is values[index[i]].

    The children of one branch point start from one state; a batch keeps that state once and an index
    per child instead of a copy per child. Indexing (`rows[idx]`) gives a plain tensor, as a batch
    field's would, and a torch function given a SharedRows sees the full (N, ...) tensor."""

    def __init__(self, values: torch.Tensor, index: torch.Tensor) -> None:
        self.values = values  # (S, ...) on any device
        self.index = index.long().cpu()  # (N,) rows of `values`

    def __getitem__(self, rows: Any) -> torch.Tensor:
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu()
        return self.values[self.index[rows]]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.values.shape[1:]))

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def full(self) -> torch.Tensor:
        """The (N, ...) tensor, one copy per row."""
        return self.values[self.index]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def expand(a: Any) -> Any:
            if isinstance(a, SharedRows):
                return a.full()
            return type(a)(expand(b) for b in a) if isinstance(a, (list, tuple)) else a

        return func(*expand(args), **{k: expand(v) for k, v in (kwargs or {}).items()})


@dataclass
class Batch:
    """What a rollout keeps: I images with their keys, and N trained rows, each taking the advantage of
    one image. Rows and images are ordered unit by unit, so the batches of several processes, each
    rolling out a contiguous range of units, concatenate into the batch of one process."""

    images: torch.Tensor  # (I, 3, H, W) in [0, 1]
    image_prompt: torch.Tensor  # (I,) prompt row of each image
    image_seed: torch.Tensor  # (I,) seed slot of each image
    image_step: torch.Tensor  # (I,) branch point of each image (-1: a whole trajectory)
    row_image: torch.Tensor  # (N,) the image whose advantage each row receives
    nfe: int  # single-image model evaluations of the rollout (CFG counts twice)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per rollout phase

    def __len__(self) -> int:
        return self.row_image.shape[0]

    def state_keys(self) -> torch.Tensor:
        """(N, 3) integer keys, the same on every process: rows with equal keys start from one state
        and share one model call in the update. By default every row is a state of its own."""
        image = self.row_image.cpu()
        order = torch.arange(len(image))
        first = torch.zeros(int(image.max()) + 1 if len(image) else 0, dtype=torch.long).scatter_reduce(
            0, image, order, "amin", include_self=False)
        return torch.stack([self.image_prompt[image].cpu(), self.image_seed[image].cpu() * 1_000_003
                            + self.image_step[image].cpu() + 1, order - first[image]], 1)


class Policy:
    """The model being trained, as an algorithm calls it.

    - `velocity`: sampling (no gradient), in chunks of at most `max_batch` rows, conditioning indexed
      per chunk so that a rollout never holds one conditioning row per image;
    - `train_velocity`: the forward pass whose gradient trains, through accelerate's wrapper (its
      hooks average the gradients over processes); one call per minibatch;
    - `reference_velocity`: the frozen base (LoRA adapters off, or the frozen copy);
    - `holding(tensors)`: within it the trained parameters hold other values (an old policy).
    All under the run's mixed precision; velocities come back in float32."""

    def __init__(self, model: Any, wrapped: torch.nn.Module, params: list[torch.nn.Parameter], precision: str,
                 max_batch: int) -> None:
        self.model, self.wrapped, self.params = model, wrapped, params
        self.precision, self.max_batch = precision, max_batch
        self._sigmas: dict[int, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The model's own sigma grid (num_steps + 1,), from 1 to 0, on the CPU."""
        if num_steps not in self._sigmas:
            self._sigmas[num_steps] = self.model.sigmas(num_steps).float().cpu()
        return self._sigmas[num_steps]

    def forwards_per_row(self, guidance: float) -> int:
        """Transformer forwards per velocity row: 2 with classifier-free guidance (a doubled batch), 1
        without it or for models that take guidance as an input (FLUX.1-dev: ``cfg_batch = False``)."""
        return 1 if guidance == 1.0 or not getattr(self.model, "cfg_batch", True) else 2

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, ...) float32 velocity at x (B, ...) and times t (B,) or (); `rows` (B,) picks each row's
        conditioning from `cond` (None: cond has one row per x)."""
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])
        out = []
        with self.autocast():
            for i in range(0, x.shape[0], self.max_batch):
                part = slice(i, i + self.max_batch)
                c = cond.index(part if rows is None else rows[part].to(cond.tokens.device))
                out.append(self.model.velocity(x[part], t[part], c, guidance).float())
        return torch.cat(out) if out else x.new_zeros(x.shape).float()

    def train_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
        """The trained velocity (B, ...), with its gradient; cond has one row per x."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        with self.autocast():
            return self.wrapped(x, t, cond.tokens, cond.pooled, guidance).float()

    @torch.no_grad()
    def reference_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float,
                           rows: torch.Tensor | None = None) -> torch.Tensor:
        """`velocity` of the frozen base model."""
        with self.model.reference():
            return self.velocity(x, t, cond, guidance, rows)

    def snapshot(self) -> list[torch.Tensor]:
        """A detached copy of the trained parameters."""
        return [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def holding(self, values: list[torch.Tensor]) -> Iterator[None]:
        """Within this context the trained parameters hold `values`; they are restored after it."""
        backup = self.snapshot()
        with torch.no_grad():
            torch._foreach_copy_(self.params, values)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, backup)


class Algorithm:
    """Base of every algorithm. A subclass sets `name`, `Config` (its section's dataclass) and
    `metrics` (the names of the values its `loss` reports), and defines `rollout` and `loss`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    metrics: ClassVar[tuple[str, ...]] = ()
    groupings: ClassVar[tuple[str, ...]] = GROUPINGS  # advantage.group_by values this algorithm can use

    def __init__(self, cfg: TrainConfig, policy: Policy) -> None:
        self.run, self.cfg, self.policy = cfg, cfg.algorithm, policy

    def rollout(self, units: Units, cond: Conditioning, iteration: int, rng: random.Random) -> Batch:
        """Sample this process's units (cond: one row per prompt of the iteration, indexed by
        units.prompt). `rng` is shared by every process: draws from it (branch points, a window) are
        the same everywhere. A rollout must not change the algorithm's state (`observe` and
        `after_update` do): an iteration whose reward fails is undone."""
        raise NotImplementedError

    def loss(self, batch: Batch, idx: torch.Tensor, adv: torch.Tensor, cond: Conditioning
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean loss over rows idx of `batch`, {metric: detached value}) with adv (len(idx),) their
        advantages. The trained velocity comes from one `policy.train_velocity` call."""
        raise NotImplementedError

    def keeps_flat_groups(self) -> bool:
        """Whether rows of groups without spread (advantage 0) are trained too; by default they carry
        no signal and are skipped."""
        return False

    def observe(self, image_keys: torch.Tensor, rewards: torch.Tensor) -> None:
        """After scoring: the (I, 3) keys and rewards of every process's images."""

    def after_update(self, optimizer_steps: int) -> None:
        """After the iteration's update; `optimizer_steps` counts the run's optimizer steps so far."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON-able values to checkpoint (the same on every process)."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what `state` returned."""

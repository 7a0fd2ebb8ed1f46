"""The training loop: rollout -> score -> advantages -> update, then log, evaluate, checkpoint.

One trainer for every algorithm (tempflow.algorithms: what is sampled and the loss) and every model
that implements the FlowModel protocol plus the fine-tuning methods (prepare_finetune,
trainable_named_parameters, reference, merged). The trainer never asks which algorithm it runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tempflow.algorithms import Batch, Policy, Units, algorithm_class
from tempflow.algorithms.rollout import state_order
from tempflow.config import to_yaml
from tempflow.errors import TempflowError
from tempflow.math.advantages import Advantages, group_advantages, group_ids
from tempflow.math.schedule import budget_fraction, lr_factor
from tempflow.models import load_model
from tempflow.models.base import Conditioning
from tempflow.prompts import load_prompts, prompt_strata
from tempflow.rewards import make_reward
from tempflow.training import checkpoint as ckpt
from tempflow.training.config import TrainConfig
from tempflow.training.distributed import Dist, PolicyModule, rank_rng_state, unit_range
from tempflow.training.ema import ema_update
from tempflow.training.guard import RunStopped, StepGuard, all_finite

COND_CACHE_BYTES = 2**30  # text conditioning kept on the model's device; past it, older prompts are re-encoded


class PromptSampler:
    """Draws prompts in shuffled passes; its position is part of a checkpoint.

    With several strata (the categories of a prompt set, say), every round of S draws takes one prompt
    from each of the S strata, in an order shuffled per round, and each stratum is drawn in shuffled
    passes of its own: the strata are drawn equally often whatever their sizes."""

    def __init__(self, prompts: list[str], seed: int, strata: list[list[int]] | None = None) -> None:
        self.prompts, self.seed = prompts, seed
        self.strata = strata or [list(range(len(prompts)))]
        if any(not s for s in self.strata):
            raise ValueError("every prompt stratum needs at least one prompt")
        self.drawn = 0  # prompts drawn so far
        self.counts = [0] * len(self.strata)  # prompts drawn so far from each stratum
        self._passes: dict[int, tuple[int, list[int]]] = {}  # stratum -> (epoch, its shuffled pass)

    def _order(self, stratum: int, epoch: int) -> list[int]:
        """The shuffled pass `epoch` over a stratum (prompt indices)."""
        if self._passes.get(stratum, (-1,))[0] != epoch:
            order = list(self.strata[stratum])
            random.Random(f"{self.seed}/{stratum}/{epoch}").shuffle(order)
            self._passes[stratum] = (epoch, order)
        return self._passes[stratum][1]

    def _stratum(self) -> int:
        n = len(self.strata)
        if n == 1:
            return 0
        rnd, pos = divmod(self.drawn, n)
        order = list(range(n))
        random.Random(f"{self.seed}/round/{rnd}").shuffle(order)
        return order[pos]

    def next(self, k: int) -> list[str]:
        out = []
        for _ in range(k):
            s = self._stratum()
            epoch, index = divmod(self.counts[s], len(self.strata[s]))
            out.append(self.prompts[self._order(s, epoch)[index]])
            self.counts[s] += 1
            self.drawn += 1
        return out

    def state(self) -> dict:
        return {"drawn": self.drawn, "counts": list(self.counts)}

    def load_state(self, state: dict) -> None:
        if "counts" not in state:  # {"epoch", "index"}: one plain pass, drawn in another order
            raise TempflowError("the checkpoint was written by an older tempflow whose prompt order this one "
                                "cannot continue: start a new run (its final/ model still loads)")
        counts = [int(c) for c in state["counts"]]
        if len(counts) != len(self.strata):
            raise TempflowError(f"the checkpoint drew prompts from {len(counts)} strata, this run has "
                                f"{len(self.strata)}: resume with the prompt_balance and prompts it was started with")
        self.drawn, self.counts = int(state["drawn"]), counts


def minibatches_per_step(n: int, grad_accum: int, steps_per_rollout: int = 0) -> list[int]:
    """How many of a pass's n minibatches each optimizer step accumulates: grad_accum each (the last
    step takes what is left), or, with steps_per_rollout = k > 0, n split as evenly as possible into
    min(k, n) steps."""
    if steps_per_rollout:
        k = min(steps_per_rollout, n)
        return [n // k + (i < n % k) for i in range(k)]
    full, rest = divmod(n, grad_accum)
    return [grad_accum] * full + ([rest] if rest else [])


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """The autocast precision of optim.mixed_precision on `device`: "auto" is bf16 where the device
    multiplies in bf16 natively (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX), else "no"
    (emulated bf16 is slower than float32)."""
    if mixed_precision != "auto":
        return mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        try:
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        except AttributeError:  # a torch without these probes: assume emulation
            native = False
        return "bf16" if native else "no"
    return "no"


@dataclass
class UpdateStats:
    metrics: tuple[str, ...] = ()  # the algorithm's own values, logged as minibatch means
    loss: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    grad_norm: list[float] = field(default_factory=list)
    skipped: int = 0
    rolled_back: int = 0  # optimizer steps undone because the weights came out non-finite
    optimizer_steps: int = 0
    update_rows: int = 0  # policy model calls (rows) of the update, all processes: one per state per minibatch

    def summary(self) -> dict:
        def avg(xs: list[float]) -> float:
            return float(sum(xs) / len(xs)) if xs else float("nan")

        out = {"loss": avg(self.loss), **{k: avg(self.values.get(k, [])) for k in self.metrics}}
        if "ratio_mean" in self.metrics:  # the first minibatch's ratio: 1 when the update starts on-policy
            out["ratio_first"] = self.values["ratio_mean"][0] if self.values.get("ratio_mean") else 1.0
        return {**out, "grad_norm": avg(self.grad_norm), "skipped_updates": self.skipped,
                "rolled_back_steps": self.rolled_back, "optimizer_steps": self.optimizer_steps,
                "update_rows": self.update_rows}


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def flat_gradient(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradients held by `params` as one float32 vector on the CPU (a parameter without one: zeros)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten().cpu()
                      for p in params])


class Trainer:
    """Owns the model, optimizer, EMA, RNGs and the run folder; the algorithm owns what is sampled and
    the loss (`self.algorithm`), and calls the model through `self.policy`."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = Dist()  # accelerate's process group; a single process without a launcher
        units = cfg.rollout.prompts_per_iter * cfg.rollout.seeds_per_prompt
        if units < self.dist.world:
            raise TempflowError(f"{self.dist.world} processes share {units} units (prompts_per_iter x "
                                f"seeds_per_prompt) per iteration: every process needs one; raise "
                                f"rollout.prompts_per_iter to {-(-self.dist.world // cfg.rollout.seeds_per_prompt)} "
                                "or launch fewer processes")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.prompts = load_prompts(cfg.prompts)
        self.reward_fn = make_reward(cfg.reward)
        # several processes: each on accelerate's device for it (cuda:LOCAL_RANK, or the CPU)
        self.model = load_model(cfg.model, cfg.model_options, device=str(self.dist.device) if self.dist.world > 1
                                else None)
        self.model.check_prompts(self.prompts)
        torch.manual_seed(cfg.seed)  # adapter initialisation
        self.model.prepare_finetune(cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets),
                                    init=cfg.lora.init)
        self.named = self.model.trainable_named_parameters()
        self.params = [p for _, p in self.named]
        o = cfg.optim
        opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        # accelerate wraps what trains (in DDP when launched on several processes; unchanged alone)
        self.wrapped, self.opt = self.dist.acc.prepare(PolicyModule(self.model, self.params), opt)
        self.ema = [p.detach().clone() for p in self.params]
        self.step_guard = StepGuard(self.params, getattr(self.opt, "optimizer", self.opt)) if cfg.guard.rollback \
            else None
        self.bad_steps = 0  # optimizer steps in a row whose weights came out non-finite
        strata = prompt_strata(self.prompts, cfg.prompt_balance, cfg.prompts)
        self.sampler = PromptSampler(self.prompts, cfg.seed, strata)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # unit seeds (initial noise and SDE noise derive from them)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.optimizer_steps, self.elapsed, self.nfe_total = 0, 0, 0.0, 0
        self.precision = resolve_precision(o.mixed_precision, self.model.device)
        self.policy = Policy(self.model, self.wrapped, self.params, self.precision, cfg.rollout.max_batch)
        self.algorithm = algorithm_class(cfg.algorithm.name)(cfg, self.policy)
        self._cond_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # called with the accumulated gradient (flat_gradient) before each optimizer step clips and applies it
        self.gradient_observer: Callable[[torch.Tensor], None] | None = None

    # ---- set-up helpers ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Text conditioning, cached per prompt (the text encoder is frozen)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if missing:
            c = self.model.encode_prompts(missing)
            row_bytes = c.tokens[0].nbytes + c.pooled[0].nbytes  # SD3: 2.7 MB a prompt, FLUX 4.2 MB (16 bit)
            if (len(self._cond_cache) + len(missing)) * row_bytes > COND_CACHE_BYTES:  # keep this call's prompts
                self._cond_cache = {p: v for p, v in self._cond_cache.items() if p in set(prompts)}
            for i, p in enumerate(missing):
                self._cond_cache[p] = (c.tokens[i], c.pooled[i])
        rows = [self._cond_cache[p] for p in prompts]
        return Conditioning(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within this context the trained parameters hold their EMA."""
        with self.policy.holding(self.ema):
            yield

    # ---- the five phases ----------------------------------------------------------------------------

    def units(self, n_prompts: int) -> Units:
        """This process's share of the iteration's units. Every process draws the same unit seeds, then
        takes units unit_range(n, W, rank) (all of them when alone); units are prompt-major: unit u is
        (prompt u // S, seed slot u % S)."""
        s = self.cfg.rollout.seeds_per_prompt
        n = n_prompts * s
        seeds = torch.randint(0, 2**62, (n,), generator=self.gen).tolist()
        lo, hi = unit_range(n, self.dist.world, self.dist.rank)
        ids = torch.arange(lo, hi)
        return Units(ids // s, ids % s, seeds[lo:hi], [seeds[u - u % s] for u in range(lo, hi)])

    def rollout(self, prompts: list[str]) -> Batch:
        """The algorithm's rollout of this process's units (the same draws of `rng` on every process)."""
        cond = self.encode(prompts)
        units = self.units(len(prompts))
        self.model.eval()
        return self.algorithm.rollout(units, cond, self.step, self.rng)

    def score(self, ro: Batch, prompts: list[str]) -> tuple[torch.Tensor, list[dict]]:
        """(rewards, metadata) of the images of every process, in rank order. Each process scores its
        own images; the raw scores are gathered, then combined (and normalised) over the whole batch."""
        texts = [prompts[int(i)] for i in ro.image_prompt]
        meta = [{"seed": int(s), "step": int(j)} for s, j in zip(ro.image_seed, ro.image_step)]
        fn, error = self.reward_fn, ""
        try:
            raw = fn.raw_scores(ro.images, texts, meta)  # (I, K)
            if raw.shape[0] != len(texts):
                raise TempflowError(
                    f"reward {self.cfg.reward!r} returned {raw.shape[0]} scores for {len(texts)} images")
        except TempflowError as e:  # every process learns of it, so that all stop together
            error = str(e)
        errors = [e for e in self.dist.gather_objects(error) if e]
        if errors:
            raise TempflowError(errors[0])
        raw = self.dist.gather(raw.float().cpu())  # group math on the CPU
        rewards = fn.combine(raw)
        keys = self.image_keys(ro)
        meta = [{"seed": int(k[1]), "step": int(k[2]),
                 **({"rewards": dict(zip(fn.names, r.tolist()))} if len(fn.names) == raw.shape[1] else {})}
                for k, r in zip(keys, raw)]
        return rewards, meta

    def image_keys(self, ro: Batch) -> torch.Tensor:
        """(I, 3) prompt row, seed slot and branch step of the images of every process, in rank order."""
        return self.dist.gather(torch.stack([ro.image_prompt, ro.image_seed, ro.image_step], 1).cpu())

    def advantages(self, ro: Batch, rewards: torch.Tensor) -> Advantages:
        """Group advantages of the images of every process (`rewards` as gathered by score)."""
        k = self.image_keys(ro)
        keys = {"prompt": (k[:, 0],), "prompt_step": (k[:, 0], k[:, 2]), "seed_step": (k[:, 0], k[:, 1], k[:, 2])}
        a = self.cfg.advantage
        return group_advantages(rewards, group_ids(*keys[a.group_by]), a.std, clip=a.clip)

    def _idle_loss(self, cond: Conditioning) -> torch.Tensor:
        """A zero loss through the wrapped model, for a process without rows in a minibatch: its
        backward joins the gradient all-reduce of the others with zero gradients."""
        x = torch.zeros(1, *self.model.latent_shape(), device=self.model.device)
        v = self.policy.train_velocity(x, torch.full((1,), 0.5), cond.index(slice(0, 1)), self.cfg.rollout.guidance)
        return v.sum() * 0.0

    def _backward(self, ro: Batch, chunk: torch.Tensor, row_off: int, share: float, adv: torch.Tensor,
                  cond: Conditioning, stats: UpdateStats) -> None:
        """Backpropagate this process's rows of the global minibatch `chunk` (global row ids; this
        process holds rows row_off..row_off + len(ro) - 1), which is the fraction `share` of the rows
        of its optimizer step.

        The local mean loss is scaled by W * len(idx) / len(chunk) * share: the gradient average over the
        W processes (DDP's all-reduce), accumulated over the step's minibatches, is then the gradient of
        the mean over the step's rows. Logged values are the global minibatch means; a non-finite global
        loss is skipped by every process alike."""
        idx = chunk[(chunk >= row_off) & (chunk < row_off + len(ro))] - row_off  # this process's rows, local ids
        frac = len(idx) / len(chunk)
        names = self.algorithm.metrics
        if len(idx):
            loss, parts = self.algorithm.loss(ro, idx, adv[idx], cond)
            values = torch.stack([parts[k].detach().float().cpu().reshape(()) for k in names]) if names else None
        else:
            loss, values = self._idle_loss(cond), None
        values = torch.zeros(len(names)) if values is None else values
        glob = self.dist.sum(torch.cat([loss.detach().float().cpu().reshape(1), values]).double() * frac)
        for k, v in zip(names, glob[1:].tolist()):
            stats.values.setdefault(k, []).append(v)
        if torch.isfinite(glob[0]):
            self.dist.acc.backward(loss * (self.dist.world * frac * share))
            stats.loss.append(glob[0].item())
        else:
            stats.skipped += 1

    def _optimizer_step(self, stats: UpdateStats) -> None:
        o = self.cfg.optim
        if self.gradient_observer is not None:
            self.gradient_observer(flat_gradient(self.params))
        # after the all-reduce every process holds the same gradients, so takes the same decision
        norm = self.dist.acc.clip_grad_norm_(self.params, o.grad_clip if o.grad_clip else float("inf"))
        if norm is not None and not torch.isfinite(norm):  # None: DeepSpeed clips inside its own step
            stats.skipped += 1
        else:
            if norm is not None:
                stats.grad_norm.append(float(norm))
            if self.step_guard is not None:
                self.step_guard.keep()
            self.opt.step()
            if not all_finite(self.params):  # every process holds the same weights: the same decision
                self._bad_step(stats)
                self.opt.zero_grad(set_to_none=True)
                return
            self.bad_steps = 0
            self.optimizer_steps += 1
            stats.optimizer_steps += 1
            if self.optimizer_steps % self.cfg.ema.every == 0:
                ema_update(self.ema, self.params, self.cfg.ema.decay)
        self.opt.zero_grad(set_to_none=True)

    def _bad_step(self, stats: UpdateStats) -> None:
        """The step made the weights non-finite: undo it (guard.rollback) and count it; stop the run
        after guard.max_bad_steps in a row, or at once without rollback."""
        g = self.cfg.guard
        self.bad_steps += 1
        stats.rolled_back += 1
        if self.step_guard is not None:
            self.step_guard.undo()
        if self.step_guard is None or self.bad_steps >= g.max_bad_steps:
            undone = ", each undone" if self.step_guard is not None else ""
            raise RunStopped(f"the run diverged: {self.bad_steps} optimizer step(s) in a row made the weights NaN or "
                             f"infinite{undone} (iteration {self.step + 1}); lower optim.lr or set optim.grad_clip")

    def current_lr(self) -> float:
        """The learning rate of the coming update: optim.lr scaled by the schedule at the budget spent."""
        c, o = self.cfg, self.cfg.optim
        spent = budget_fraction(self.step, c.iterations, self.elapsed, c.max_minutes, self.nfe_total, c.max_nfe)
        return o.lr * lr_factor(spent, o.lr_schedule, o.warmup, o.lr_final)

    def _layout(self, ro: Batch) -> tuple[int, int, torch.Tensor]:
        """(first global image, first global row of this process, (N,) global image of every global row)."""
        sizes = self.dist.gather(torch.tensor([[ro.images.shape[0], len(ro)]]))  # (W, 2) images, rows
        img_off, row_off = (int(v) for v in sizes[: self.dist.rank].sum(0))
        return img_off, row_off, self.dist.gather(ro.row_image.cpu() + img_off)

    def _trained(self, adv: Advantages) -> torch.Tensor:
        """(I,) which images' rows are trained: those of groups with spread (and, for an algorithm that
        keeps them, of groups without), never those of groups with a non-finite reward."""
        return adv.finite if self.algorithm.keeps_flat_groups() else adv.valid

    def _trained_rows(self, ro: Batch, adv: Advantages) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(global trained rows, first global row of this process, (N_local,) advantage of its rows)."""
        img_off, row_off, row_image = self._layout(ro)
        rows = self._trained(adv)[row_image].nonzero().squeeze(1)
        return rows, row_off, adv.values[ro.row_image.cpu() + img_off]

    def gradient(self, ro: Batch, adv: Advantages, cond: Conditioning) -> tuple[torch.Tensor, int]:
        """The policy gradient of a rollout at the current weights, nothing stepped: the gradient of the
        mean loss over the trained rows of every process (`adv` over all images, as for `update`),
        backpropagated minibatch by minibatch as `update` does, flattened to float32 on the CPU; and the
        number of trained rows (none: a zero gradient). It is the gradient an iteration's optimizer step
        accumulates when that step takes every trained row (one step per rollout). Every process calls it
        together, as it calls `update`."""
        rows, row_off, row_adv = self._trained_rows(ro, adv)
        stats = UpdateStats(self.algorithm.metrics)
        self.opt.zero_grad(set_to_none=True)
        self.model.train()
        for chunk in rows.split(self.cfg.optim.minibatch) if len(rows) else ():
            self._backward(ro, chunk, row_off, len(chunk) / len(rows), row_adv, cond, stats)
        self.model.eval()
        grad = flat_gradient(self.params)
        self.opt.zero_grad(set_to_none=True)
        return grad, len(rows)

    def update(self, ro: Batch, adv: Advantages, cond: Conditioning) -> UpdateStats:
        """Update on the trained rows of every process (`adv` over all images). Every process draws the
        same shuffled order of the global rows and cuts the same minibatches; each backpropagates its own
        rows of each minibatch (_backward)."""
        o, stats = self.cfg.optim, UpdateStats(self.algorithm.metrics)
        rows, row_off, row_adv = self._trained_rows(ro, adv)
        if len(rows) == 0:
            return stats
        ids = group_ids(*self.dist.gather(ro.state_keys())[rows].T)
        self.model.train()
        for _ in range(o.inner_epochs):
            # rows shuffled; rows that start from one state stay together, so that it costs one model
            # call (rows of distinct states: a plain permutation)
            order = state_order(ids, self.shuffle_gen)
            perm = rows[order]
            chunks = list(perm.split(o.minibatch))
            stats.update_rows += sum(len(c.unique()) for c in ids[order].split(o.minibatch))
            start = 0
            for n in minibatches_per_step(len(chunks), o.grad_accum, o.steps_per_rollout):
                step_chunks = chunks[start:start + n]
                start += n
                step_rows = sum(len(c) for c in step_chunks)
                for chunk in step_chunks:
                    self._backward(ro, chunk, row_off, len(chunk) / step_rows, row_adv, cond, stats)
                self._optimizer_step(stats)
        self.model.eval()
        return stats

    # ---- one iteration ------------------------------------------------------------------------------

    def _snapshot(self) -> tuple:
        """Everything an iteration changes before its update: restoring it undoes a failed iteration."""
        return self.gen.get_state(), self.shuffle_gen.get_state(), self.rng.getstate(), self.sampler.state()

    def _restore(self, snap: tuple) -> None:
        self.gen.set_state(snap[0])
        self.shuffle_gen.set_state(snap[1])
        self.rng.setstate(snap[2])
        self.sampler.load_state(snap[3])

    def iteration(self) -> dict:
        """Rollout, reward, advantages, update. If the reward fails (a reward server that is down, say),
        the trainer is left exactly as before the iteration, so a checkpoint written then resumes exactly."""
        snap = self._snapshot()
        t0 = time.perf_counter()
        prompts = self.sampler.next(self.cfg.rollout.prompts_per_iter)
        ro = self.rollout(prompts)
        t1 = time.perf_counter()
        try:
            rewards, meta = self.score(ro, prompts)
        except BaseException:
            self._restore(snap)
            raise
        t2 = time.perf_counter()
        adv = self.advantages(ro, rewards)
        lr = self.current_lr()  # the schedule at the budget spent before this iteration
        for pg in self.opt.param_groups:
            pg["lr"] = lr
        self.algorithm.observe(self.image_keys(ro), rewards)
        stats = self.update(ro, adv, self.encode(prompts))
        self.algorithm.after_update(self.optimizer_steps)
        t3 = time.perf_counter()
        finite = rewards[torch.isfinite(rewards)]
        nonfinite_rewards = 1.0 - len(finite) / max(len(rewards), 1)
        per_reward = {}
        names = self.reward_fn.names
        if len(names) > 1:  # each term of a weighted reward, logged alone (raw scores)
            for name in names:
                vals = torch.tensor([m.get("rewards", {}).get(name, float("nan")) for m in meta])
                vals = vals[torch.isfinite(vals)]
                per_reward[f"reward_{name}"] = vals.mean().item() if len(vals) else float("nan")
        self.step += 1
        nfe = int(self.dist.sum(torch.tensor([ro.nfe])))  # all processes' model calls
        self.nfe_total += nfe
        return {
            "step": self.step, "reward_mean": finite.mean().item() if len(finite) else float("nan"),
            "reward_std": finite.std(unbiased=False).item() if len(finite) else float("nan"), **per_reward,
            **stats.summary(), "zero_std_frac": adv.zero_std_frac, "nonfinite_frac": adv.nonfinite_frac,
            "nonfinite_rewards": nonfinite_rewards,
            "trained_rows": int(self._trained(adv)[self._layout(ro)[2]].sum()), "images": len(rewards), "nfe": nfe,
            "lr": lr,
            "rollout_s": t1 - t0, **ro.timings, "reward_s": t2 - t1, "update_s": t3 - t2,
        }

    # ---- state --------------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"param.{n}": p for n, p in self.named}
        tensors.update({f"ema.{n}": e for (n, _), e in zip(self.named, self.ema)})
        opt_t, opt_meta = ckpt.optimizer_to_flat(self.opt)
        tensors.update(opt_t)
        tensors["rng.gen"] = ckpt.generator_state(self.gen)
        tensors["rng.shuffle"] = ckpt.generator_state(self.shuffle_gen)
        algo_t, algo_meta = self.algorithm.state()
        tensors.update({f"algorithm.{k}": v for k, v in algo_t.items()})
        py = ckpt.python_rng_to_json(self.rng.getstate())
        ranks = self.dist.gather_objects(rank_rng_state(self.gen, self.shuffle_gen, py))
        for r, st in enumerate(ranks):  # every process's random states, each restored by its own process
            tensors.update({f"rng.rank{r}.{k}": st[k] for k in ("gen", "shuffle", "torch")})
        meta = {"world_size": self.dist.world, "python_rng_ranks": [st["python"] for st in ranks],
                "optimizer": opt_meta, "sampler": self.sampler.state(), "optimizer_steps": self.optimizer_steps,
                "elapsed": self.elapsed, "nfe_total": self.nfe_total, "algorithm": algo_meta,
                "reward_state": self.reward_fn.state_dict(),
                "python_rng": ckpt.python_rng_to_json(self.rng.getstate()),
                "config_yaml": to_yaml(self.cfg)}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        saved, world = int(meta.get("world_size", 1)), self.dist.world
        if saved != world:  # the run does not fit any of its checkpoints: no fallback
            raise TempflowError(
                f"checkpoint step {meta['step']} of {str(self.run_dir)!r} was written by {saved} process(es) and this "
                f"run has {world}; resume with {saved}, e.g. torchrun --nproc_per_node {saved} -m tempflow train "
                f"--resume {self.run_dir}")
        with torch.no_grad():
            for (n, p), e in zip(self.named, self.ema):
                for key in (f"param.{n}", f"ema.{n}"):
                    if key not in tensors:
                        raise ckpt.CheckpointError(f"it lacks {key!r}: it belongs to another model or config")
                    if tensors[key].shape != p.shape:
                        raise ckpt.CheckpointError(f"{key!r} has shape {tuple(tensors[key].shape)}, the model's is "
                                                   f"{tuple(p.shape)}")
                p.copy_(tensors[f"param.{n}"])
                e.copy_(tensors[f"ema.{n}"])
        ckpt.optimizer_from_flat(self.opt, tensors, meta["optimizer"])
        own = f"rng.rank{self.dist.rank}."
        self.gen.set_state(tensors.get(own + "gen", tensors["rng.gen"]))
        self.shuffle_gen.set_state(tensors.get(own + "shuffle", tensors["rng.shuffle"]))
        if own + "torch" in tensors:
            torch.set_rng_state(tensors[own + "torch"])
        self.algorithm.load_state({k[len("algorithm."):]: v for k, v in tensors.items() if k.startswith("algorithm.")},
                                  meta.get("algorithm", {}))
        self.sampler.load_state(meta["sampler"])
        py = meta["python_rng_ranks"][self.dist.rank] if "python_rng_ranks" in meta else meta["python_rng"]
        self.rng.setstate(ckpt.python_rng_from_json(py))
        self.step, self.optimizer_steps = int(meta["step"]), int(meta["optimizer_steps"])
        self.elapsed = float(meta["elapsed"])
        self.nfe_total = int(meta.get("nfe_total", 0))
        self.reward_fn.load_state_dict(meta.get("reward_state", {}))

    def save_final(self) -> Path:
        """RUN_DIR/final: the EMA model as a model folder (with LoRA, the adapter also in final/lora/)."""
        import shutil

        path = self.run_dir / "final"
        tmp = self.run_dir / ".final_tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with self.ema_weights():
                self.model.save_trained(tmp)  # refuses NaN or infinite weights before writing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path


def write_metrics_line(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_json_safe(row)) + "\n")


def sync_file(path: Path) -> None:
    """Flush `path` to the disk (metrics before a checkpoint that counts on them)."""
    if path.is_file():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())

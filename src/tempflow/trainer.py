"""The training loop: rollout -> score -> advantages -> update, then log, evaluate, checkpoint.

One trainer for every algorithm (Flow-GRPO, its windows, TempFlow-GRPO and the ablations) and every
model that implements the FlowModel protocol plus the fine-tuning methods (prepare_finetune,
trainable_named_parameters, reference, merged).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tempflow import checkpoint as ckpt
from tempflow.advantages import Advantages, group_advantages, group_ids
from tempflow.config import to_yaml
from tempflow.distributed import Dist, PolicyModule, rank_rng_state, unit_range
from tempflow.ema import ema_update
from tempflow.errors import ConfigError, PromptError, TempflowError
from tempflow.losses import kl_loss, policy_loss
from tempflow.models import load_model
from tempflow.models.base import Conditioning
from tempflow.rewards import make_reward
from tempflow.rollout import (
    Rollout,
    Units,
    branching_rollout,
    first_rows,
    flow_grpo_rollout,
    pick_branch_points,
    state_order,
    update_spread,
    window_steps,
)
from tempflow.sampling import initial_noise
from tempflow.schedule import budget_fraction, lr_factor
from tempflow.sde import noise_weights, sde_step
from tempflow.shapes.grammar import CATEGORIES, parse_prompt
from tempflow.shapes.prompts import load_prompts
from tempflow.train_config import TrainConfig

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


def prompt_strata(prompts: list[str], balance: str) -> list[list[int]] | None:
    """Indices of the prompts per stratum for `prompt_balance` (None: one stratum, plain passes)."""
    if balance == "none":
        return None
    by_category: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        try:
            category = parse_prompt(p).category
        except PromptError:
            raise ConfigError(f"prompt_balance=category needs prompts of the shapes grammar, and {p!r} is not "
                              "one: set prompt_balance=none") from None
        by_category.setdefault(category, []).append(i)
    return [by_category[c] for c in CATEGORIES if c in by_category]


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
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    clip_frac: list[float] = field(default_factory=list)
    ratio_mean: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    skipped: int = 0
    optimizer_steps: int = 0
    update_rows: int = 0  # policy model calls (rows) of the update, all processes: one per state per minibatch

    def summary(self) -> dict:
        def avg(xs: list[float]) -> float:
            return float(sum(xs) / len(xs)) if xs else float("nan")

        return {"loss": avg(self.loss), "kl": avg(self.kl), "clip_frac": avg(self.clip_frac),
                "ratio_mean": avg(self.ratio_mean), "ratio_first": self.ratio_mean[0] if self.ratio_mean else 1.0,
                "grad_norm": avg(self.grad_norm), "skipped_updates": self.skipped,
                "optimizer_steps": self.optimizer_steps, "update_rows": self.update_rows}


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class Trainer:
    """Owns the model, optimizer, EMA, RNGs and the run folder."""

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
        self.model.prepare_finetune(cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets))
        self.named = self.model.trainable_named_parameters()
        self.params = [p for _, p in self.named]
        o = cfg.optim
        opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        # accelerate wraps what trains (in DDP when launched on several processes; unchanged alone)
        self.policy, self.opt = self.dist.acc.prepare(PolicyModule(self.model, self.params), opt)
        self.ema = [p.detach().clone() for p in self.params]
        self.sampler = PromptSampler(self.prompts, cfg.seed, prompt_strata(self.prompts, cfg.prompt_balance))
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # unit seeds (initial noise and SDE noise derive from them)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.optimizer_steps, self.elapsed, self.nfe_total = 0, 0, 0.0, 0
        self.precision = resolve_precision(o.mixed_precision, self.model.device)
        self.sigmas = self.model.sigmas(cfg.rollout.num_steps)
        self.weights = self._step_weights()
        self._cond_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # running per-step within-group reward spread (branch_select=variance); starts equal everywhere
        self.spread = torch.ones(cfg.rollout.num_steps)

    # ---- set-up helpers ---------------------------------------------------------------------------

    def _step_weights(self) -> torch.Tensor:
        """(T,) weight of each grid step's surrogate: noise-aware (method 4.2) or all ones."""
        r = self.cfg.rollout
        w = torch.ones(r.num_steps)
        if self.cfg.loss.noise_weighting:
            steps = r.candidate_steps()
            w[steps] = noise_weights(self.sigmas, r.noise_level, steps)
        return w

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

    def _autocast(self) -> contextlib.AbstractContextManager:
        mp = self.precision
        if mp == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return torch.autocast(device_type=self.model.device.type, dtype=dtype)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within this context the trained parameters hold their EMA."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    # ---- the five phases ----------------------------------------------------------------------------

    def rollout(self, prompts: list[str]) -> Rollout:
        """This process's share of the iteration's units. Every process draws the same unit seeds,
        branch points or window, then rolls out units unit_range(n, W, rank) (all of them when alone)."""
        r = self.cfg.rollout
        cond = self.encode(prompts)
        n = len(prompts) * r.seeds_per_prompt
        seeds = torch.randint(0, 2**62, (n,), generator=self.gen).tolist()
        lo, hi = unit_range(n, self.dist.world, self.dist.rank)
        ids = torch.arange(lo, hi)  # units are prompt-major: unit u is (prompt u // S, seed u % S)
        units = Units(ids // r.seeds_per_prompt, ids % r.seeds_per_prompt, seeds[lo:hi])
        noise = initial_noise(self.model.latent_shape(), units.seed, self.model.device)
        self.model.eval()
        with self._autocast():
            if r.algorithm == "tempflow":
                points = pick_branch_points(r, self.rng, self.spread)
                return branching_rollout(self.model, cond, noise, r, points, units)
            steps = window_steps(r, self.step, self.rng)
            return flow_grpo_rollout(self.model, cond, noise, r, steps, units)

    def score(self, ro: Rollout, prompts: list[str]) -> tuple[torch.Tensor, list[dict]]:
        """(rewards, metadata) of the images of every process, in rank order. Each process scores its
        own images; the raw scores are gathered, then combined (and normalised) over the whole batch."""
        texts = [prompts[int(i)] for i in ro.image_prompt]
        meta = [{"seed": int(s), "step": int(j)} for s, j in zip(ro.image_seed, ro.image_step)]
        fn, error = self.reward_fn, ""
        try:
            if hasattr(fn, "raw_scores"):
                raw = fn.raw_scores(ro.images, texts, meta)  # (I, K)
            else:
                raw = fn(ro.images, texts, meta).float().reshape(-1, 1).cpu()
            if raw.shape[0] != len(texts):
                raise TempflowError(
                    f"reward {self.cfg.reward!r} returned {raw.shape[0]} scores for {len(texts)} images")
        except TempflowError as e:  # every process learns of it, so that all stop together
            error = str(e)
        errors = [e for e in self.dist.gather_objects(error) if e]
        if errors:
            raise TempflowError(errors[0])
        raw = self.dist.gather(raw.float().cpu())  # group math on the CPU
        rewards = fn.combine(raw) if hasattr(fn, "combine") else raw[:, 0]
        keys = self.image_keys(ro)
        names = getattr(fn, "names", [])
        meta = [{"seed": int(k[1]), "step": int(k[2]),
                 **({"rewards": dict(zip(names, r.tolist()))} if len(names) == raw.shape[1] else {})}
                for k, r in zip(keys, raw)]
        return rewards, meta

    def image_keys(self, ro: Rollout) -> torch.Tensor:
        """(I, 3) prompt row, seed slot and branch step of the images of every process, in rank order."""
        return self.dist.gather(torch.stack([ro.image_prompt, ro.image_seed, ro.image_step], 1).cpu())

    def advantages(self, ro: Rollout, rewards: torch.Tensor) -> Advantages:
        """Group advantages of the images of every process (`rewards` as gathered by score)."""
        k = self.image_keys(ro)
        keys = {"prompt": (k[:, 0],), "prompt_step": (k[:, 0], k[:, 2]), "seed_step": (k[:, 0], k[:, 1], k[:, 2])}
        a = self.cfg.advantage
        return group_advantages(rewards, group_ids(*keys[a.group_by]), a.global_std, clip=a.clip)

    @staticmethod
    def row_keys(ro: Rollout, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3) (prompt row, seed slot, grid step) of rows idx (all rows by default) of `ro`: rows
        with the same key start from the same state."""
        keys = torch.stack([ro.prompt_index, ro.seed_index, ro.step], 1).cpu()
        return keys if idx is None else keys[idx.cpu()]

    def _minibatch_loss(self, ro: Rollout, idx: torch.Tensor, adv: torch.Tensor, cond: Conditioning
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss of rows idx, their (kl, clip_frac, ratio_mean) as a detached CPU tensor)."""
        r, lc = self.cfg.rollout, self.cfg.loss
        # one model call per distinct state: a branch point's children share theirs (and its velocity)
        ids = group_ids(*self.row_keys(ro, idx).T)
        first = idx[first_rows(ids)]
        ids = ids.to(ro.x.device)
        xs, ts = ro.x[first], self.sigmas[ro.step[first]]
        rows = cond.index(ro.prompt_index[first])
        with self._autocast():
            v = self.policy(xs, ts, rows.tokens, rows.pooled, r.guidance)[ids]  # through accelerate's wrapper
        step = ro.step[idx]
        x, t, t_next = ro.x[idx], self.sigmas[step], self.sigmas[step + 1]
        out = sde_step(x, v, t, t_next, r.noise_level, prev=ro.x_next[idx])
        dev = out.log_prob.device
        pol = policy_loss(out.log_prob, ro.log_prob_old[idx], adv[idx].to(dev), lc.clip_range,
                          self.weights[step].to(dev))
        kl = torch.zeros(())
        if lc.kl_beta > 0:
            with torch.no_grad(), self.model.reference(), self._autocast():
                v_ref = self.model.velocity(xs, ts, rows, r.guidance)[ids]
            ref_mean = sde_step(x, v_ref, t, t_next, r.noise_level, prev=ro.x_next[idx]).mean
            kl = kl_loss(out.mean, ref_mean, out.std)
        parts = torch.stack([kl.detach().float().cpu(), pol.clip_frac.float().cpu(), pol.ratio.mean().float().cpu()])
        return pol.loss + lc.kl_beta * kl, parts

    def _idle_loss(self, ro: Rollout, cond: Conditioning) -> torch.Tensor:
        """A zero loss through the wrapped model, for a process without rows in a minibatch: its
        backward joins the gradient all-reduce of the others with zero gradients."""
        t = self.sigmas[ro.step[:1]]
        rows = cond.index(ro.prompt_index[:1])
        with self._autocast():
            v = self.policy(ro.x[:1], t, rows.tokens, rows.pooled, self.cfg.rollout.guidance)
        return v.float().sum() * 0.0

    def _backward(self, ro: Rollout, chunk: torch.Tensor, row_off: int, share: float, adv: torch.Tensor,
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
        if len(idx):
            loss, parts = self._minibatch_loss(ro, idx, adv, cond)
        else:
            loss, parts = self._idle_loss(ro, cond), torch.zeros(3)
        glob = self.dist.sum(torch.cat([loss.detach().float().cpu().reshape(1), parts]).double() * frac)
        if self.cfg.loss.kl_beta > 0:  # otherwise not computed: logged as null, not as a KL of 0
            stats.kl.append(glob[1].item())
        stats.clip_frac.append(glob[2].item())
        stats.ratio_mean.append(glob[3].item())
        if torch.isfinite(glob[0]):
            self.dist.acc.backward(loss * (self.dist.world * frac * share))
            stats.loss.append(glob[0].item())
        else:
            stats.skipped += 1

    def _optimizer_step(self, stats: UpdateStats) -> None:
        o = self.cfg.optim
        # after the all-reduce every process holds the same gradients, so takes the same decision
        norm = self.dist.acc.clip_grad_norm_(self.params, o.grad_clip if o.grad_clip else float("inf"))
        if norm is not None and not torch.isfinite(norm):  # None: DeepSpeed clips inside its own step
            stats.skipped += 1
        else:
            if norm is not None:
                stats.grad_norm.append(float(norm))
            self.opt.step()
            self.optimizer_steps += 1
            stats.optimizer_steps += 1
            if self.optimizer_steps % self.cfg.ema.every == 0:
                ema_update(self.ema, self.params, self.cfg.ema.decay)
        self.opt.zero_grad(set_to_none=True)

    def current_lr(self) -> float:
        """The learning rate of the coming update: optim.lr scaled by the schedule at the budget spent."""
        c, o = self.cfg, self.cfg.optim
        spent = budget_fraction(self.step, c.iterations, self.elapsed, c.max_minutes, self.nfe_total, c.max_nfe)
        return o.lr * lr_factor(spent, o.lr_schedule, o.warmup, o.lr_final)

    def _layout(self, ro: Rollout) -> tuple[int, int, torch.Tensor]:
        """(first global image, first global row of this process, (N,) global image of every global row)."""
        sizes = self.dist.gather(torch.tensor([[ro.images.shape[0], len(ro)]]))  # (W, 2) images, rows
        img_off, row_off = (int(v) for v in sizes[: self.dist.rank].sum(0))
        return img_off, row_off, self.dist.gather(ro.image_index.cpu() + img_off)

    def _trained_rows(self, ro: Rollout, adv: Advantages) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(global trained rows, first global row of this process, (N_local,) advantage of its rows)."""
        img_off, row_off, row_image = self._layout(ro)
        rows = adv.valid[row_image].nonzero().squeeze(1)
        return rows, row_off, adv.values[ro.image_index.cpu() + img_off]

    def policy_gradient(self) -> tuple[torch.Tensor, dict]:
        """One fresh rollout's estimate of the policy gradient at the current weights, nothing updated:
        the gradient of the mean surrogate (and KL term) over its trained rows, flattened to float32 on
        the CPU, and {images, trained_rows, nfe, seconds}. At unchanged weights every ratio is 1, so
        the clip is inactive: this is the direction the first optimizer step of an iteration follows."""
        t0 = time.perf_counter()
        prompts = self.sampler.next(self.cfg.rollout.prompts_per_iter)
        ro = self.rollout(prompts)
        rewards, _ = self.score(ro, prompts)
        adv = self.advantages(ro, rewards)
        rows, row_off, row_adv = self._trained_rows(ro, adv)
        cond, stats = self.encode(prompts), UpdateStats()
        self.opt.zero_grad(set_to_none=True)
        self.model.train()
        for chunk in rows.split(self.cfg.optim.minibatch) if len(rows) else ():  # none: a zero gradient
            self._backward(ro, chunk, row_off, len(chunk) / len(rows), row_adv, cond, stats)
        self.model.eval()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten().cpu()
                          for p in self.params])
        self.opt.zero_grad(set_to_none=True)
        info = {"images": len(rewards), "trained_rows": len(rows), "nfe": int(self.dist.sum(torch.tensor([ro.nfe]))),
                "seconds": time.perf_counter() - t0}
        return grad, info

    def update(self, ro: Rollout, adv: Advantages, cond: Conditioning) -> UpdateStats:
        """Policy update on the trained rows of every process (`adv` over all images). Every process
        draws the same shuffled order of the global rows and cuts the same minibatches; each
        backpropagates its own rows of each minibatch (_backward)."""
        o, stats = self.cfg.optim, UpdateStats()
        rows, row_off, row_adv = self._trained_rows(ro, adv)
        if len(rows) == 0:
            return stats
        ids = group_ids(*self.dist.gather(self.row_keys(ro))[rows].T)
        self.model.train()
        for _ in range(o.inner_epochs):
            # trained steps shuffled; a branch point's children stay together, so that their shared
            # state costs one model call (rows of distinct states: a plain permutation)
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
        return (self.gen.get_state(), self.shuffle_gen.get_state(), self.rng.getstate(), self.sampler.state(),
                self.spread.clone())

    def _restore(self, snap: tuple) -> None:
        self.gen.set_state(snap[0])
        self.shuffle_gen.set_state(snap[1])
        self.rng.setstate(snap[2])
        self.sampler.load_state(snap[3])
        self.spread = snap[4]

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
        if self.cfg.rollout.algorithm == "tempflow":
            k = self.image_keys(ro)  # every process's images: the estimate is the same everywhere
            group = group_ids(k[:, 0], k[:, 1], k[:, 2])
            self.spread = update_spread(self.spread, rewards, k[:, 2], group, self.cfg.rollout.branch_decay)
        stats = self.update(ro, adv, self.encode(prompts))
        t3 = time.perf_counter()
        finite = rewards[torch.isfinite(rewards)]
        per_reward = {}
        names = getattr(self.reward_fn, "names", [])
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
            "trained_rows": int(adv.valid[self._layout(ro)[2]].sum()), "images": len(rewards), "nfe": nfe, "lr": lr,
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
        tensors["branch_spread"] = self.spread
        py = ckpt.python_rng_to_json(self.rng.getstate())
        ranks = self.dist.gather_objects(rank_rng_state(self.gen, self.shuffle_gen, py))
        for r, st in enumerate(ranks):  # every process's random states, each restored by its own process
            tensors.update({f"rng.rank{r}.{k}": st[k] for k in ("gen", "shuffle", "torch")})
        meta = {"world_size": self.dist.world, "python_rng_ranks": [st["python"] for st in ranks],
                "optimizer": opt_meta, "sampler": self.sampler.state(), "optimizer_steps": self.optimizer_steps,
                "elapsed": self.elapsed, "nfe_total": self.nfe_total,
                "reward_state": self.reward_fn.state_dict() if hasattr(self.reward_fn, "state_dict") else {},
                "python_rng": ckpt.python_rng_to_json(self.rng.getstate()),
                "config_yaml": to_yaml(self.cfg)}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        saved, world = int(meta.get("world_size", 1)), self.dist.world
        if saved != world:
            raise ckpt.CheckpointError(
                f"checkpoint step {meta['step']} of {str(self.run_dir)!r} was written by {saved} process(es) and this "
                f"run has {world}; resume with {saved}, e.g. torchrun --nproc_per_node {saved} -m tempflow train "
                f"--resume {self.run_dir}")
        with torch.no_grad():
            for (n, p), e in zip(self.named, self.ema):
                if f"param.{n}" not in tensors:
                    raise ckpt.CheckpointError(f"checkpoint lacks weight {n!r}: it belongs to another model or config")
                p.copy_(tensors[f"param.{n}"])
                e.copy_(tensors[f"ema.{n}"])
        ckpt.optimizer_from_flat(self.opt, tensors, meta["optimizer"])
        own = f"rng.rank{self.dist.rank}."
        self.gen.set_state(tensors.get(own + "gen", tensors["rng.gen"]))
        if "branch_spread" in tensors:
            self.spread = tensors["branch_spread"].clone()
        self.shuffle_gen.set_state(tensors.get(own + "shuffle", tensors["rng.shuffle"]))
        if own + "torch" in tensors:
            torch.set_rng_state(tensors[own + "torch"])
        self.sampler.load_state(meta["sampler"])
        py = meta["python_rng_ranks"][self.dist.rank] if "python_rng_ranks" in meta else meta["python_rng"]
        self.rng.setstate(ckpt.python_rng_from_json(py))
        self.step, self.optimizer_steps = int(meta["step"]), int(meta["optimizer_steps"])
        self.elapsed = float(meta["elapsed"])
        self.nfe_total = int(meta.get("nfe_total", 0))
        if hasattr(self.reward_fn, "load_state_dict"):
            self.reward_fn.load_state_dict(meta.get("reward_state", {}))

    def save_final(self) -> Path:
        """RUN_DIR/final: the EMA model as a model folder (with LoRA, the adapter also in final/lora/)."""
        import shutil

        path = self.run_dir / "final"
        tmp = self.run_dir / ".final_tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with self.ema_weights():
            self.model.save_trained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path


def write_metrics_line(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_json_safe(row)) + "\n")

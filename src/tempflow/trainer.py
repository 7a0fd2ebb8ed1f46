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
from tempflow.ema import ema_update
from tempflow.errors import TempflowError
from tempflow.losses import kl_loss, policy_loss
from tempflow.models import load_model
from tempflow.models.base import Conditioning
from tempflow.rewards import make_reward
from tempflow.rollout import (
    Rollout,
    branching_rollout,
    flow_grpo_rollout,
    pick_branch_points,
    update_spread,
    window_steps,
)
from tempflow.sampling import initial_noise
from tempflow.sde import noise_weights, sde_step
from tempflow.shapes.prompts import load_prompts
from tempflow.train_config import TrainConfig


class PromptSampler:
    """Draws prompts in shuffled passes over the prompt list; its position is part of a checkpoint."""

    def __init__(self, prompts: list[str], seed: int) -> None:
        self.prompts, self.seed = prompts, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[str]:
        out = []
        for _ in range(k):
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.prompts[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle()


@dataclass
class UpdateStats:
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    clip_frac: list[float] = field(default_factory=list)
    ratio_mean: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    skipped: int = 0
    optimizer_steps: int = 0

    def summary(self) -> dict:
        def avg(xs: list[float]) -> float:
            return float(sum(xs) / len(xs)) if xs else float("nan")

        return {"loss": avg(self.loss), "kl": avg(self.kl), "clip_frac": avg(self.clip_frac),
                "ratio_mean": avg(self.ratio_mean), "ratio_first": self.ratio_mean[0] if self.ratio_mean else 1.0,
                "grad_norm": avg(self.grad_norm), "skipped_updates": self.skipped,
                "optimizer_steps": self.optimizer_steps}


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class Trainer:
    """Owns the model, optimizer, EMA, RNGs and the run folder."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.prompts = load_prompts(cfg.prompts)
        self.reward_fn = make_reward(cfg.reward)
        self.model = load_model(cfg.model)
        self.model.check_prompts(self.prompts)
        torch.manual_seed(cfg.seed)  # adapter initialisation
        self.model.prepare_finetune(cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets))
        self.named = self.model.trainable_named_parameters()
        self.params = [p for _, p in self.named]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        self.ema = [p.detach().clone() for p in self.params]
        self.sampler = PromptSampler(self.prompts, cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # initial noise and SDE noise
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.optimizer_steps, self.elapsed, self.nfe_total = 0, 0, 0.0, 0
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
            for i, p in enumerate(missing):
                self._cond_cache[p] = (c.tokens[i], c.pooled[i])
        rows = [self._cond_cache[p] for p in prompts]
        return Conditioning(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))

    def _autocast(self) -> contextlib.AbstractContextManager:
        mp = self.cfg.optim.mixed_precision
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
        r = self.cfg.rollout
        cond = self.encode(prompts)
        n = len(prompts) * r.seeds_per_prompt
        seeds = torch.randint(0, 2**62, (n,), generator=self.gen).tolist()
        noise = initial_noise(self.model.latent_shape(), seeds, self.model.device)
        self.model.eval()
        with self._autocast():
            if r.algorithm == "tempflow":
                points = pick_branch_points(r, self.rng, self.spread)
                return branching_rollout(self.model, cond, noise, r, points, self.gen)
            steps = window_steps(r, self.step, self.rng)
            return flow_grpo_rollout(self.model, cond, noise, r, steps, self.gen)

    def score(self, ro: Rollout, prompts: list[str]) -> tuple[torch.Tensor, list[dict]]:
        texts = [prompts[int(i)] for i in ro.image_prompt]
        meta = [{"seed": int(s), "step": int(j)} for s, j in zip(ro.image_seed, ro.image_step)]
        rewards = self.reward_fn(ro.images, texts, meta).float().reshape(-1)
        if rewards.shape[0] != len(texts):
            raise TempflowError(
                f"reward {self.cfg.reward!r} returned {rewards.shape[0]} scores for {len(texts)} images")
        return rewards, meta

    def advantages(self, ro: Rollout, rewards: torch.Tensor) -> Advantages:
        by = self.cfg.advantage.group_by
        keys = {"prompt": (ro.image_prompt,), "prompt_step": (ro.image_prompt, ro.image_step),
                "seed_step": (ro.image_prompt, ro.image_seed, ro.image_step)}[by]
        a = self.cfg.advantage
        return group_advantages(rewards, group_ids(*keys), a.global_std, clip=a.clip)

    def _minibatch_loss(self, ro: Rollout, idx: torch.Tensor, adv: torch.Tensor, cond: Conditioning,
                        stats: UpdateStats) -> torch.Tensor:
        r, lc = self.cfg.rollout, self.cfg.loss
        x, step = ro.x[idx], ro.step[idx]
        t, t_next = self.sigmas[step], self.sigmas[step + 1]
        rows = cond.index(ro.prompt_index[idx])
        with self._autocast():
            v = self.model.velocity(x, t, rows, r.guidance)
        out = sde_step(x, v, t, t_next, r.noise_level, prev=ro.x_next[idx])
        pol = policy_loss(out.log_prob, ro.log_prob_old[idx], adv[idx], lc.clip_range, self.weights[step])
        kl = torch.zeros(())
        if lc.kl_beta > 0:
            with torch.no_grad(), self.model.reference(), self._autocast():
                v_ref = self.model.velocity(x, t, rows, r.guidance)
            ref_mean = sde_step(x, v_ref, t, t_next, r.noise_level, prev=ro.x_next[idx]).mean
            kl = kl_loss(out.mean, ref_mean, out.std)
        stats.kl.append(kl.item())
        stats.clip_frac.append(pol.clip_frac.item())
        stats.ratio_mean.append(pol.ratio.mean().item())
        return pol.loss + lc.kl_beta * kl

    def _optimizer_step(self, stats: UpdateStats) -> None:
        o = self.cfg.optim
        norm = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip if o.grad_clip else float("inf"))
        if not torch.isfinite(norm):
            stats.skipped += 1
        else:
            stats.grad_norm.append(norm.item())
            self.opt.step()
            self.optimizer_steps += 1
            stats.optimizer_steps += 1
            if self.optimizer_steps % self.cfg.ema.every == 0:
                ema_update(self.ema, self.params, self.cfg.ema.decay)
        self.opt.zero_grad(set_to_none=True)

    def update(self, ro: Rollout, adv: Advantages, cond: Conditioning) -> UpdateStats:
        o, stats = self.cfg.optim, UpdateStats()
        rows = adv.valid[ro.image_index].nonzero().squeeze(1)
        row_adv = adv.values[ro.image_index]
        if len(rows) == 0:
            return stats
        self.model.train()
        for _ in range(o.inner_epochs):
            perm = rows[torch.randperm(len(rows), generator=self.shuffle_gen)]  # trained steps shuffled
            chunks = list(perm.split(o.minibatch))
            for i, idx in enumerate(chunks):
                loss = self._minibatch_loss(ro, idx, row_adv, cond, stats)
                if torch.isfinite(loss):
                    (loss / o.grad_accum).backward()
                    stats.loss.append(loss.item())
                else:
                    stats.skipped += 1
                if (i + 1) % o.grad_accum == 0 or i == len(chunks) - 1:
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
        if self.cfg.rollout.algorithm == "tempflow":
            group = group_ids(ro.image_prompt, ro.image_seed, ro.image_step)
            self.spread = update_spread(self.spread, rewards, ro.image_step, group, self.cfg.rollout.branch_decay)
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
        self.nfe_total += ro.nfe
        return {
            "step": self.step, "reward_mean": finite.mean().item() if len(finite) else float("nan"),
            "reward_std": finite.std(unbiased=False).item() if len(finite) else float("nan"), **per_reward,
            **stats.summary(), "zero_std_frac": adv.zero_std_frac, "nonfinite_frac": adv.nonfinite_frac,
            "trained_rows": int(adv.valid[ro.image_index].sum()), "images": len(rewards), "nfe": ro.nfe,
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
        meta = {"optimizer": opt_meta, "sampler": self.sampler.state(), "optimizer_steps": self.optimizer_steps,
                "elapsed": self.elapsed, "nfe_total": self.nfe_total,
                "reward_state": self.reward_fn.state_dict() if hasattr(self.reward_fn, "state_dict") else {},
                "python_rng": ckpt.python_rng_to_json(self.rng.getstate()),
                "config_yaml": to_yaml(self.cfg)}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        with torch.no_grad():
            for (n, p), e in zip(self.named, self.ema):
                if f"param.{n}" not in tensors:
                    raise ckpt.CheckpointError(f"checkpoint lacks weight {n!r}: it belongs to another model or config")
                p.copy_(tensors[f"param.{n}"])
                e.copy_(tensors[f"ema.{n}"])
        ckpt.optimizer_from_flat(self.opt, tensors, meta["optimizer"])
        self.gen.set_state(tensors["rng.gen"])
        if "branch_spread" in tensors:
            self.spread = tensors["branch_spread"].clone()
        self.shuffle_gen.set_state(tensors["rng.shuffle"])
        self.sampler.load_state(meta["sampler"])
        self.rng.setstate(ckpt.python_rng_from_json(meta["python_rng"]))
        self.step, self.optimizer_steps = int(meta["step"]), int(meta["optimizer_steps"])
        self.elapsed = float(meta["elapsed"])
        self.nfe_total = int(meta.get("nfe_total", 0))
        if hasattr(self.reward_fn, "load_state_dict"):
            self.reward_fn.load_state_dict(meta.get("reward_state", {}))

    def save_final(self) -> Path:
        with self.ema_weights():
            final = self.model.merged()
        path = self.run_dir / "final"
        tmp = self.run_dir / ".final_tmp"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        final.save(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path


def write_metrics_line(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_json_safe(row)) + "\n")

"""Rollouts: Flow-GRPO trajectories (SDE on a window of steps) and TempFlow-GRPO branching.

Both fill the same `Rollout` batch: one row per trained transition x_j -> x_{j+1}, with the index of
the image whose reward it receives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tempflow.flow import ode_step
from tempflow.models.base import Conditioning, FlowModel
from tempflow.sde import sde_step
from tempflow.train_config import RolloutConfig


@dataclass
class Rollout:
    """Trained transitions (N rows) and the images (I) that score them."""

    x: torch.Tensor  # (N, C, H, W) state before the transition
    x_next: torch.Tensor  # (N, C, H, W) sampled next state
    step: torch.Tensor  # (N,) index j on the sigma grid
    log_prob_old: torch.Tensor  # (N,)
    prompt_index: torch.Tensor  # (N,) row of the batch's prompts / conditioning
    seed_index: torch.Tensor  # (N,) initial noise within the prompt
    image_index: torch.Tensor  # (N,) the image whose reward this transition receives
    images: torch.Tensor  # (I, 3, H, W) in [0, 1]
    image_prompt: torch.Tensor  # (I,) prompt row of each image
    image_seed: torch.Tensor  # (I,) seed of each image
    image_step: torch.Tensor  # (I,) branch point of each image (-1: a whole trajectory)
    nfe: int  # single-image model evaluations (CFG counts twice)

    def __len__(self) -> int:
        return self.x.shape[0]


def _velocity_batched(model: FlowModel, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      guidance: float, max_batch: int) -> torch.Tensor:
    """model.velocity over row chunks of at most max_batch."""
    out = [model.velocity(x[i : i + max_batch], t[i : i + max_batch], cond.index(slice(i, i + max_batch)), guidance)
           for i in range(0, x.shape[0], max_batch)]
    return torch.cat(out).float()


def _cfg_factor(guidance: float) -> int:
    return 1 if guidance == 1.0 else 2


def pick_branch_points(cfg: RolloutConfig, rng: random.Random) -> list[int]:
    """This iteration's branch points: all configured ones, or branch_sample of them at random."""
    steps = cfg.candidate_steps()
    if cfg.branch_sample:
        return sorted(rng.sample(steps, cfg.branch_sample))
    return steps


def window_steps(cfg: RolloutConfig, iteration: int, rng: random.Random) -> list[int]:
    """This iteration's SDE steps for Flow-GRPO and its windowed variants."""
    last = cfg.num_steps - 2  # the final step to t = 0 stays deterministic
    if cfg.window == "all":
        return list(range(last + 1))
    if cfg.window == "fixed":
        return list(range(cfg.window_start, cfg.window_start + cfg.window_size))
    span = last + 1 - cfg.window_size
    start = rng.randint(0, span) if cfg.window == "random" else min(iteration // cfg.window_shift_every, span)
    return list(range(start, start + cfg.window_size))


@torch.no_grad()
def flow_grpo_rollout(model: FlowModel, cond: Conditioning, noise: torch.Tensor, cfg: RolloutConfig,
                      sde_steps: list[int], generator: torch.Generator) -> Rollout:
    """G trajectories per prompt; SDE on `sde_steps`, ODE elsewhere; terminal reward for every row.

    noise: (P*G, C, H, W), prompt-major; cond: (P, ...) one row per prompt.
    """
    n = noise.shape[0]
    g = n // len(cond)
    prompt_of = torch.arange(len(cond)).repeat_interleave(g)
    seed_of = torch.arange(g).repeat(len(cond))
    cond_rows = cond.index(prompt_of)
    sig = model.sigmas(cfg.num_steps)
    x = noise.float()
    xs, nexts, steps, lps = [], [], [], []
    for j in range(cfg.num_steps):
        v = _velocity_batched(model, x, sig[j].expand(n), cond_rows, cfg.guidance, cfg.max_batch)
        if j in sde_steps:
            out = sde_step(x, v, sig[j], sig[j + 1], cfg.noise_level, generator=generator)
            xs.append(x)
            nexts.append(out.sample)
            steps.append(torch.full((n,), j))
            lps.append(out.log_prob)
            x = out.sample
        else:
            x = ode_step(x, v, sig[j], sig[j + 1])
    k = len(sde_steps)
    return Rollout(
        x=torch.cat(xs), x_next=torch.cat(nexts), step=torch.cat(steps), log_prob_old=torch.cat(lps),
        prompt_index=prompt_of.repeat(k), seed_index=seed_of.repeat(k), image_index=torch.arange(n).repeat(k),
        images=model.decode(x), image_prompt=prompt_of, image_seed=seed_of,
        image_step=torch.full((n,), -1), nfe=n * cfg.num_steps * _cfg_factor(cfg.guidance),
    )


@torch.no_grad()
def branching_rollout(model: FlowModel, cond: Conditioning, noise: torch.Tensor, cfg: RolloutConfig,
                      branch_points: list[int], generator: torch.Generator) -> Rollout:
    """TempFlow-GRPO: ODE main path per (prompt, seed); M SDE children at each branch point, each
    completed by ODE to t = 0 in batched calls over all children of all branch points.

    noise: (P*S, C, H, W), prompt-major; cond: (P, ...) one row per prompt.
    """
    n, m, T = noise.shape[0], cfg.children, cfg.num_steps
    s = n // len(cond)
    prompt_of = torch.arange(len(cond)).repeat_interleave(s)
    seed_of = torch.arange(s).repeat(len(cond))
    cond_rows = cond.index(prompt_of)
    sig = model.sigmas(T)
    x = noise.float()
    # children: one block of n*m rows per branch point, in order of branch point
    child_x, child_next, child_lp, child_step, child_main = [], [], [], [], []
    for j in range(max(branch_points) + 1):
        v = _velocity_batched(model, x, sig[j].expand(n), cond_rows, cfg.guidance, cfg.max_batch)
        if j in branch_points:  # the main path's velocity serves the children: no extra call
            xr, vr = x.repeat_interleave(m, 0), v.repeat_interleave(m, 0)  # (n*m, C, H, W)
            out = sde_step(xr, vr, sig[j], sig[j + 1], cfg.noise_level, generator=generator)
            child_x.append(xr)
            child_next.append(out.sample)
            child_lp.append(out.log_prob)
            child_step.append(torch.full((n * m,), j))
            child_main.append(torch.arange(n).repeat_interleave(m))
        x = ode_step(x, v, sig[j], sig[j + 1])
    nfe = n * (max(branch_points) + 1)
    state = torch.cat(child_next)  # (B*n*m, C, H, W)
    start = torch.cat(child_step) + 1  # first grid index still to integrate
    main = torch.cat(child_main)
    for k in range(int(start.min()), T):  # every child that has started moves one step per wave
        active = (start <= k).nonzero().squeeze(1)
        rows_cond = cond_rows.index(main[active])
        v = _velocity_batched(model, state[active], sig[k].expand(len(active)), rows_cond, cfg.guidance,
                              cfg.max_batch)
        state[active] = ode_step(state[active], v, sig[k], sig[k + 1])
        nfe += len(active)
    steps = torch.cat(child_step)
    return Rollout(
        x=torch.cat(child_x), x_next=torch.cat(child_next), step=steps, log_prob_old=torch.cat(child_lp),
        prompt_index=prompt_of[main], seed_index=seed_of[main], image_index=torch.arange(len(main)),
        images=model.decode(state), image_prompt=prompt_of[main], image_seed=seed_of[main], image_step=steps,
        nfe=nfe * _cfg_factor(cfg.guidance),
    )


def expected_branching_nfe(num_seeds: int, num_steps: int, children: int, branch_points: list[int],
                           guidance: float) -> int:
    """method.md 4.1: per seed T + M * sum_j (T - 1 - j) model calls, x2 with CFG, less the main path's
    steps after the last branch point, which no reward needs (T - 1 - max j of them)."""
    main = max(branch_points) + 1
    per_seed = main + children * sum(num_steps - 1 - j for j in branch_points)
    return num_seeds * per_seed * _cfg_factor(guidance)

"""Rollouts: Flow-GRPO trajectories (SDE on a window of steps) and TempFlow-GRPO branching.

Both fill the same `Rollout` batch: one row per trained transition x_j -> x_{j+1}, with the index of
the image whose reward it receives. Rows and images are ordered unit by unit (a unit is one initial
noise: TempFlow's (prompt, seed), Flow-GRPO's (prompt, trajectory)), so the batches of several
processes, each rolling out a contiguous range of units, concatenate into the batch of one process.

Every random draw of a unit comes from its own seed (`unit_noise`), never from a generator shared
by the batch: a unit's children are the same whichever process, and whichever batch, computes them.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from tempflow.flow import ode_step
from tempflow.models.base import Conditioning, FlowModel
from tempflow.sde import sde_step
from tempflow.train_config import RolloutConfig

PHASES = ("main_s", "branch_s", "decode_s")  # rollout time: ODE/SDE main path, branches, decoding


@dataclass
class Rollout:
    """Trained transitions (N rows) and the images (I) that score them. Rows with the same
    (prompt_index, seed_index, step) start from the same state x (a branch point's children): the
    trainer runs the model once per state."""

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
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (PHASES)

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Units:
    """The units a process rolls out: their prompt row, seed slot within the prompt, and seed."""

    prompt: torch.Tensor  # (n,) row of the iteration's prompt list (and of its conditioning)
    slot: torch.Tensor  # (n,) index of the seed (trajectory) within its prompt
    seed: list[int]  # n seeds: the initial noise and every SDE draw of the unit derive from it


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def unit_noise(seeds: list[int], step: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(len(seeds) * count, *shape) standard normal noise, unit-major: the `count` draws of each unit
    at grid step `step` come from a generator seeded by (unit seed, step) alone, so they do not depend
    on which other units share the batch or the process."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(_mix64((int(s) + _mix64(step + 1)) & _MASK64))
        rows.append(torch.randn((count, *shape), generator=g))
    return torch.cat(rows)


def _velocity_batched(model: FlowModel, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      guidance: float, max_batch: int) -> torch.Tensor:
    """model.velocity over row chunks of at most max_batch."""
    out = [model.velocity(x[i : i + max_batch], t[i : i + max_batch], cond.index(slice(i, i + max_batch)), guidance)
           for i in range(0, x.shape[0], max_batch)]
    return torch.cat(out).float()


def _cfg_factor(guidance: float, model: object = None) -> int:
    """Transformer forwards per velocity row: 2 with classifier-free guidance (a doubled batch), 1
    without it or for models that take guidance as an input (FLUX.1-dev: ``cfg_batch = False``)."""
    return 1 if guidance == 1.0 or not getattr(model, "cfg_batch", True) else 2


def pick_branch_points(cfg: RolloutConfig, rng: random.Random, spread: torch.Tensor | None = None) -> list[int]:
    """This iteration's branch points: all configured ones, or branch_sample of them drawn without
    replacement, uniformly or (branch_select=variance, given `spread`, the (T,) running estimate of
    each step's within-group reward std) with probability proportional to spread plus a floor."""
    steps = cfg.candidate_steps()
    if not cfg.branch_sample:
        return steps
    if cfg.branch_select == "uniform" or spread is None:
        return sorted(rng.sample(steps, cfg.branch_sample))
    w = [float(spread[j]) for j in steps]
    floor = cfg.branch_floor * (sum(w) / len(w) if sum(w) > 0 else 1.0)
    w = [x + floor for x in w]
    chosen: list[int] = []
    for _ in range(cfg.branch_sample):  # sequential weighted draws: deterministic given rng
        u, acc = rng.random() * sum(w), 0.0
        k = len(w) - 1
        for i, x in enumerate(w):
            acc += x
            if u < acc:
                k = i
                break
        chosen.append(steps.pop(k))
        w.pop(k)
    return sorted(chosen)


def update_spread(spread: torch.Tensor, rewards: torch.Tensor, image_step: torch.Tensor, group: torch.Tensor,
                  decay: float) -> torch.Tensor:
    """Running estimate of each branch point's mean within-group reward std (EMA with `decay`);
    steps not branched at this iteration keep their estimate. Non-finite rewards are ignored."""
    out = spread.clone()
    ok = torch.isfinite(rewards)
    for j in image_step[ok].unique().tolist():
        if j < 0:
            continue
        rows = ok & (image_step == j)
        stds = [rewards[rows & (group == g)].std(unbiased=False) for g in group[rows].unique()]
        out[j] = decay * spread[j] + (1 - decay) * torch.stack(stds).mean()
    return out


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
                      sde_steps: list[int], units: Units) -> Rollout:
    """One trajectory per unit; SDE on `sde_steps`, ODE elsewhere; terminal reward for every row.

    noise: (n, C, H, W), one initial noise per unit; cond: one row per prompt, indexed by units.prompt.
    Rows are unit-major: (unit, step).
    """
    n = noise.shape[0]
    cond_rows = cond.index(units.prompt)
    sig = model.sigmas(cfg.num_steps)
    x = noise.float()
    t0 = time.perf_counter()
    xs, nexts, lps, done = [], [], [], []
    for j in range(cfg.num_steps):
        v = _velocity_batched(model, x, sig[j].expand(n), cond_rows, cfg.guidance, cfg.max_batch)
        if j in sde_steps:
            eps = unit_noise(units.seed, j, 1, tuple(x.shape[1:]))  # (n, C, H, W)
            out = sde_step(x, v, sig[j], sig[j + 1], cfg.noise_level, noise=eps)
            xs.append(x)
            nexts.append(out.sample)
            lps.append(out.log_prob)
            done.append(j)
            x = out.sample
        else:
            x = ode_step(x, v, sig[j], sig[j + 1])
    k = len(done)
    t1 = time.perf_counter()
    images = model.decode(x)
    return Rollout(
        x=torch.stack(xs, 1).flatten(0, 1), x_next=torch.stack(nexts, 1).flatten(0, 1),  # (n*k, C, H, W)
        step=torch.tensor(done).repeat(n), log_prob_old=torch.stack(lps, 1).flatten(),
        prompt_index=units.prompt.repeat_interleave(k), seed_index=units.slot.repeat_interleave(k),
        image_index=torch.arange(n).repeat_interleave(k), images=images, image_prompt=units.prompt.clone(),
        image_seed=units.slot.clone(), image_step=torch.full((n,), -1),
        nfe=n * cfg.num_steps * _cfg_factor(cfg.guidance, model),
        timings={"main_s": t1 - t0, "branch_s": 0.0, "decode_s": time.perf_counter() - t1},
    )


@torch.no_grad()
def branching_rollout(model: FlowModel, cond: Conditioning, noise: torch.Tensor, cfg: RolloutConfig,
                      branch_points: list[int], units: Units) -> Rollout:
    """TempFlow-GRPO: ODE main path per unit (prompt, seed); M SDE children at each branch point, each
    completed by ODE to t = 0 in batched calls over all children of all branch points.

    noise: (n, C, H, W), one initial noise per unit; cond: one row per prompt, indexed by units.prompt.
    Rows (one per child) are unit-major: (unit, branch point, child).
    """
    n, m, T = noise.shape[0], cfg.children, cfg.num_steps
    cond_rows = cond.index(units.prompt)
    sig = model.sigmas(T)
    x = noise.float()
    t0, t_branch = time.perf_counter(), 0.0
    # children: one block of n*m rows per branch point, in order of branch point
    child_x, child_next, child_lp, child_step, child_main = [], [], [], [], []
    for j in range(max(branch_points) + 1):
        v = _velocity_batched(model, x, sig[j].expand(n), cond_rows, cfg.guidance, cfg.max_batch)
        if j in branch_points:  # the main path's velocity serves the children: no extra call
            tb = time.perf_counter()
            xr, vr = x.repeat_interleave(m, 0), v.repeat_interleave(m, 0)  # (n*m, C, H, W)
            eps = unit_noise(units.seed, j, m, tuple(x.shape[1:]))  # (n*m, C, H, W), unit-major
            out = sde_step(xr, vr, sig[j], sig[j + 1], cfg.noise_level, noise=eps)
            child_x.append(xr)
            child_next.append(out.sample)
            child_lp.append(out.log_prob)
            child_step.append(torch.full((n * m,), j))
            child_main.append(torch.arange(n).repeat_interleave(m))
            t_branch += time.perf_counter() - tb
        x = ode_step(x, v, sig[j], sig[j + 1])
    nfe = n * (max(branch_points) + 1)
    t1 = time.perf_counter()
    # blocks are (branch point, unit, child); reorder every child array to (unit, branch point, child)
    order = torch.arange(len(child_x) * n * m).view(len(child_x), n, m).transpose(0, 1).flatten()
    x_rows, next_rows, lp_rows = torch.cat(child_x)[order], torch.cat(child_next)[order], torch.cat(child_lp)[order]
    steps, main = torch.cat(child_step)[order], torch.cat(child_main)[order]
    state = next_rows.clone()  # (n*B*m, C, H, W)
    start = steps + 1  # first grid index still to integrate
    # each child's ODE path to t = 0 (grid indices); wave w moves every child still on its path one step,
    # all branch points in the same batched calls (rows carry their own times)
    paths = {s: completion_path(s, T, cfg.completion_steps) for s in sorted(set(start.tolist()))}
    grid = torch.full((len(start), max(len(p) for p in paths.values())), -1, dtype=torch.long)  # -1: arrived
    for s, p in paths.items():
        grid[start == s, : len(p)] = torch.tensor(p)
    for w in range(grid.shape[1] - 1):
        active = (grid[:, w + 1] >= 0).nonzero().squeeze(1)
        t, t_next = sig[grid[active, w]], sig[grid[active, w + 1]]
        v = _velocity_batched(model, state[active], t, cond_rows.index(main[active]), cfg.guidance, cfg.max_batch)
        state[active] = ode_step(state[active], v, t, t_next)
        nfe += len(active)
    t2 = time.perf_counter()
    images = model.decode(state)
    prompt_of, seed_of = units.prompt[main], units.slot[main]
    return Rollout(
        x=x_rows, x_next=next_rows, step=steps, log_prob_old=lp_rows,
        prompt_index=prompt_of, seed_index=seed_of, image_index=torch.arange(len(main)),
        images=images, image_prompt=prompt_of.clone(), image_seed=seed_of.clone(), image_step=steps,
        nfe=nfe * _cfg_factor(cfg.guidance, model),
        timings={"main_s": t1 - t0 - t_branch, "branch_s": t_branch + t2 - t1, "decode_s": time.perf_counter() - t2},
    )


def first_rows(ids: torch.Tensor) -> torch.Tensor:
    """(S,) the first row of each of the dense ids 0..S-1 (`advantages.group_ids`), in id order."""
    rows = torch.arange(len(ids))
    return torch.full((int(ids.max()) + 1,), len(ids)).scatter_reduce(0, ids, rows, "amin")


def state_order(ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random order of the rows that keeps the rows of one state together: the states are
    shuffled, and each keeps its rows in their order. With one row per state (Flow-GRPO) it is the
    plain row permutation `torch.randperm(len(ids), generator=generator)` draws."""
    perm = torch.randperm(int(ids.max()) + 1, generator=generator)  # perm[k]: the k-th state
    position = torch.empty_like(perm)
    position[perm] = torch.arange(len(perm))
    return torch.argsort(position[ids] * len(ids) + torch.arange(len(ids)))


def completion_path(start: int, num_steps: int, completion_steps: int = 0) -> list[int]:
    """Grid indices a child visits from `start` to num_steps (t = 0): every one, or with
    completion_steps > 0 at most that many larger ODE steps on an even subset of the grid."""
    remaining = num_steps - start
    if completion_steps <= 0 or completion_steps >= remaining:
        return list(range(start, num_steps + 1))
    return [round(start + remaining * i / completion_steps) for i in range(completion_steps + 1)]


def expected_branching_nfe(num_seeds: int, num_steps: int, children: int, branch_points: list[int],
                           guidance: float, completion_steps: int = 0) -> int:
    """method.md 4.1: per seed T + M * sum_j (T - 1 - j) model calls, x2 with CFG, less the main path's
    steps after the last branch point, which no reward needs (T - 1 - max j of them). With
    completion_steps > 0 a child takes at most that many ODE steps."""
    main = max(branch_points) + 1
    per_seed = main + children * sum(len(completion_path(j + 1, num_steps, completion_steps)) - 1
                                     for j in branch_points)
    return num_seeds * per_seed * _cfg_factor(guidance)

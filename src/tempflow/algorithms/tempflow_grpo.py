"""TempFlow-GRPO: trajectory branching for per-step process rewards, noise-aware policy weighting and
seed groups.

For each unit (prompt, seed): a deterministic ODE main path; at each branch point j, M SDE children
x'_{j+1} from the main path's state x_j (its velocity serves them: no extra call), each completed by
ODE to t = 0 and scored. A child's reward is credited to step j alone, and its advantage is taken
within its seed group (the M children of one (prompt, seed, j)).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from tempflow.algorithms.base import Policy, SharedRows, Units
from tempflow.algorithms.rollout import decode_to_host, unit_noise
from tempflow.algorithms.transitions import SDEAlgorithm, SDEConfig, Transitions
from tempflow.config import require
from tempflow.math.flow import ode_step
from tempflow.math.sde import sde_step
from tempflow.models.base import Conditioning

SELECTIONS = ("uniform", "variance")


@dataclass
class BranchConfig:
    """Where and how a unit branches (TempFlow-GRPO and the TempFlow-credit algorithms)."""

    children: int = 4  # M, SDE children per (seed, branch point)
    branch_points: list[int] = field(default_factory=list)  # steps to branch at; [] = 0..T-2
    branch_sample: int = 0  # if > 0, draw this many of the branch points each iteration
    branch_select: str = "uniform"  # with branch_sample: uniform | variance (where rewards spread)
    branch_floor: float = 0.25  # branch_select=variance: weight floor, as a fraction of the mean estimate
    branch_decay: float = 0.9  # branch_select=variance: EMA decay of the per-step reward-spread estimate
    completion_steps: int = 0  # children reach t = 0 in at most this many ODE steps; 0: the grid's

    def check_branching(self, num_steps: int) -> None:
        require(self.children >= 2, "algorithm.children must be >= 2: a group of one child has no spread")
        last = num_steps - 2
        bad = [j for j in self.branch_points if not 0 <= j <= last]
        require(not bad, f"algorithm.branch_points {bad} lie outside the grid; allowed 0..{last} for num_steps "
                         f"{num_steps}")
        require(len(set(self.branch_points)) == len(self.branch_points), "algorithm.branch_points repeat a step")
        n = len(self.candidate_steps(num_steps))
        require(0 <= self.branch_sample <= n, f"algorithm.branch_sample must be in 0..{n}")
        require(self.branch_select in SELECTIONS, f"algorithm.branch_select must be one of {', '.join(SELECTIONS)}")
        require(self.branch_floor > 0, "algorithm.branch_floor must be > 0 (every step keeps a chance)")
        require(0 <= self.branch_decay < 1, "algorithm.branch_decay must be in [0, 1)")
        require(self.completion_steps >= 0, "algorithm.completion_steps must be >= 0 (0: every grid step)")

    def candidate_steps(self, num_steps: int) -> list[int]:
        """The steps a unit may branch at: the configured ones, or every step but the last."""
        return sorted(self.branch_points) if self.branch_points else list(range(num_steps - 1))


@dataclass
class TempFlowConfig(BranchConfig, SDEConfig):
    name: str = "tempflow_grpo"
    noise_weighting: bool = True  # multiply each step's surrogate by std_j / mean std of the branch points

    def check(self, cfg) -> None:
        self.check_branching(cfg.rollout.num_steps)


def pick_branch_points(cfg: BranchConfig, num_steps: int, rng: random.Random,
                       spread: torch.Tensor | None = None) -> list[int]:
    """This iteration's branch points: all configured ones, or branch_sample of them drawn without
    replacement, uniformly or (branch_select=variance, given `spread`, the (T,) running estimate of
    each step's within-group reward std) with probability proportional to spread plus a floor."""
    steps = cfg.candidate_steps(num_steps)
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


def completion_path(start: int, num_steps: int, completion_steps: int = 0) -> list[int]:
    """Grid indices a child visits from `start` to num_steps (t = 0): every one, or with
    completion_steps > 0 at most that many larger ODE steps on an even subset of the grid."""
    remaining = num_steps - start
    if completion_steps <= 0 or completion_steps >= remaining:
        return list(range(start, num_steps + 1))
    return [round(start + remaining * i / completion_steps) for i in range(completion_steps + 1)]


def expected_branching_nfe(num_seeds: int, num_steps: int, children: int, branch_points: list[int],
                           guidance: float, completion_steps: int = 0) -> int:
    """Per seed T + M * sum_j (T - 1 - j) model calls, x2 with CFG, less the main path's steps after
    the last branch point, which no reward needs (T - 1 - max j of them). With completion_steps > 0 a
    child takes at most that many ODE steps."""
    main = max(branch_points) + 1
    per_seed = main + children * sum(len(completion_path(j + 1, num_steps, completion_steps)) - 1
                                     for j in branch_points)
    return num_seeds * per_seed * (1 if guidance == 1.0 else 2)


@dataclass
class Branches:
    """The children of a branching rollout, one row each, unit-major: (unit, branch point, child). The
    children of one (unit, branch point) start from one state of the main path, kept once: state s is
    (unit s // P, the P branch points' s % P-th)."""

    state_x: torch.Tensor  # (S, C, H, W) the main path's state at each (unit, branch point)
    state_mean: torch.Tensor | None  # (S, C, H, W) the SDE step's mean from it, the same for its children
    state: torch.Tensor  # (N,) the state each child branched from
    x_next: torch.Tensor  # (N, C, H, W) the child's SDE step from its state
    step: torch.Tensor  # (N,) the branch point j
    log_prob: torch.Tensor  # (N,) of the SDE step under the sampling policy
    unit: torch.Tensor  # (N,) the unit (row of `units`) of the child
    final: torch.Tensor  # (N, C, H, W) the child's clean sample (t = 0)
    rows: int  # velocity rows computed (main path and completions)
    main_s: float
    branch_s: float

    @property
    def x(self) -> SharedRows:
        """(N, C, H, W) each child's state, shared by its siblings."""
        return SharedRows(self.state_x, self.state)

    @property
    def mean(self) -> SharedRows | None:
        """(N, C, H, W) each child's SDE mean (keep_mean only), shared by its siblings."""
        return None if self.state_mean is None else SharedRows(self.state_mean, self.state)


@torch.no_grad()
def _complete(policy: Policy, cond: Conditioning, state: torch.Tensor, start: torch.Tensor, prompts: torch.Tensor,
              sig: torch.Tensor, num_steps: int, guidance: float, completion_steps: int) -> tuple[torch.Tensor, int]:
    """Each child's ODE path to t = 0 from grid index start (N,), in place in `state`; wave w moves every
    child still on its path one step, all branch points in the same batched calls (rows carry their own
    times). A call takes at most max_batch children, their conditioning indexed for that call alone,
    so the completion holds no per-child copy beyond `state`."""
    paths = {s: completion_path(s, num_steps, completion_steps) for s in sorted(set(start.tolist()))}
    grid = torch.full((len(start), max(len(p) for p in paths.values())), -1, dtype=torch.long)  # -1: arrived
    for s, p in paths.items():
        grid[start == s, : len(p)] = torch.tensor(p)
    rows = 0
    for w in range(grid.shape[1] - 1):
        active = (grid[:, w + 1] >= 0).nonzero().squeeze(1)
        for part in active.split(policy.max_batch):
            t, t_next = sig[grid[part, w]], sig[grid[part, w + 1]]
            x = state[part]
            state[part] = ode_step(x, policy.velocity(x, t, cond, guidance, prompts[part]), t, t_next)
        rows += len(active)
    return state, rows


@torch.no_grad()
def branch(policy: Policy, cond: Conditioning, noise: torch.Tensor, units: Units, num_steps: int, guidance: float,
           noise_level: float, children: int, points: list[int], completion_steps: int = 0,
           keep_mean: bool = False) -> Branches:
    """ODE main path per unit from noise (n, C, H, W); M SDE children at each of `points`, each completed
    by ODE to t = 0 in batched calls over all children of all branch points."""
    n, m, sig, points = noise.shape[0], children, policy.sigmas(num_steps), sorted(points)
    shape, p = tuple(noise.shape[1:]), len(points)
    x = noise.float()
    state_x = x.new_empty((n, p, *shape))  # filled branch point by branch point, already unit-major
    x_next = x.new_empty((n, p, m, *shape))
    log_prob = x.new_empty((n, p, m))
    state_mean = x.new_empty((n, p, *shape)) if keep_mean else None
    t0, t_branch = time.perf_counter(), 0.0
    for j in range(points[-1] + 1):
        v = policy.velocity(x, sig[j], cond, guidance, units.prompt)
        if j in points:  # the main path's velocity serves the children: no extra call
            tb, k = time.perf_counter(), points.index(j)
            xr, vr = x.repeat_interleave(m, 0), v.repeat_interleave(m, 0)  # (n*m, C, H, W), this step only
            eps = unit_noise(units.seed, j, m, shape)  # (n*m, C, H, W), unit-major
            out = sde_step(xr, vr, sig[j], sig[j + 1], noise_level, noise=eps)
            state_x[:, k] = x
            x_next[:, k] = out.sample.view(n, m, *shape)
            log_prob[:, k] = out.log_prob.view(n, m)
            if state_mean is not None:  # the mean is x's and v's alone: one per state
                state_mean[:, k] = out.mean.view(n, m, *shape)[:, 0]
            t_branch += time.perf_counter() - tb
        x = ode_step(x, v, sig[j], sig[j + 1])
    t1 = time.perf_counter()
    steps = torch.tensor(points).repeat(n).repeat_interleave(m)  # (N,) in (unit, branch point, child) order
    unit = torch.arange(n).repeat_interleave(p * m)
    next_rows = x_next.view(n * p * m, *shape)
    final, done = _complete(policy, cond, next_rows.clone(), steps + 1, units.prompt[unit], sig, num_steps,
                            guidance, completion_steps)
    return Branches(state_x.view(n * p, *shape), None if state_mean is None else state_mean.view(n * p, *shape),
                    torch.arange(n * p).repeat_interleave(m), next_rows, steps, log_prob.view(-1), unit, final,
                    n * (points[-1] + 1) + done, t1 - t0 - t_branch, t_branch + time.perf_counter() - t1)


class TempFlowGRPO(SDEAlgorithm):
    """TempFlow-GRPO: branching rollouts, seed-group advantages, noise-aware weighting."""

    name = "tempflow_grpo"
    Config = TempFlowConfig

    def __init__(self, cfg, policy: Policy) -> None:
        super().__init__(cfg, policy)
        # running per-step within-group reward spread (branch_select=variance); starts equal everywhere
        self.spread = torch.ones(cfg.rollout.num_steps)

    def candidate_steps(self) -> list[int]:
        return self.cfg.candidate_steps(self.run.rollout.num_steps)

    def rollout(self, units: Units, cond: Conditioning, iteration: int, rng: random.Random) -> Transitions:
        r, c = self.run.rollout, self.cfg
        points = pick_branch_points(c, r.num_steps, rng, self.spread)
        noise = units.noise(self.policy.model.latent_shape(), self.policy.device)
        b = branch(self.policy, cond, noise, units, r.num_steps, r.guidance, c.noise_level, c.children, points,
                   c.completion_steps, keep_mean=c.ratio == "guard")
        t2 = time.perf_counter()
        images = decode_to_host(self.policy.model, b.final)
        prompt_of, seed_of = units.prompt[b.unit], units.slot[b.unit]
        return Transitions(
            images=images, image_prompt=prompt_of.clone(), image_seed=seed_of.clone(), image_step=b.step.clone(),
            row_image=torch.arange(len(b.unit)), nfe=b.rows * self.policy.forwards_per_row(r.guidance),
            timings={"main_s": b.main_s, "branch_s": b.branch_s, "decode_s": time.perf_counter() - t2},
            x=b.x, x_next=b.x_next, step=b.step, log_prob_old=b.log_prob, mean_old=b.mean,
            prompt_index=prompt_of, seed_index=seed_of)

    def observe(self, image_keys: torch.Tensor, rewards: torch.Tensor) -> None:
        from tempflow.math.advantages import group_ids

        group = group_ids(image_keys[:, 0], image_keys[:, 1], image_keys[:, 2])
        self.spread = update_spread(self.spread, rewards, image_keys[:, 2], group, self.cfg.branch_decay)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {"branch_spread": self.spread}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if "branch_spread" in tensors:
            self.spread = tensors["branch_spread"].clone()

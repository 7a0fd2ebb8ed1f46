"""AWM, Advantage Weighted Matching: flow matching weighted by the advantage, through a pseudo
log-probability.

- Rollouts: the current policy draws clean samples with a deterministic solver (classifier-free
  guidance 1 by default).
- Rows: each sample trains at one timestep per stratum of the sampler's grid (`timesteps` strata over
  grid indices first_index .. int(last_fraction T) - 1), with fresh noise each.
- Loss: l = mean((v - (eps - x0))^2); logp = -((l + 1e-10)^p - 1e-10^p) t / p (the generalised-Huber
  form); the policy term -A logp with A = clip(A, -c, c) / c, written as the ratio exp(logp - sg(logp))
  whose value is 1, as the paper's on-policy code computes it; plus kl_beta ||v - v_ref||^2 to the
  frozen base and anchor_beta ||v - v_anchor||^2 to an EMA of the trained weights (decay
  min(anchor_decay, 0.001 s) after s optimizer steps, updated after each iteration).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tempflow.algorithms.base import Algorithm, AlgorithmConfig, Policy, Units
from tempflow.algorithms.matching import DRAW_TAG, CleanSamples, OldPolicy, kl_to_reference, sample_clean
from tempflow.algorithms.rollout import unit_generator
from tempflow.config import require
from tempflow.math.losses import awm_log_prob, flow_matching_error
from tempflow.models.base import Conditioning
from tempflow.sampling import SOLVERS


@dataclass
class AWMConfig(AlgorithmConfig):
    name: str = "awm"
    kl_beta: float = 0.003  # weight of mean((v - v_ref)^2) to the frozen base (GenEval 0.003, PickScore 1e-4)
    anchor_beta: float = 1.0  # weight of mean((v - v_anchor)^2) to the EMA anchor
    anchor_decay: float = 0.3  # the anchor's EMA decay after s optimizer steps: min(anchor_decay, 0.001 s)
    power: float = 0.25  # p of the pseudo log-probability
    timesteps: int = 6  # strata of the grid; one timestep is drawn in each, per sample
    first_index: int = 1  # the strata start at this grid index (1: t = 1 is never trained)
    last_fraction: float = 0.9  # ... and end before grid index int(last_fraction * num_steps)
    solver: str = "dpm2"  # rollouts: dpm2 (DPM-Solver++ 2M) | euler
    train_guidance: float = 1.0  # guidance of the trained velocity; 1: the conditional velocity
    flat_groups: bool = True  # also train samples of groups without spread (only the KL and anchor act)

    def __post_init__(self) -> None:
        require(self.kl_beta >= 0 and self.anchor_beta >= 0, "algorithm.kl_beta and algorithm.anchor_beta must be >= 0")
        require(0 <= self.anchor_decay < 1, "algorithm.anchor_decay must be in [0, 1)")
        require(0 < self.power <= 1, "algorithm.power must be in (0, 1]")
        require(self.timesteps >= 1, "algorithm.timesteps must be >= 1")
        require(self.first_index >= 0, "algorithm.first_index must be >= 0")
        require(0 < self.last_fraction <= 1, "algorithm.last_fraction must be in (0, 1]")
        require(self.solver in SOLVERS, f"algorithm.solver must be one of {', '.join(SOLVERS)}")
        require(self.train_guidance >= 1, "algorithm.train_guidance must be >= 1 (1: no guidance)")

    def check(self, cfg) -> None:
        end = int(self.last_fraction * cfg.rollout.num_steps)
        require(end - self.first_index >= self.timesteps, f"algorithm.timesteps ({self.timesteps}) strata need "
                f"as many grid indices in {self.first_index}..{end - 1}: raise rollout.num_steps or "
                "algorithm.last_fraction, or lower algorithm.timesteps or algorithm.first_index")


def stratified_draws(seeds: list[int], first: int, end: int, count: int) -> torch.Tensor:
    """(n, count) grid indices per unit: one uniformly within each of `count` strata of first..end-1
    (boundaries linspace(first, end, count + 1) rounded down), each unit's from its own seed."""
    bounds = torch.linspace(first, end, count + 1).long()
    lo, width = bounds[:-1], bounds[1:] - bounds[:-1]
    return torch.stack([lo + (torch.rand(count, generator=unit_generator(s, DRAW_TAG)) * width).long()
                        for s in seeds])


class AWM(Algorithm):
    """Advantage Weighted Matching (docs/method.md)."""

    name = "awm"
    Config = AWMConfig
    groupings = ("prompt",)
    metrics = ("kl", "anchor", "fm_error")

    def __init__(self, cfg, policy: Policy) -> None:
        super().__init__(cfg, policy)
        self.anchor = OldPolicy(policy)

    def keeps_flat_groups(self) -> bool:
        return self.cfg.flat_groups

    def rollout(self, units: Units, cond: Conditioning, iteration: int, rng: random.Random) -> CleanSamples:
        r, c = self.run.rollout, self.cfg
        grid = stratified_draws(units.seed, c.first_index, int(c.last_fraction * r.num_steps), c.timesteps)
        return sample_clean(self.policy, units, cond, r.num_steps, r.guidance, c.solver, grid)

    def loss(self, batch: CleanSamples, idx: torch.Tensor, adv: torch.Tensor, cond: Conditioning
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, dev = self.cfg, self.policy.device
        x0, eps, x_t, t = batch.rows(idx, dev)
        rows = cond.index(batch.image_prompt[batch.row_image[idx]])
        v_anchor = self.anchor.velocity(x_t, t, rows, c.train_guidance) if c.anchor_beta > 0 else None
        v = self.policy.train_velocity(x_t, t, rows, c.train_guidance)
        err = flow_matching_error(v, x0, eps)
        logp = awm_log_prob(err, t, c.power)
        clip = self.run.advantage.clip
        a = adv.to(dev).clamp(-clip, clip) / clip
        loss = -(a * torch.exp(logp - logp.detach())).mean()
        parts = {"fm_error": err.detach().mean(), "kl": torch.tensor(float("nan")),
                 "anchor": torch.tensor(float("nan"))}
        if c.kl_beta > 0:
            kl = kl_to_reference(self.policy, v, x_t, t, rows, c.train_guidance)
            loss = loss + c.kl_beta * kl
            parts["kl"] = kl.detach()
        if v_anchor is not None:
            gap = (v - v_anchor).flatten(1).pow(2).mean(1).mean()
            loss = loss + c.anchor_beta * gap
            parts["anchor"] = gap.detach()
        return loss, parts

    def after_update(self, optimizer_steps: int) -> None:
        """anchor <- d anchor + (1 - d) theta, d = min(anchor_decay, 0.001 optimizer steps)."""
        self.anchor.update(min(self.cfg.anchor_decay, 0.001 * optimizer_steps))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.anchor.state("anchor"), {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.anchor.load_state(tensors, "anchor")

"""DiffusionNFT: negative-aware fine-tuning on the forward process.

- Rollouts: an old policy (an EMA of the trained weights, on the `decay_type` schedule) draws clean
  samples with a deterministic solver (diffusers' DPM-Solver++, second order), classifier-free
  guidance 1 by default.
- Rows: each sample trains at `timesteps` of the sampler's grid points, drawn per sample, with fresh
  noise each: x_t = (1 - t) x0 + t eps.
- Loss: the implicit positive and negative policies v+- mix the trained velocity with the old one
  (trust region beta); each predicts x0, and the error-normalised x0 losses are weighted by the
  optimality probability r of the sample's advantage; plus kl_beta ||v - v_ref||^2 to the frozen base.
- Groups without spread (all rewards equal: advantage 0, r = 1/2) are trained too: at r = 1/2 the
  loss pulls the velocity toward the old policy's, a trust region of its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tempflow.algorithms.base import Algorithm, AlgorithmConfig, Policy, Units
from tempflow.algorithms.matching import DRAW_TAG, CleanSamples, OldPolicy, kl_to_reference, sample_clean
from tempflow.algorithms.rollout import unit_generator
from tempflow.config import require
from tempflow.math.losses import nft_loss, nft_reward, old_policy_decay
from tempflow.models.base import Conditioning
from tempflow.sampling import SOLVERS


@dataclass
class NFTConfig(AlgorithmConfig):
    name: str = "nft"
    beta: float = 1.0  # trust region of the implicit policies, in (0, 1]: v+ = beta v + (1 - beta) v_old
    kl_beta: float = 1e-4  # weight of mean((v - v_ref)^2) to the frozen base
    loss_scale: float = 5.0  # the loss's constant factor (the advantage clip in the paper's code)
    timesteps: int = 9  # grid points trained per sample, drawn without replacement from the sampler's grid
    # the old policy's EMA decay after s optimizer steps: 0 none (old = theta); 1 min(0.001 s, 0.5);
    # 2 0 before s = 75, then min(0.0075 (s - 75), 0.999)
    decay_type: int = 1
    solver: str = "dpm2"  # rollouts: dpm2 (DPM-Solver++ 2M) | euler
    train_guidance: float = 1.0  # guidance of the trained (and old) velocity; 1: the conditional velocity
    flat_groups: bool = True  # also train samples of groups without spread (r = 1/2)

    def __post_init__(self) -> None:
        require(0 < self.beta <= 1, f"algorithm.beta must be in (0, 1], got {self.beta}")
        require(self.kl_beta >= 0, "algorithm.kl_beta must be >= 0")
        require(self.loss_scale > 0, "algorithm.loss_scale must be > 0")
        require(self.timesteps >= 1, "algorithm.timesteps must be >= 1")
        require(self.decay_type in (0, 1, 2), f"algorithm.decay_type must be 0, 1 or 2, got {self.decay_type}")
        require(self.solver in SOLVERS, f"algorithm.solver must be one of {', '.join(SOLVERS)}")
        require(self.train_guidance >= 1, "algorithm.train_guidance must be >= 1 (1: no guidance)")

    def check(self, cfg) -> None:
        require(self.timesteps <= cfg.rollout.num_steps, f"algorithm.timesteps must be <= rollout.num_steps "
                f"({cfg.rollout.num_steps}): they are drawn from the sampler's grid")


def grid_draws(seeds: list[int], num_steps: int, count: int) -> torch.Tensor:
    """(n, count) grid indices per unit, `count` of 0..num_steps-1 without replacement, in random order,
    each unit's from its own seed."""
    return torch.stack([torch.randperm(num_steps, generator=unit_generator(s, DRAW_TAG))[:count] for s in seeds])


class NFT(Algorithm):
    """DiffusionNFT (docs/method.md): forward-process training on the old policy's clean samples."""

    name = "nft"
    Config = NFTConfig
    groupings = ("prompt",)
    metrics = ("kl", "loss_pos", "loss_neg", "r_mean")

    def __init__(self, cfg, policy: Policy) -> None:
        super().__init__(cfg, policy)
        self.old = OldPolicy(policy)

    def keeps_flat_groups(self) -> bool:
        return self.cfg.flat_groups

    def rollout(self, units: Units, cond: Conditioning, iteration: int, rng: random.Random) -> CleanSamples:
        r, c = self.run.rollout, self.cfg
        grid = grid_draws(units.seed, r.num_steps, c.timesteps)  # (n, k)
        return sample_clean(self.policy, units, cond, r.num_steps, r.guidance, c.solver, grid, self.old.values)

    def loss(self, batch: CleanSamples, idx: torch.Tensor, adv: torch.Tensor, cond: Conditioning
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, dev = self.cfg, self.policy.device
        x0, _, x_t, t = batch.rows(idx, dev)
        rows = cond.index(batch.image_prompt[batch.row_image[idx]])
        v_old = self.old.velocity(x_t, t, rows, c.train_guidance)  # before the trained forward: it swaps weights
        v = self.policy.train_velocity(x_t, t, rows, c.train_guidance)
        r = nft_reward(adv.to(dev), self.run.advantage.clip)
        per_row, pos, neg = nft_loss(v, v_old, x_t, x0, t, r, c.beta, c.loss_scale)
        loss = per_row.mean()
        parts = {"loss_pos": pos.mean(), "loss_neg": neg.mean(), "r_mean": r.mean(), "kl": torch.tensor(float("nan"))}
        if c.kl_beta > 0:
            kl = kl_to_reference(self.policy, v, x_t, t, rows, c.train_guidance)
            loss = loss + c.kl_beta * kl
            parts["kl"] = kl.detach()
        return loss, parts

    def after_update(self, optimizer_steps: int) -> None:
        """old <- d old + (1 - d) theta, d on the decay_type schedule of the optimizer steps so far."""
        self.old.update(old_policy_decay(optimizer_steps, self.cfg.decay_type))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.old.state("old"), {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.old.load_state(tensors, "old")

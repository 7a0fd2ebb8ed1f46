"""TempFlow credit with a forward-process loss: TempFlow-GRPO's branching rollouts (per-step rewards
from seed groups) train a likelihood-free update instead of the SDE log-probability ratio.

For branch point k at noise level sigma_k, the K children of one state x_k share the prefix and the
seed, so the spread of their rewards is caused by the step at k alone; A_kj are their seed-group
advantages and x0_j their clean samples.

- objective=local: DiffusionNFT's loss on the children at times t drawn in (0, sigma_k], the same
  (t, eps) for the siblings of one state (`draws` of them per state), optionally times TempFlow's
  noise-aware weight of step k. The old policy (an EMA on NFT's decay schedule) draws the rollouts
  and supplies v_old.
- objective=anchored: the trained velocity at the branch state regresses toward the
  advantage-weighted directions of the children's clean samples,
  L = (1/K) sum_j A_kj ||v(x_k, sigma_k) - (x_k - x0_j) / sigma_k||^2 (averaged over dims), whose
  gradient in v is (2 / (K sigma_k)) sum_j A_kj x0_j for zero-sum advantages.
- objective=both: their sum (the anchored term weighted by anchored_weight), in one model call.
Both add kl_beta ||v - v_ref||^2 to the frozen base.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from tempflow.algorithms.base import Algorithm, AlgorithmConfig, Policy, Units
from tempflow.algorithms.matching import DRAW_TAG, NOISE_TAG, CleanSamples, OldPolicy, kl_to_reference
from tempflow.algorithms.rollout import decode_to_host, mixed_seed, unit_generator
from tempflow.algorithms.tempflow_grpo import BranchConfig, branch, pick_branch_points, update_spread
from tempflow.config import require
from tempflow.math.losses import anchored_loss, nft_loss, nft_reward, old_policy_decay
from tempflow.math.sde import noise_weights
from tempflow.models.base import Conditioning

OBJECTIVES = ("local", "anchored", "both")


@dataclass
class TempFlowNFTConfig(BranchConfig, AlgorithmConfig):
    name: str = "tempflow_nft"
    noise_level: float = 0.7  # a, the SDE noise of the children's branching step
    objective: str = "local"  # local (NFT on the children) | anchored (at the branch state) | both
    beta: float = 1.0  # local: NFT's trust region, in (0, 1]
    loss_scale: float = 5.0  # local: NFT's constant factor
    draws: int = 2  # local: (t, eps) draws per branch state, t in (0, sigma_k], shared by its children
    anchored_weight: float = 1.0  # weight of the anchored term
    kl_beta: float = 1e-4  # weight of mean((v - v_ref)^2) to the frozen base
    noise_weighting: bool = False  # local: times std_k / mean std of the branch points (TempFlow's weight)
    decay_type: int = 1  # old policy EMA (rollouts and v_old): as NFT's decay_type
    train_guidance: float = 1.0  # guidance of the trained (and old) velocity; 1: the conditional velocity
    flat_groups: bool = True  # also train children of groups without spread (local: r = 1/2)

    def __post_init__(self) -> None:
        require(self.noise_level > 0, "algorithm.noise_level must be > 0 (the children need spread)")
        require(self.objective in OBJECTIVES, f"algorithm.objective must be one of {', '.join(OBJECTIVES)}")
        require(0 < self.beta <= 1, f"algorithm.beta must be in (0, 1], got {self.beta}")
        require(self.loss_scale > 0 and self.anchored_weight > 0, "algorithm.loss_scale and "
                "algorithm.anchored_weight must be > 0")
        require(self.draws >= 1, "algorithm.draws must be >= 1")
        require(self.kl_beta >= 0, "algorithm.kl_beta must be >= 0")
        require(self.decay_type in (0, 1, 2), f"algorithm.decay_type must be 0, 1 or 2, got {self.decay_type}")
        require(self.train_guidance >= 1, "algorithm.train_guidance must be >= 1 (1: no guidance)")

    def check(self, cfg) -> None:
        self.check_branching(cfg.rollout.num_steps)


@dataclass(kw_only=True)
class BranchSamples(CleanSamples):
    """Children of branch states as clean samples. Image i branched from state image_state[i]:
    state_x[s] at grid index state_step[s]."""

    image_state: torch.Tensor  # (I,) the state each child branched from
    state_x: torch.Tensor  # (S, C, H, W) the main path's state at the branch point
    state_step: torch.Tensor  # (S,) its grid index k

    def state_keys(self) -> torch.Tensor:
        """Rows of one state and one draw share (t, eps), and the state's model call (anchored)."""
        img = self.row_image.cpu()
        return torch.stack([self.image_prompt[img], self.image_seed[img], self.image_step[img], self.row_draw], 1)


class TempFlowNFT(Algorithm):
    """TempFlow's branch credit driving a forward-process (likelihood-free) update."""

    name = "tempflow_nft"
    Config = TempFlowNFTConfig
    metrics = ("kl", "loss_local", "loss_anchored")

    def __init__(self, cfg, policy: Policy) -> None:
        super().__init__(cfg, policy)
        self.old = OldPolicy(policy)
        self.sigmas = policy.sigmas(cfg.rollout.num_steps)
        steps = self.cfg.candidate_steps(cfg.rollout.num_steps)
        self.weights = torch.ones(cfg.rollout.num_steps)
        if self.cfg.noise_weighting:
            self.weights[steps] = noise_weights(self.sigmas, self.cfg.noise_level, steps)
        self.spread = torch.ones(cfg.rollout.num_steps)  # branch_select=variance, as TempFlow-GRPO

    def keeps_flat_groups(self) -> bool:
        return self.cfg.flat_groups

    def rollout(self, units: Units, cond: Conditioning, iteration: int, rng: random.Random) -> BranchSamples:
        r, c = self.run.rollout, self.cfg
        points = pick_branch_points(c, r.num_steps, rng, self.spread)
        noise = units.noise(self.policy.model.latent_shape(), self.policy.device)
        with self.policy.holding(self.old.values):
            b = branch(self.policy, cond, noise, units, r.num_steps, r.guidance, c.noise_level, c.children, points,
                       c.completion_steps)
        t2 = time.perf_counter()
        images = decode_to_host(self.policy.model, b.final)
        m, d = c.children, c.draws
        image_state = b.state  # children are (unit, branch point, child)-major: state = child // m
        state_step, state_unit = b.step[::m].clone(), b.unit[::m]  # (S,) each
        # draw g of state s: t = sigma_k (1 - u), u uniform in [0, 1), and a noise seed, shared by its children
        seeds = [units.seed[int(u)] for u in state_unit]
        u = torch.stack([torch.rand(d, generator=unit_generator(s, DRAW_TAG + int(k))) for s, k in
                         zip(seeds, state_step)])  # (S, d)
        t = self.sigmas[state_step].unsqueeze(1) * (1 - u)
        noise_seed = torch.tensor([[mixed_seed(s, NOISE_TAG + 64 * int(k) + g) for g in range(d)]
                                   for s, k in zip(seeds, state_step)], dtype=torch.long)  # (S, d)
        row_image = torch.arange(len(b.unit)).repeat_interleave(d)
        row_state = image_state[row_image]
        row_draw = torch.arange(d).repeat(len(b.unit))
        prompt_of, seed_of = units.prompt[b.unit], units.slot[b.unit]
        return BranchSamples(
            images=images, image_prompt=prompt_of, image_seed=seed_of, image_step=b.step.clone(), row_image=row_image,
            nfe=b.rows * self.policy.forwards_per_row(r.guidance),
            timings={"main_s": b.main_s, "branch_s": b.branch_s, "decode_s": time.perf_counter() - t2},
            x0=b.final, row_t=t[row_state, row_draw], row_noise=noise_seed[row_state, row_draw], row_draw=row_draw,
            image_state=image_state, state_x=b.state_x, state_step=state_step)

    def loss(self, batch: BranchSamples, idx: torch.Tensor, adv: torch.Tensor, cond: Conditioning
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The local and/or anchored terms of rows idx (and the KL), from one trained forward over the
        rows' x_t (local) followed by their branch states, once each (anchored)."""
        c, dev, g = self.cfg, self.policy.device, self.cfg.train_guidance
        img, adv = batch.row_image[idx], adv.to(dev)
        prompts = batch.image_prompt[img]
        local, anchored = c.objective in ("local", "both"), c.objective in ("anchored", "both")
        xs, ts, ps = [], [], []
        if local:
            x0, _, x_t, t = batch.rows(idx, dev)
            xs, ts, ps = [x_t], [t], [prompts]
            v_old = self.old.velocity(x_t, t, cond.index(prompts), g)  # before the trained forward: it swaps weights
        if anchored:
            states, inv = torch.unique(batch.image_state[img], return_inverse=True)  # the rows' states, once each
            first = torch.zeros(len(states), dtype=torch.long).scatter_(0, inv, torch.arange(len(img)))
            xs.append(batch.state_x[states].to(dev).float())
            ts.append(self.sigmas[batch.state_step[states]].to(dev))
            ps.append(prompts[first])
        x_all, t_all, rows = torch.cat(xs), torch.cat(ts), cond.index(torch.cat(ps))
        v_all = self.policy.train_velocity(x_all, t_all, rows, g)
        nan = torch.tensor(float("nan"))
        loss, parts = torch.zeros((), device=dev), {"loss_local": nan, "loss_anchored": nan, "kl": nan}
        n = len(idx) if local else 0
        if local:
            term = self._local(batch, img, v_all[:n], v_old, x_t, x0, t, adv)
            loss, parts["loss_local"] = loss + term, term.detach()
        if anchored:
            term = self._anchored(batch, img, v_all[n:][inv], t_all[n:][inv], adv)
            loss, parts["loss_anchored"] = loss + c.anchored_weight * term, term.detach()
        if c.kl_beta > 0:
            kl = kl_to_reference(self.policy, v_all, x_all, t_all, rows, g)
            loss, parts["kl"] = loss + c.kl_beta * kl, kl.detach()
        return loss, parts

    def _local(self, batch: BranchSamples, img: torch.Tensor, v: torch.Tensor, v_old: torch.Tensor,
               x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """NFT's loss on the children's rows, each times its branch point's step weight."""
        r = nft_reward(adv, self.run.advantage.clip)
        per_row, _, _ = nft_loss(v, v_old, x_t, x0, t, r, self.cfg.beta, self.cfg.loss_scale)
        return (per_row * self.weights[batch.image_step[img]].to(v.device)).mean()

    def _anchored(self, batch: BranchSamples, img: torch.Tensor, v_state: torch.Tensor, sigma: torch.Tensor,
                  adv: torch.Tensor) -> torch.Tensor:
        """The anchored loss of each row's child at its branch state (v_state: the state's velocity per
        row), averaged over rows and dims."""
        dev = v_state.device
        x0 = batch.x0[img].to(dev).float()
        x_k = batch.state_x[batch.image_state[img]].to(dev).float()
        clip = self.run.advantage.clip
        return anchored_loss(v_state, x_k, x0, adv.clamp(-clip, clip), sigma).mean() / x0[0].numel()

    def observe(self, image_keys: torch.Tensor, rewards: torch.Tensor) -> None:
        from tempflow.math.advantages import group_ids

        group = group_ids(image_keys[:, 0], image_keys[:, 1], image_keys[:, 2])
        self.spread = update_spread(self.spread, rewards, image_keys[:, 2], group, self.cfg.branch_decay)

    def after_update(self, optimizer_steps: int) -> None:
        self.old.update(old_policy_decay(optimizer_steps, self.cfg.decay_type))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {**self.old.state("old"), "branch_spread": self.spread}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.old.load_state(tensors, "old")
        self.spread = tensors["branch_spread"].clone()

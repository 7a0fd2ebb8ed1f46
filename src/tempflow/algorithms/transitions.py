"""SDE transitions and the clipped surrogate: what Flow-GRPO and TempFlow-GRPO share.

Both sample stochastic steps x_j -> x_{j+1} of Flow-GRPO's reverse SDE, keep each transition with its
log-probability under the sampling policy, and train the clipped surrogate of the likelihood ratio
(optionally GRPO-Guard's normalised ratio), each step weighted, plus a KL term to the frozen base.
With classifier-free guidance the trained velocity is v_u + g (v_c - v_u); `detach_uncond` keeps its
gradient to the conditional half (the values, and so the ratio, are unchanged).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from tempflow.algorithms.base import Algorithm, AlgorithmConfig, Batch, Policy, SharedRows
from tempflow.algorithms.rollout import first_rows
from tempflow.config import require
from tempflow.errors import ConfigError
from tempflow.math.advantages import group_ids
from tempflow.math.losses import guard_log_ratio, kl_loss, policy_loss
from tempflow.math.sde import noise_weights, sde_step
from tempflow.models.base import Conditioning

RATIOS = ("plain", "guard")


@dataclass
class SDEConfig(AlgorithmConfig):
    """Options of every SDE-transition algorithm."""

    noise_level: float = 0.7  # a, the SDE noise level (0.7 for SD3.5, 0.9 for FLUX)
    clip_range: float = 1e-4  # eps of the clipped surrogate (log-probabilities are averaged over dims)
    kl_beta: float = 0.004  # weight of the KL term to the frozen base
    noise_weighting: bool = False  # multiply each step's surrogate by std_j / mean std of the trained steps
    # plain: r = pi_theta / pi_old; guard: GRPO-Guard's normalised ratio exp(mean(z (mu_theta - mu_old)))
    ratio: str = "plain"
    # with classifier-free guidance: detach the unconditional half of the trained velocity, so that the
    # gradient flows only through the conditional half (false: through both, v_u + g (v_c - v_u))
    detach_uncond: bool = False

    def __post_init__(self) -> None:
        require(self.noise_level > 0, "algorithm.noise_level must be > 0 (0 makes every step deterministic)")
        require(self.clip_range > 0, "algorithm.clip_range must be > 0, e.g. 1e-4")
        require(self.kl_beta >= 0, "algorithm.kl_beta must be >= 0")
        require(self.ratio in RATIOS, f"algorithm.ratio must be one of {', '.join(RATIOS)}")

    def check_guidance(self, guidance: float) -> None:
        """detach_uncond needs an unconditional half: classifier-free guidance in the rollouts."""
        require(not self.detach_uncond or guidance != 1.0,
                "algorithm.detach_uncond needs classifier-free guidance (rollout.guidance > 1): at guidance 1 "
                "the trained velocity has no unconditional half; set algorithm.detach_uncond=false")


def check_uncond_gradient(model: Any, detach_uncond: bool) -> None:
    """Refuse detach_uncond for a model without a doubled-batch guidance (FLUX.1-dev takes guidance as an
    input of the transformer: its velocity has no unconditional half)."""
    if detach_uncond and (not getattr(model, "cfg_batch", True) or not hasattr(model, "uncond_detached")):
        raise ConfigError(f"algorithm.detach_uncond: {type(model).__name__} has no unconditional half to detach "
                          "(its guidance is not a doubled batch); set algorithm.detach_uncond=false")


def uncond_gradient(model: Any, detach_uncond: bool) -> contextlib.AbstractContextManager:
    """The context in which `model`'s guided velocity is trained: its unconditional half detached, or as is."""
    check_uncond_gradient(model, detach_uncond)
    return model.uncond_detached() if detach_uncond else contextlib.nullcontext()


@dataclass(kw_only=True)
class Transitions(Batch):
    """Trained SDE transitions (N rows). Rows with the same (prompt, seed, step) start from the same
    state x (a branch point's children): the update runs the model once per state."""

    x: torch.Tensor | SharedRows  # (N, C, H, W) state before the transition (children may share it)
    x_next: torch.Tensor  # (N, C, H, W) sampled next state
    step: torch.Tensor  # (N,) index j on the sigma grid
    log_prob_old: torch.Tensor  # (N,) under the sampling policy
    mean_old: torch.Tensor | SharedRows | None = None  # (N, C, H, W) the sampling policy's mean (ratio=guard only)
    prompt_index: torch.Tensor  # (N,) row of the iteration's prompts / conditioning
    seed_index: torch.Tensor  # (N,) seed slot within the prompt

    def state_keys(self) -> torch.Tensor:
        return torch.stack([self.prompt_index, self.seed_index, self.step], 1).cpu()


class SDEAlgorithm(Algorithm):
    """The loss of SDE transitions; subclasses define the rollout and the steps that can be trained."""

    metrics = ("kl", "clip_frac", "ratio_mean")

    def __init__(self, cfg, policy: Policy) -> None:
        super().__init__(cfg, policy)
        self.cfg.check_guidance(cfg.rollout.guidance)
        check_uncond_gradient(policy.model, self.cfg.detach_uncond)
        self.sigmas = policy.sigmas(cfg.rollout.num_steps)
        self.weights = self.step_weights()

    def candidate_steps(self) -> list[int]:
        """The grid steps this algorithm may train (the noise weights average 1 over them)."""
        raise NotImplementedError

    def step_weights(self) -> torch.Tensor:
        """(T,) weight of each grid step's surrogate: noise-aware (std_j / mean std) or all ones."""
        w = torch.ones(self.run.rollout.num_steps)
        if self.cfg.noise_weighting:
            steps = self.candidate_steps()
            w[steps] = noise_weights(self.sigmas, self.cfg.noise_level, steps)
        return w

    def loss(self, batch: Transitions, idx: torch.Tensor, adv: torch.Tensor, cond: Conditioning
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped surrogate (and KL) of rows idx; one model call per distinct state."""
        c, guidance = self.cfg, self.run.rollout.guidance
        ids = group_ids(*batch.state_keys()[idx.cpu()].T)
        first = idx[first_rows(ids)]
        ids = ids.to(batch.x.device)
        xs, ts, rows = batch.x[first], self.sigmas[batch.step[first].cpu()], cond.index(batch.prompt_index[first])
        with uncond_gradient(self.policy.model, c.detach_uncond):
            v = self.policy.train_velocity(xs, ts, rows, guidance)[ids]
        step = batch.step[idx].cpu()
        x, t, t_next = batch.x[idx], self.sigmas[step], self.sigmas[step + 1]
        out = sde_step(x, v, t, t_next, c.noise_level, prev=batch.x_next[idx])
        dev = out.log_prob.device
        if c.ratio == "guard":
            lp, lp_old = guard_log_ratio(batch.x_next[idx].float(), out.mean, batch.mean_old[idx].float(),
                                         out.std), torch.zeros_like(out.log_prob)
        else:
            lp, lp_old = out.log_prob, batch.log_prob_old[idx].to(dev)
        pol = policy_loss(lp, lp_old, adv.to(dev), c.clip_range, self.weights[step].to(dev))
        parts = {"clip_frac": pol.clip_frac, "ratio_mean": pol.ratio.mean(), "kl": torch.tensor(float("nan"))}
        if c.kl_beta == 0:
            return pol.loss, parts
        v_ref = self.policy.reference_velocity(xs, ts, rows, guidance)[ids]
        ref_mean = sde_step(x, v_ref, t, t_next, c.noise_level, prev=batch.x_next[idx]).mean
        kl = kl_loss(out.mean, ref_mean, out.std)
        parts["kl"] = kl.detach()
        return pol.loss + c.kl_beta * kl, parts

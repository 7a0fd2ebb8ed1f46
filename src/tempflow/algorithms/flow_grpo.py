"""Flow-GRPO and its variants: SDE trajectories, one terminal reward each, prompt-group advantages.

- window: SDE on every step (all), on a fixed window, a random one or one sliding later over the run
  (MixGRPO); ODE elsewhere. Only the window's steps are trained.
- fast (Flow-GRPO-Fast): the trajectories of a prompt share one initial noise and the ODE path up to
  the window (computed once per prompt), so they differ only from the window's SDE steps on.
- ratio=guard (GRPO-Guard): the normalised ratio instead of the plain likelihood ratio.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from tempflow.algorithms.base import Policy, Units
from tempflow.algorithms.rollout import decode_to_host, first_rows, unit_noise
from tempflow.algorithms.transitions import SDEAlgorithm, SDEConfig, Transitions
from tempflow.config import require
from tempflow.math.flow import ode_step
from tempflow.math.sde import sde_step
from tempflow.models.base import Conditioning

WINDOWS = ("all", "fixed", "random", "sliding")


@dataclass
class FlowGRPOConfig(SDEConfig):
    name: str = "flow_grpo"
    window: str = "all"  # SDE steps: all (0..T-2) | fixed | random | sliding
    window_size: int = 0  # steps in the window (fixed, random, sliding)
    window_start: int = 0  # first SDE step of a fixed window
    window_shift_every: int = 10  # sliding: iterations before the window moves one step later
    # Flow-GRPO-Fast: a prompt's trajectories share one initial noise and the ODE path up to the window
    fast: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.window in WINDOWS, f"algorithm.window must be one of {', '.join(WINDOWS)}")
        require(self.window_shift_every >= 1, "algorithm.window_shift_every must be >= 1")

    def check(self, cfg) -> None:
        last = cfg.rollout.num_steps - 2  # the final step to t = 0 stays deterministic
        require(cfg.rollout.seeds_per_prompt >= 2, "rollout.seeds_per_prompt must be >= 2 for flow_grpo groups")
        self.check_guidance(cfg.rollout.guidance)
        if self.window != "all":
            require(1 <= self.window_size <= last + 1, f"algorithm.window_size must be in 1..{last + 1}")
        if self.window == "fixed":
            require(0 <= self.window_start and self.window_start + self.window_size <= last + 1,
                    f"algorithm.window_start + window_size must be <= {last + 1}")

    def candidate_steps(self, num_steps: int) -> list[int]:
        """The steps that can be trained: the fixed window, or every step but the last."""
        if self.window == "fixed":
            return list(range(self.window_start, self.window_start + self.window_size))
        return list(range(num_steps - 1))


def window_steps(cfg: FlowGRPOConfig, num_steps: int, iteration: int, rng: random.Random) -> list[int]:
    """This iteration's SDE steps."""
    last = num_steps - 2
    if cfg.window == "all":
        return list(range(last + 1))
    if cfg.window == "fixed":
        return list(range(cfg.window_start, cfg.window_start + cfg.window_size))
    span = last + 1 - cfg.window_size
    start = rng.randint(0, span) if cfg.window == "random" else min(iteration // cfg.window_shift_every, span)
    return list(range(start, start + cfg.window_size))


@torch.no_grad()
def _shared_prefix(policy: Policy, cond: Conditioning, noise: torch.Tensor, prompts: torch.Tensor,
                   sig: torch.Tensor, guidance: float, steps: int) -> tuple[torch.Tensor, int]:
    """ODE from each unit's (shared) noise through `steps` steps, computed once per prompt: (x, rows run)."""
    _, inv = torch.unique(prompts, return_inverse=True)
    rep = first_rows(inv)  # one unit per prompt
    x = noise[rep].float()
    for j in range(steps):
        x = ode_step(x, policy.velocity(x, sig[j], cond, guidance, prompts[rep]), sig[j], sig[j + 1])
    return x[inv.to(x.device)], len(rep) * steps


@torch.no_grad()
def sde_trajectories(policy: Policy, cond: Conditioning, noise: torch.Tensor, units: Units, num_steps: int,
                     guidance: float, noise_level: float, sde_steps: list[int], shared_prefix: bool = False,
                     keep_mean: bool = False) -> Transitions:
    """One trajectory per unit from noise (n, C, H, W): SDE on `sde_steps`, ODE elsewhere. Rows are
    unit-major (unit, SDE step); every row receives its trajectory's terminal reward. With
    shared_prefix the steps before the first SDE step run once per prompt (noise shared by its units)."""
    n, sig = len(units), policy.sigmas(num_steps)
    t0 = time.perf_counter()
    x, start, rows = noise.float(), 0, 0
    if shared_prefix and sde_steps[0] > 0:
        x, rows = _shared_prefix(policy, cond, noise, units.prompt, sig, guidance, sde_steps[0])
        start = sde_steps[0]
    xs, nexts, lps, means = [], [], [], []
    for j in range(start, num_steps):
        v = policy.velocity(x, sig[j], cond, guidance, units.prompt)
        rows += n
        if j in sde_steps:
            eps = unit_noise(units.seed, j, 1, tuple(x.shape[1:]))  # (n, C, H, W)
            out = sde_step(x, v, sig[j], sig[j + 1], noise_level, noise=eps)
            xs.append(x)
            nexts.append(out.sample)
            lps.append(out.log_prob)
            means.append(out.mean if keep_mean else None)
            x = out.sample
        else:
            x = ode_step(x, v, sig[j], sig[j + 1])
    k = len(sde_steps)
    t1 = time.perf_counter()
    images = decode_to_host(policy.model, x)
    return Transitions(
        images=images, image_prompt=units.prompt.clone(), image_seed=units.slot.clone(),
        image_step=torch.full((n,), -1),
        row_image=torch.arange(n).repeat_interleave(k), nfe=rows * policy.forwards_per_row(guidance),
        timings={"main_s": t1 - t0, "branch_s": 0.0, "decode_s": time.perf_counter() - t1},
        x=torch.stack(xs, 1).flatten(0, 1), x_next=torch.stack(nexts, 1).flatten(0, 1),  # (n*k, C, H, W)
        step=torch.tensor(sde_steps).repeat(n), log_prob_old=torch.stack(lps, 1).flatten(),
        mean_old=torch.stack(means, 1).flatten(0, 1) if keep_mean else None,
        prompt_index=units.prompt.repeat_interleave(k), seed_index=units.slot.repeat_interleave(k),
    )


class FlowGRPO(SDEAlgorithm):
    """Flow-GRPO: SDE trajectories (on a window of steps), prompt groups, the clipped surrogate."""

    name = "flow_grpo"
    Config = FlowGRPOConfig
    groupings = ("prompt",)

    def candidate_steps(self) -> list[int]:
        return self.cfg.candidate_steps(self.run.rollout.num_steps)

    def rollout(self, units: Units, cond: Conditioning, iteration: int, rng: random.Random) -> Transitions:
        r, c = self.run.rollout, self.cfg
        steps = window_steps(c, r.num_steps, iteration, rng)
        noise = units.noise(self.policy.model.latent_shape(), self.policy.device, shared=c.fast)
        return sde_trajectories(self.policy, cond, noise, units, r.num_steps, r.guidance, c.noise_level, steps,
                                shared_prefix=c.fast, keep_mean=c.ratio == "guard")


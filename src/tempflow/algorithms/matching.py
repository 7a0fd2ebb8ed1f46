"""What the likelihood-free algorithms share (DiffusionNFT, AWM, TempFlow credit).

They train on clean samples x0 (of a deterministic solver, or of TempFlow's branches) through the
forward process x_t = (1 - t) x0 + t eps: a row is one (image, t, eps). The noise of a row is drawn
from a seed kept with the row, so a batch holds no noise tensors and any process redraws the same.
An old policy (an EMA of the trained weights) samples the rollouts and anchors the update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tempflow.algorithms.base import Batch, Policy, Units
from tempflow.algorithms.rollout import decode_to_host, mixed_seed, seeded_noise
from tempflow.math.flow import interpolate
from tempflow.models.base import Conditioning
from tempflow.sampling import solve
from tempflow.training.ema import ema_update

NOISE_TAG = 1 << 20  # a row's noise: tag NOISE_TAG + its draw (distinct from the SDE steps' tags 0..T)
DRAW_TAG = 1 << 21  # a unit's draw of its training times


@dataclass(kw_only=True)
class CleanSamples(Batch):
    """Rollout images with their clean samples, and forward-process rows: row i trains at time
    row_t[i] on x0[row_image[i]] with noise drawn from row_noise[i]."""

    x0: torch.Tensor  # (I, C, H, W) each image's clean sample, in model space
    row_t: torch.Tensor  # (N,) time of each row, in (0, 1]
    row_noise: torch.Tensor  # (N,) int64 seed of each row's noise
    row_draw: torch.Tensor  # (N,) which draw of its image the row is (rows of one image differ in it)

    def state_keys(self) -> torch.Tensor:
        img = self.row_image.cpu()
        return torch.stack([self.image_prompt[img].cpu(), self.image_seed[img].cpu(), self.image_step[img].cpu(),
                            self.row_draw.cpu()], 1)

    def rows(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
        """(x0, eps, x_t, t) of rows idx on `device`."""
        x0 = self.x0[self.row_image[idx]].to(device).float()
        eps = seeded_noise(self.row_noise[idx].cpu(), tuple(x0.shape[1:])).to(device)
        t = self.row_t[idx].to(device).float()
        return x0, eps, interpolate(x0, eps, t), t


class OldPolicy:
    """A copy of the trained weights kept as their EMA: old <- decay old + (1 - decay) theta."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.values = policy.snapshot()

    def update(self, decay: float) -> None:
        ema_update(self.values, self.policy.params, decay)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """The old policy's velocity (no gradient)."""
        with self.policy.holding(self.values):
            return self.policy.velocity(x, t, cond, guidance, rows)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{i}": v for i, v in enumerate(self.values)}

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        missing = [i for i in range(len(self.values)) if f"{prefix}.{i}" not in tensors]
        if missing:
            from tempflow.training.checkpoint import CheckpointError

            raise CheckpointError(f"checkpoint lacks the {prefix} weights: it was written by another algorithm")
        with torch.no_grad():
            for i, v in enumerate(self.values):
                v.copy_(tensors[f"{prefix}.{i}"])


@torch.no_grad()
def sample_clean(policy: Policy, units: Units, cond: Conditioning, num_steps: int, guidance: float, solver: str,
                 grid: torch.Tensor, weights: list[torch.Tensor] | None = None) -> CleanSamples:
    """One clean sample per unit by the deterministic `solver` on the model's grid (the policy holding
    `weights` if given), and its rows: sample i trains at the grid times grid[i] (n, k), each with
    noise of its own."""
    sig, n, k = policy.sigmas(num_steps), len(units), grid.shape[1]
    t0 = time.perf_counter()
    noise = units.noise(policy.model.latent_shape(), policy.device)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return policy.velocity(x, t, cond, guidance, units.prompt)

    if weights is None:
        x0 = solve(velocity, noise, sig, solver)
    else:
        with policy.holding(weights):
            x0 = solve(velocity, noise, sig, solver)
    t1 = time.perf_counter()
    images = decode_to_host(policy.model, x0)
    seeds = [mixed_seed(s, NOISE_TAG + int(j)) for s, js in zip(units.seed, grid) for j in js]
    return CleanSamples(
        images=images, image_prompt=units.prompt.clone(), image_seed=units.slot.clone(),
        image_step=torch.full((n,), -1), row_image=torch.arange(n).repeat_interleave(k),
        nfe=n * num_steps * policy.forwards_per_row(guidance),
        timings={"main_s": t1 - t0, "branch_s": 0.0, "decode_s": time.perf_counter() - t1},
        x0=x0, row_t=sig[grid.flatten()], row_noise=torch.tensor(seeds, dtype=torch.long), row_draw=grid.flatten())


def kl_to_reference(policy: Policy, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                    guidance: float) -> torch.Tensor:
    """mean over rows of mean((v - v_ref)^2): the velocity's distance to the frozen base's."""
    v_ref = policy.reference_velocity(x_t, t, cond, guidance)
    return (v - v_ref).flatten(1).pow(2).mean(1).mean()

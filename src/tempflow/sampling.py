"""ODE sampling of any FlowModel on its own sigma grid: Euler steps, or diffusers' DPM-Solver++."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from tempflow.math.flow import ode_step
from tempflow.models.base import Conditioning, FlowModel


def initial_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """One noise tensor per seed, independent of batch size: (len(seeds), *shape)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


@torch.no_grad()
def ode_sample(
    model: FlowModel, noise: torch.Tensor, cond: Conditioning, num_steps: int, guidance: float
) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0) with Euler steps; returns model-space samples."""
    sig = model.sigmas(num_steps).to(noise.device)
    x = noise.float()
    for j in range(num_steps):
        t = sig[j].expand(x.shape[0])
        v = model.velocity(x, t, cond, guidance)
        x = ode_step(x, v, sig[j], sig[j + 1])
    return x


@torch.no_grad()
def generate(
    model: FlowModel,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 40,
    guidance: float = 4.5,
    batch_size: int = 128,
    solver: str = "euler",
) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1], one per (prompt, seed), batched; `solver` as in `solve`."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt is required")
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        noise = initial_noise(model.latent_shape(), seeds[i : i + batch_size], device)
        cond = model.encode_prompts(chunk)
        if solver == "euler":
            x = ode_sample(model, noise, cond, num_steps, guidance)
        else:
            def velocity(z: torch.Tensor, t: torch.Tensor, cond: Conditioning = cond) -> torch.Tensor:
                return model.velocity(z, t.expand(z.shape[0]), cond, guidance)

            x = solve(velocity, noise, model.sigmas(num_steps).to(noise.device), solver)
        out.append(model.decode(x).cpu())
    return torch.cat(out)


SOLVERS = ("euler", "dpm2")


@torch.no_grad()
def solve(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, sigmas: torch.Tensor,
          solver: str = "euler") -> torch.Tensor:
    """Integrate the probability-flow ODE from noise (t = sigmas[0] = 1) to data on `sigmas` (T + 1,).

    velocity(x, t) gives v at x (B, ...) and the scalar time t. euler: x + dt v per step; dpm2: diffusers'
    DPM-Solver++ (second-order multistep, flow-matching form: x0 = x - t v) on the same grid, first
    order at the first and the last step."""
    if solver == "euler":
        x = noise.float()
        for j in range(len(sigmas) - 1):
            x = ode_step(x, velocity(x, sigmas[j]), sigmas[j], sigmas[j + 1])
        return x
    if solver != "dpm2":
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2,
                                    algorithm_type="dpmsolver++", final_sigmas_type="zero")
    with warnings.catch_warnings():  # numpy 2's copy keyword, deep inside the scheduler's own schedule
        warnings.simplefilter("ignore", DeprecationWarning)
        s.set_timesteps(len(sigmas) - 1)
    s.sigmas = sigmas.detach().float().cpu().clone()  # the model's own grid, shift and all
    s.timesteps = s.sigmas[:-1] * s.config.num_train_timesteps
    s.set_begin_index(0)  # steps are taken in order: no lookup of the timestep in the schedule
    x = noise.float()
    for j in range(len(sigmas) - 1):
        x = s.step(velocity(x, sigmas[j]).float(), s.timesteps[j], x, return_dict=False)[0]
    return x

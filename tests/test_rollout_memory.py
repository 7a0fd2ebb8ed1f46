"""Bounded rollout memory gives the same numbers as the plain layout.

The reference below is the rollout as it was written before states were shared: every child holds its
own copy of the state it branched from (`repeat_interleave`), the children's conditioning is gathered
in one piece before the completion's model calls, and the images are decoded in one call. The shared
layout (one state per (unit, branch point) with an index per child, conditioning indexed per model-call
chunk, images decoded in chunks and moved to the host) must give the same rollout tensors, rewards and
training metrics, bit for bit on the CPU.
"""

from __future__ import annotations

import math
import random
import time
import types

import pytest
import torch

from tempflow import rewards as reward_registry
from tempflow.algorithms.base import Policy, Units
from tempflow.algorithms.matching import DRAW_TAG, NOISE_TAG
from tempflow.algorithms.rollout import mixed_seed, unit_generator, unit_noise
from tempflow.algorithms.tempflow_grpo import pick_branch_points
from tempflow.algorithms.tempflow_nft import BranchSamples
from tempflow.algorithms.transitions import Transitions
from tempflow.config import load_config
from tempflow.math.flow import ode_step
from tempflow.math.sde import sde_step
from tempflow.models.base import Conditioning
from tempflow.training.config import TrainConfig
from tempflow.training.loop import Trainer

TIMES = {"time_s", "rollout_s", "main_s", "branch_s", "decode_s", "reward_s", "update_s"}
COMMON = ["iterations=3", "rollout.prompts_per_iter=2", "rollout.seeds_per_prompt=2", "rollout.num_steps=4",
          "eval.every=0", "lora.enabled=true", "lora.rank=4", "optim.mixed_precision=no", "optim.lr=1e-2",
          "optim.minibatch=8", "rollout.max_batch=5", "algorithm.children=3", "algorithm.branch_sample=2",
          "reward=varied", "threads=1"]


def _varied_reward(**_):
    """A reward that differs between the images of one group: the mean of the first channel."""
    return lambda images, prompts, meta: images[:, 0].float().mean(dim=(1, 2))


@pytest.fixture(autouse=True)
def _reward(monkeypatch):
    monkeypatch.setitem(reward_registry.REWARDS, "varied", _varied_reward)


# ---- the reference: per-child copies, conditioning gathered whole, one decode -------------------------


@torch.no_grad()
def reference_branch(policy: Policy, cond: Conditioning, noise: torch.Tensor, units: Units, num_steps: int,
                     guidance: float, noise_level: float, children: int, points: list[int],
                     completion_steps: int = 0, keep_mean: bool = False) -> dict:
    from tempflow.algorithms.tempflow_grpo import completion_path

    n, m, sig = noise.shape[0], children, policy.sigmas(num_steps)
    x, rows = noise.float(), n * (max(points) + 1)
    blocks = []
    for j in range(max(points) + 1):
        v = policy.velocity(x, sig[j], cond.index(units.prompt), guidance)
        if j in points:
            xr, vr = x.repeat_interleave(m, 0), v.repeat_interleave(m, 0)
            eps = unit_noise(units.seed, j, m, tuple(x.shape[1:]))
            out = sde_step(xr, vr, sig[j], sig[j + 1], noise_level, noise=eps)
            blocks.append((xr, out.sample, out.log_prob, out.mean if keep_mean else None))
        x = ode_step(x, v, sig[j], sig[j + 1])
    order = torch.arange(len(blocks) * n * m).view(len(blocks), n, m).transpose(0, 1).flatten()
    x_rows, next_rows, lp_rows = (torch.cat([b[i] for b in blocks])[order] for i in range(3))
    means = torch.cat([b[3] for b in blocks])[order] if keep_mean else None
    steps = torch.tensor(points).repeat_interleave(n * m)[order]
    unit = torch.arange(n).repeat_interleave(m).repeat(len(blocks))[order]
    state, start, prompts = next_rows.clone(), steps + 1, units.prompt[unit]
    paths = {s: completion_path(s, num_steps, completion_steps) for s in sorted(set(start.tolist()))}
    grid = torch.full((len(start), max(len(p) for p in paths.values())), -1, dtype=torch.long)
    for s, p in paths.items():
        grid[start == s, : len(p)] = torch.tensor(p)
    for w in range(grid.shape[1] - 1):
        active = (grid[:, w + 1] >= 0).nonzero().squeeze(1)
        t, t_next = sig[grid[active, w]], sig[grid[active, w + 1]]
        v = policy.velocity(state[active], t, cond.index(prompts[active]), guidance)  # every child's rows at once
        state[active] = ode_step(state[active], v, t, t_next)
        rows += len(active)
    return {"x": x_rows, "x_next": next_rows, "step": steps, "log_prob": lp_rows, "mean": means, "unit": unit,
            "final": state, "nfe": rows * policy.forwards_per_row(guidance)}


def reference_tempflow_grpo(self, units: Units, cond: Conditioning, iteration: int, rng: random.Random):
    r, c = self.run.rollout, self.cfg
    points = pick_branch_points(c, r.num_steps, rng, self.spread)
    noise = units.noise(self.policy.model.latent_shape(), self.policy.device)
    b = reference_branch(self.policy, cond, noise, units, r.num_steps, r.guidance, c.noise_level, c.children, points,
                         c.completion_steps, keep_mean=c.ratio == "guard")
    prompt_of, seed_of = units.prompt[b["unit"]], units.slot[b["unit"]]
    return Transitions(
        images=self.policy.model.decode(b["final"]), image_prompt=prompt_of.clone(), image_seed=seed_of.clone(),
        image_step=b["step"].clone(), row_image=torch.arange(len(b["unit"])), nfe=b["nfe"], timings={},
        x=b["x"], x_next=b["x_next"], step=b["step"], log_prob_old=b["log_prob"], mean_old=b["mean"],
        prompt_index=prompt_of, seed_index=seed_of)


def reference_tempflow_nft(self, units: Units, cond: Conditioning, iteration: int, rng: random.Random):
    r, c = self.run.rollout, self.cfg
    points = pick_branch_points(c, r.num_steps, rng, self.spread)
    noise = units.noise(self.policy.model.latent_shape(), self.policy.device)
    with self.policy.holding(self.old.values):
        b = reference_branch(self.policy, cond, noise, units, r.num_steps, r.guidance, c.noise_level, c.children,
                             points, c.completion_steps)
    m, d = c.children, c.draws
    image_state = torch.arange(len(b["unit"])) // m
    state_step, state_unit = b["step"][::m], b["unit"][::m]
    seeds = [units.seed[int(u)] for u in state_unit]
    u = torch.stack([torch.rand(d, generator=unit_generator(s, DRAW_TAG + int(k))) for s, k in zip(seeds, state_step)])
    t = self.sigmas[state_step].unsqueeze(1) * (1 - u)
    noise_seed = torch.tensor([[mixed_seed(s, NOISE_TAG + 64 * int(k) + g) for g in range(d)]
                               for s, k in zip(seeds, state_step)], dtype=torch.long)
    row_image = torch.arange(len(b["unit"])).repeat_interleave(d)
    row_state, row_draw = image_state[row_image], torch.arange(d).repeat(len(b["unit"]))
    return BranchSamples(
        images=self.policy.model.decode(b["final"]), image_prompt=units.prompt[b["unit"]],
        image_seed=units.slot[b["unit"]], image_step=b["step"].clone(), row_image=row_image, nfe=b["nfe"], timings={},
        x0=b["final"], row_t=t[row_state, row_draw], row_noise=noise_seed[row_state, row_draw], row_draw=row_draw,
        image_state=image_state, state_x=b["x"][::m], state_step=state_step)


REFERENCE = {"tempflow_grpo": reference_tempflow_grpo, "tempflow_nft": reference_tempflow_nft}


# ---- comparisons ----------------------------------------------------------------------------------------


def _full(value):
    """A batch field as one plain tensor on the CPU (shared rows expanded)."""
    if value is None or not hasattr(value, "shape"):
        return value
    return value[torch.arange(len(value))].cpu() if not isinstance(value, torch.Tensor) else value.cpu()


def assert_same_batch(ours, ref) -> None:
    for name in ("images", "image_prompt", "image_seed", "image_step", "row_image", "x", "x_next", "step",
                 "log_prob_old", "mean_old", "prompt_index", "seed_index", "x0", "row_t", "row_noise", "row_draw",
                 "image_state", "state_x", "state_step"):
        a, b = _full(getattr(ours, name, None)), _full(getattr(ref, name, None))
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert ours.images.stride() == ref.images.stride()  # a reward's reductions over pixels follow the layout


def assert_same_metrics(ours: list[dict], ref: list[dict]) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert set(a) - TIMES == set(b) - TIMES
        for k in set(a) - TIMES:
            same = a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
            assert same, (k, a[k], b[k])


def _trainer(model_dir: str, tmp_path, preset: str, extra: list[str]) -> Trainer:
    cfg = load_config(TrainConfig, f"configs/shapes/{preset}.yaml", [f"model={model_dir}", *COMMON, *extra])
    return Trainer(cfg, tmp_path / f"run{time.perf_counter_ns()}")


def _run(tr: Trainer, reference: bool) -> tuple[list[dict], object]:
    if reference:
        tr.algorithm.rollout = types.MethodType(REFERENCE[tr.algorithm.name], tr.algorithm)
    first = None
    rows = []
    for _ in range(tr.cfg.iterations):
        if first is None:  # the first iteration's rollout, from the same state as the iteration's own
            snap = tr._snapshot()
            first = tr.rollout(tr.sampler.next(tr.cfg.rollout.prompts_per_iter))
            tr._restore(snap)
        rows.append(tr.iteration())
    return rows, first


@pytest.mark.parametrize("preset,extra", [
    ("tempflow", []),
    ("tempflow", ["algorithm.ratio=guard", "algorithm.completion_steps=2", "algorithm.branch_sample=0"]),
    ("tempflow_nft", ["algorithm.objective=both", "algorithm.draws=2"]),
])
def test_shared_states_give_the_reference_rollout_and_metrics(tiny_model_dir, tmp_path, preset, extra):
    ours, ro = _run(_trainer(tiny_model_dir, tmp_path, preset, extra), reference=False)
    ref, ro_ref = _run(_trainer(tiny_model_dir, tmp_path, preset, extra), reference=True)
    assert_same_batch(ro, ro_ref)
    assert_same_metrics(ours, ref)


# ---- the diffusers adapters: children and rewards of a tiny SD3 and FLUX --------------------------------


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict:
    from diffusers_tiny import PROMPTS, build_flux, build_sd3

    root = tmp_path_factory.mktemp("pipes")
    (root / "prompts.txt").write_text("\n".join(PROMPTS))
    return {"sd3": build_sd3(root / "sd3"), "flux": build_flux(root / "flux"), "prompts": root / "prompts.txt"}


def pipeline_trainer(pipes: dict, family: str, tmp_path, *extra: str) -> Trainer:
    from diffusers_tiny import RES, T5_TOKENS

    preset = {"sd3": "configs/sd35m/tempflow_pickscore.yaml", "flux": "configs/flux/tempflow_hpsv3.yaml"}[family]
    cfg = load_config(TrainConfig, preset, [
        f"model={pipes[family]}", "model_options.device=cpu", "model_options.dtype=fp32",
        f"model_options.resolution={RES}", f"model_options.max_sequence_length={T5_TOKENS}",
        "model_options.gradient_checkpointing=false", "model_options.offload=false", f"prompts={pipes['prompts']}",
        "reward=varied", "rollout.prompts_per_iter=2", "rollout.seeds_per_prompt=2", "rollout.num_steps=4",
        "rollout.max_batch=5", "algorithm.children=3", "eval.every=0", "lora.rank=4", "threads=1", *extra])
    return Trainer(cfg, tmp_path / f"run{time.perf_counter_ns()}")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipeline_children_and_rewards_equal_the_reference(pipes, tmp_path, family):
    runs = []
    for reference in (False, True):
        tr = pipeline_trainer(pipes, family, tmp_path)
        if reference:
            tr.algorithm.rollout = types.MethodType(reference_tempflow_grpo, tr.algorithm)
        prompts = tr.sampler.next(2)
        ro = tr.rollout(prompts)
        runs.append((ro, tr.score(ro, prompts)[0]))
    (ours, rewards), (ref, ref_rewards) = runs
    assert len(ours) == 2 * 2 * 3 * 3 and ours.images.device.type == "cpu"
    assert_same_batch(ours, ref)
    assert torch.equal(rewards, ref_rewards)


def test_decoding_to_the_host_in_the_models_batches_is_one_decode_call(tiny_model_dir):
    from tempflow.algorithms.rollout import decode_batch, decode_to_host
    from tempflow.models import load_model

    model = load_model(tiny_model_dir)
    x = torch.randn(decode_batch(model) + 3, *model.latent_shape(), generator=torch.Generator().manual_seed(0))
    images = decode_to_host(model, x)
    assert images.device.type == "cpu" and images.dtype == torch.float32
    assert torch.equal(images, model.decode(x))

"""How the trainer wires the method together, asserted against hand-built expectations (not against a
second run of the same code): groups and their divisor, step weights, EMA, inner epochs, clipping,
skipped steps, per-unit noise; and each likelihood-free algorithm's own wires (old policy and anchor
schedules, beta, timestep draws, shared (t, eps) of siblings, rollouts from the old policy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tempflow import rewards as reward_registry
from tempflow.algorithms.matching import sample_clean
from tempflow.config import load_config
from tempflow.math.losses import nft_reward
from tempflow.math.sde import noise_weights
from tempflow.training.config import TrainConfig
from tempflow.training.loop import Trainer

COMMON = ["iterations=4", "rollout.prompts_per_iter=2", "rollout.num_steps=4", "eval.every=0", "lora.enabled=true",
          "lora.rank=4", "optim.mixed_precision=no", "optim.lr=1e-2", "threads=1"]
OWN = {"tempflow": ["rollout.seeds_per_prompt=2", "algorithm.children=3", "algorithm.branch_sample=2",
                    "algorithm.clip_range=0.2"],
       "flow_grpo": ["rollout.seeds_per_prompt=3", "algorithm.clip_range=0.2"],
       "nft": ["rollout.seeds_per_prompt=3", "algorithm.timesteps=3"],
       "awm": ["rollout.seeds_per_prompt=3", "rollout.num_steps=8", "algorithm.timesteps=3"],
       "tempflow_nft": ["rollout.seeds_per_prompt=2", "algorithm.children=3", "algorithm.branch_sample=2"]}


def _varied_reward(**_):
    """A reward that differs between images of one group: the mean of the first channel."""
    return lambda images, prompts, meta: images[:, 0].float().mean(dim=(1, 2))


@pytest.fixture(autouse=True)
def _reward(monkeypatch):
    monkeypatch.setitem(reward_registry.REWARDS, "varied", _varied_reward)


def make(model_dir, tmp_path, preset, *extra) -> Trainer:
    cfg = load_config(TrainConfig, f"configs/shapes/{preset}.yaml",
                      [f"model={model_dir}", "reward=varied", *COMMON, *OWN[preset], *extra])
    return Trainer(cfg, tmp_path / preset)


def _hand_advantages(keys: np.ndarray, rewards: np.ndarray, std: str) -> np.ndarray:
    """Groups by the full key, (R - group mean) / (divisor + 1e-4), clipped to 5."""
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(map(tuple, keys)):
        groups.setdefault(k, []).append(i)
    mean = np.zeros(len(rewards))
    gstd = np.zeros(len(rewards))
    for rows in groups.values():
        mean[rows] = rewards[rows].mean()
        gstd[rows] = rewards[rows].std()
    divisor = {"group": gstd, "pooled": np.full(len(rewards), np.sqrt(((rewards - mean) ** 2).mean())),
               "batch": np.full(len(rewards), rewards.std())}[std]
    return np.clip((rewards - mean) / (divisor + 1e-4), -5, 5)


@pytest.mark.parametrize("std", ["group", "pooled", "batch"])
def test_trainer_advantages_are_the_seed_step_groups_by_hand(tiny_model_dir, tmp_path, std):
    tr = make(tiny_model_dir, tmp_path, "tempflow", f"advantage.std={std}")
    prompts = tr.sampler.next(2)
    ro = tr.rollout(prompts)
    rewards, _ = tr.score(ro, prompts)
    adv = tr.advantages(ro, rewards)
    keys = torch.stack([ro.image_prompt, ro.image_seed, ro.image_step], 1).numpy()
    assert len({tuple(k) for k in keys}) == 2 * 2 * 2  # prompts x seeds x branch points: the seed groups
    expected = _hand_advantages(keys, rewards.double().numpy(), std)
    assert adv.valid.all()
    np.testing.assert_allclose(adv.values.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", [True, False])
def test_the_loss_receives_the_noise_weights_or_ones(tiny_model_dir, tmp_path, monkeypatch, weighting):
    import tempflow.algorithms.transitions as transitions

    seen = []
    real = transitions.policy_loss

    def spy(log_prob, log_prob_old, adv, clip, weights=None):
        seen.append(weights.clone())
        return real(log_prob, log_prob_old, adv, clip, weights)

    monkeypatch.setattr(transitions, "policy_loss", spy)
    tr = make(tiny_model_dir, tmp_path, "tempflow", f"algorithm.noise_weighting={str(weighting).lower()}",
              "optim.minibatch=100000")
    prompts = tr.sampler.next(2)
    ro = tr.rollout(prompts)
    adv = torch.ones(len(ro))
    tr.algorithm.loss(ro, torch.arange(len(ro)), adv, tr.encode(prompts))
    sig = tr.policy.sigmas(4)
    noise_level = tr.cfg.algorithm.noise_level
    expected = noise_weights(sig, noise_level, [0, 1, 2])[ro.step] if weighting else torch.ones(len(ro))
    torch.testing.assert_close(seen[0], expected)
    assert weighting == (not torch.allclose(seen[0], torch.ones(len(ro))))


def test_ema_after_one_step_is_the_decayed_average(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "tempflow", "ema.decay=0.7", "ema.every=1", "optim.steps_per_rollout=1")
    before = [p.detach().clone() for p in tr.params]
    assert tr.iteration()["optimizer_steps"] == 1
    for e, b, p in zip(tr.ema, before, tr.params):
        torch.testing.assert_close(e, 0.7 * b + 0.3 * p.detach())
    assert any(not torch.equal(b, p) for b, p in zip(before, tr.params))


def test_inner_epochs_double_the_optimizer_steps_and_rows(tiny_model_dir, tmp_path):
    rows = []
    for epochs in (1, 2):
        row = make(tiny_model_dir, tmp_path / str(epochs), "tempflow", f"optim.inner_epochs={epochs}",
                   "optim.minibatch=8").iteration()
        rows.append(row)
    assert rows[1]["optimizer_steps"] == 2 * rows[0]["optimizer_steps"] > 0
    assert rows[1]["update_rows"] == 2 * rows[0]["update_rows"] > 0


def test_the_gradient_norm_at_the_optimizer_step_is_at_most_the_clip(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "tempflow", "optim.grad_clip=1e-4", "optim.minibatch=8")
    norms = []
    step = tr.opt.step

    def measured(*a, **k):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tr.params])).item())
        return step(*a, **k)

    tr.opt.step = measured
    row = tr.iteration()
    assert norms and all(n <= 1e-4 * (1 + 1e-5) for n in norms)
    assert row["grad_norm"] > 1e-4  # the norm before clipping is what is logged


def test_a_non_finite_gradient_is_skipped_and_counted(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "tempflow", "optim.steps_per_rollout=1")
    tr.params[0].register_hook(lambda g: g * float("inf"))
    before = [p.detach().clone() for p in tr.params]
    row = tr.iteration()
    assert row["skipped_updates"] == 1 and row["optimizer_steps"] == 0
    assert all(torch.equal(b, p) for b, p in zip(before, tr.params))


@pytest.mark.parametrize("preset", ["flow_grpo", "nft"])
def test_iterations_and_prompts_start_from_different_noise(tiny_model_dir, tmp_path, preset):
    tr = make(tiny_model_dir, tmp_path, preset)
    first, second = tr.units(2), tr.units(2)
    shape = tr.model.latent_shape()
    a, b = first.noise(shape), second.noise(shape)
    assert len(set(first.seed)) == len(first.seed) and not set(first.seed) & set(second.seed)
    n = len(first.seed) // 2  # units are prompt-major: the two prompts' first units
    assert not torch.equal(a[0], a[n]) and not torch.equal(a[0], b[0])
    shared = first.noise(shape, shared=True)  # Flow-GRPO-Fast: one noise per prompt, not per slot
    assert torch.equal(shared[0], shared[1]) and not torch.equal(shared[0], shared[n])


# ---- the likelihood-free algorithms ------------------------------------------------------------------


def _flat_reward(**_):
    return lambda images, prompts, meta: torch.zeros(len(prompts))


@pytest.mark.parametrize("preset,flat,trained", [("nft", "true", True), ("nft", "false", False),
                                                 ("tempflow", None, False)])
def test_groups_without_spread_are_trained_only_where_the_algorithm_keeps_them(tiny_model_dir, tmp_path,
                                                                               monkeypatch, preset, flat, trained):
    monkeypatch.setitem(reward_registry.REWARDS, "flat", _flat_reward)
    extra = [f"algorithm.flat_groups={flat}"] if flat else []
    tr = make(tiny_model_dir, tmp_path, preset, "reward=flat", *extra)
    before = [p.detach().clone() for p in tr.params]
    row = tr.iteration()
    assert row["zero_std_frac"] == 1.0
    rows = 3 * 2 * 3 if preset == "nft" else 0  # 6 images x 3 times (NFT keeps its r = 1/2 rows)
    assert row["trained_rows"] == (rows if trained else 0)
    assert (row["optimizer_steps"] > 0) == trained
    assert any(not torch.equal(b, p) for b, p in zip(before, tr.params)) == trained


def test_nft_old_policy_follows_its_decay_schedule(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "nft", "optim.steps_per_rollout=1")
    tr.optimizer_steps = 199  # the iteration's step is the 200th: decay min(0.001 * 200, 0.5) = 0.2
    with torch.no_grad():  # an old policy that differs from the weights
        for v in tr.algorithm.old.values:
            v.add_(0.05)
    old = [v.clone() for v in tr.algorithm.old.values]
    tr.iteration()
    assert tr.optimizer_steps == 200
    for o, new, p in zip(old, tr.algorithm.old.values, tr.params):
        torch.testing.assert_close(new, 0.2 * o + 0.8 * p.detach())


def test_nft_rollouts_come_from_the_old_policy(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "nft")
    with torch.no_grad():
        for v in tr.algorithm.old.values:
            v.add_(0.05)
    prompts = tr.sampler.next(2)
    state = tr.gen.get_state()
    ro = tr.rollout(prompts)
    tr.gen.set_state(state)
    units, cond, r = tr.units(2), tr.encode(prompts), tr.cfg.rollout
    grid = torch.zeros(len(units), 1, dtype=torch.long)
    with_old = sample_clean(tr.policy, units, cond, r.num_steps, r.guidance, "dpm2", grid, tr.algorithm.old.values)
    with_theta = sample_clean(tr.policy, units, cond, r.num_steps, r.guidance, "dpm2", grid)
    assert torch.equal(ro.x0, with_old.x0) and not torch.allclose(ro.x0, with_theta.x0)


def test_nft_rows_are_distinct_grid_times_per_sample(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "nft", "rollout.num_steps=6", "algorithm.timesteps=4")
    ro = tr.rollout(tr.sampler.next(2))
    sig = tr.policy.sigmas(6)
    assert len(ro) == 4 * len(ro.images)
    sets = []
    for i in range(len(ro.images)):
        rows = (ro.row_image == i).nonzero().squeeze(1)
        idx = ro.row_draw[rows]
        assert len(set(idx.tolist())) == 4 and idx.max() < 6  # grid points 0..5, without repeats
        torch.testing.assert_close(ro.row_t[rows], sig[idx])
        sets.append(tuple(sorted(idx.tolist())))
    assert len(set(sets)) > 1  # drawn per sample
    assert len(set(ro.row_noise.tolist())) == len(ro)  # fresh noise for every (sample, t)


def test_nft_loss_gets_beta_r_and_the_old_velocity(tiny_model_dir, tmp_path, monkeypatch):
    import tempflow.algorithms.nft as nft_mod

    seen = {}
    real = nft_mod.nft_loss

    def spy(v, v_old, x_t, x0, t, r, beta, scale):
        seen.update(v_old=v_old, x_t=x_t, t=t, r=r, beta=beta, scale=scale)
        return real(v, v_old, x_t, x0, t, r, beta, scale)

    monkeypatch.setattr(nft_mod, "nft_loss", spy)
    tr = make(tiny_model_dir, tmp_path, "nft", "algorithm.beta=0.3", "algorithm.loss_scale=2.0")
    with torch.no_grad():
        for v in tr.algorithm.old.values:
            v.add_(0.05)
    prompts = tr.sampler.next(2)
    ro = tr.rollout(prompts)
    idx, adv = torch.arange(5), torch.tensor([-6.0, -1.0, 0.0, 2.0, 9.0])
    cond = tr.encode(prompts)
    tr.algorithm.loss(ro, idx, adv, cond)
    assert seen["beta"] == 0.3 and seen["scale"] == 2.0
    torch.testing.assert_close(seen["r"], nft_reward(adv))
    rows = cond.index(ro.image_prompt[ro.row_image[idx]])
    with torch.no_grad(), tr.policy.holding(tr.algorithm.old.values):
        expected = tr.model.velocity(seen["x_t"], seen["t"], rows, 1.0)
    torch.testing.assert_close(seen["v_old"], expected)


def test_awm_anchor_follows_its_decay_and_rows_one_per_stratum(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "awm", "optim.steps_per_rollout=1")
    ro = tr.rollout(tr.sampler.next(2))
    draws = ro.row_draw.view(len(ro.images), 3)  # strata of indices 1..7 (int(0.9 * 8) = 7): [1, 3), [3, 5), [5, 7)
    assert ((draws[:, 0] >= 1) & (draws[:, 0] < 3)).all() and ((draws[:, 1] >= 3) & (draws[:, 1] < 5)).all()
    assert ((draws[:, 2] >= 5) & (draws[:, 2] < 7)).all()
    assert (draws != torch.tensor([1, 3, 5])).any() and (draws == torch.tensor([1, 3, 5])).any()  # uniform within
    tr.optimizer_steps = 99  # 100 steps after the iteration: decay min(0.3, 0.1) = 0.1
    with torch.no_grad():
        for v in tr.algorithm.anchor.values:
            v.add_(0.05)
    anchor = [v.clone() for v in tr.algorithm.anchor.values]
    tr.iteration()
    for a, new, p in zip(anchor, tr.algorithm.anchor.values, tr.params):
        torch.testing.assert_close(new, 0.1 * a + 0.9 * p.detach())


def test_tempflow_nft_siblings_share_t_and_noise(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "tempflow_nft", "algorithm.draws=2")
    ro = tr.rollout(tr.sampler.next(2))
    keys = ro.state_keys()
    sig = tr.policy.sigmas(4)
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(map(tuple, keys.tolist())):
        groups.setdefault(k, []).append(i)
    assert len(groups) == 2 * 2 * 2 * 2 and all(len(g) == 3 for g in groups.values())  # 3 children share a draw
    for rows in groups.values():
        assert len({float(ro.row_t[r]) for r in rows}) == 1 and len({int(ro.row_noise[r]) for r in rows}) == 1
        step = int(ro.image_step[ro.row_image[rows[0]]])
        assert 0 < float(ro.row_t[rows[0]]) <= float(sig[step])
    assert len({float(t) for t in ro.row_t}) == len(groups)  # distinct draws elsewhere


def _weighted_error(tr: Trainer, ro, adv: torch.Tensor, cond, kind: str) -> float:
    """The advantage-weighted error whose gradient the first on-policy update follows: NFT's
    sum A t mean((v - u)^2) / mean|v_old - u|, AWM's -sum A logp, the anchored loss."""
    from tempflow.math.losses import anchored_loss, awm_log_prob, flow_matching_error

    idx = torch.arange(len(ro))
    img = ro.row_image
    rows = cond.index(ro.image_prompt[img])
    with torch.no_grad():
        if kind == "anchored":
            st = ro.image_state[img]
            t = tr.policy.sigmas(tr.cfg.rollout.num_steps)[ro.state_step[st]]
            v = tr.model.velocity(ro.state_x[st], t, rows, 1.0)
            return float(anchored_loss(v, ro.state_x[st], ro.x0[img], adv.clamp(-5, 5), t).sum())
        x0, eps, x_t, t = ro.rows(idx, tr.policy.device)
        v = tr.model.velocity(x_t, t, rows, 1.0)
        err = flow_matching_error(v, x0, eps)
        if kind == "awm":
            return float(-(adv.clamp(-5, 5) * awm_log_prob(err, t)).sum())
        return float((adv.clamp(-5, 5) * t * err / (v - (eps - x0)).abs().flatten(1).mean(1)).sum())


@pytest.mark.parametrize("preset,kind,extra", [
    ("nft", "nft", ["algorithm.kl_beta=0"]),
    ("awm", "awm", ["algorithm.kl_beta=0", "algorithm.anchor_beta=0"]),
    ("tempflow_nft", "nft", ["algorithm.kl_beta=0", "algorithm.objective=local"]),
    ("tempflow_nft", "anchored", ["algorithm.kl_beta=0", "algorithm.objective=anchored"]),
])
def test_the_first_update_moves_toward_the_advantage_weighted_clean_samples(tiny_model_dir, tmp_path, preset, kind,
                                                                            extra):
    """One small optimizer step on a fresh rollout lowers the advantage-weighted error of its rows:
    the clean samples of positive advantage become likelier than those of negative advantage."""
    tr = make(tiny_model_dir, tmp_path, preset, "optim.steps_per_rollout=1", "optim.lr=1e-4", "optim.grad_clip=0",
              "optim.weight_decay=0", *extra)
    prompts = tr.sampler.next(2)
    ro = tr.rollout(prompts)
    rewards, _ = tr.score(ro, prompts)
    adv = tr.advantages(ro, rewards)
    assert adv.valid.any()
    row_adv = adv.values[ro.row_image]
    cond = tr.encode(prompts)
    before = _weighted_error(tr, ro, row_adv, cond, kind)
    stats = tr.update(ro, adv, cond)
    assert stats.optimizer_steps == 1
    after = _weighted_error(tr, ro, row_adv, cond, kind)
    assert after < before and math.isfinite(after)

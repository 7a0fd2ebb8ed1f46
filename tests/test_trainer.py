import math

import pytest
import torch

from tempflow import rewards as reward_registry
from tempflow.algorithms.tempflow_grpo import expected_branching_nfe
from tempflow.config import load_config
from tempflow.errors import ConfigError
from tempflow.training.config import TrainConfig
from tempflow.training.loop import Trainer

TINY = ["iterations=2", "rollout.prompts_per_iter=2", "rollout.seeds_per_prompt=2", "rollout.num_steps=4",
        "eval.every=0", "lora.rank=4", "optim.minibatch=16", "lora.enabled=true", "optim.mixed_precision=no",
        "ema.every=1", "ema.decay=0.5", "optim.lr=1e-2"]
BRANCHING = ["algorithm.children=3", "algorithm.branch_sample=0", "algorithm.clip_range=0.2"]  # TempFlow's options


OWN = {"tempflow": BRANCHING, "flow_grpo": ["algorithm.clip_range=0.2"], "nft": ["algorithm.timesteps=2"],
       "awm": ["rollout.num_steps=6", "algorithm.timesteps=2"], "tempflow_nft": BRANCHING[:2]}


def make(tiny_model_dir, tmp_path, *extra, preset="tempflow"):
    """A trainer of a shapes preset on the tiny model (TempFlow-GRPO by default)."""
    own = OWN[preset]
    cfg = load_config(TrainConfig, f"configs/shapes/{preset}.yaml", [f"model={tiny_model_dir}", *TINY, *own, *extra])
    return Trainer(cfg, tmp_path / "run")


def test_branching_rollout_nfe_and_groups(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path)
    prompts = ["a red circle", "two squares"]
    ro = tr.rollout(prompts)
    r = tr.cfg.rollout
    points = list(range(r.num_steps - 1))
    assert ro.nfe == expected_branching_nfe(4, r.num_steps, tr.cfg.algorithm.children, points, r.guidance)
    assert ro.nfe == 4 * (3 + 3 * (3 + 2 + 1)) * 2  # 4 seeds, T = 4, M = 3, CFG
    assert len(ro) == 4 * 3 * 3 and ro.images.shape == (36, 3, 16, 16)
    # children of one (prompt, seed, step) share the state they branch from, not their next state
    for j in points:
        rows = ((ro.prompt_index == 1) & (ro.seed_index == 0) & (ro.step == j)).nonzero().squeeze(1)
        assert len(rows) == 3
        assert torch.equal(ro.x[rows[0]], ro.x[rows[1]]) and torch.equal(ro.x[rows[0]], ro.x[rows[2]])
        assert not torch.equal(ro.x_next[rows[0]], ro.x_next[rows[1]])
    # the branch at step 0 starts from the initial noise, shared by all children of that seed
    first = ((ro.seed_index == 0) & (ro.prompt_index == 0) & (ro.step == 0)).nonzero().squeeze(1)
    later = ((ro.seed_index == 0) & (ro.prompt_index == 0) & (ro.step == 1)).nonzero().squeeze(1)
    assert not torch.equal(ro.x[first[0]], ro.x[later[0]])


def test_flow_grpo_rollout_rows(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "rollout.seeds_per_prompt=3", preset="flow_grpo")
    ro = tr.rollout(["a red circle", "two squares"])
    assert ro.images.shape[0] == 6 and len(ro) == 6 * 3  # SDE on steps 0..T-2
    assert ro.nfe == 6 * 4 * 2
    assert set(ro.step.tolist()) == {0, 1, 2}


def test_first_update_is_on_policy(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "lora.rank=4")
    row = tr.iteration()
    assert abs(row["ratio_first"] - 1.0) < 1e-5
    assert row["clip_frac"] == 0.0 or row["optimizer_steps"] > 1


def test_one_step_per_rollout_equals_one_minibatch_of_every_row(tiny_model_dir, tmp_path):
    """optim.steps_per_rollout=1 accumulates small minibatches into the gradient of the mean over all
    trained rows: the same update as one minibatch holding them all."""
    grads = []
    for name, extra in (("a", ["optim.minibatch=5", "optim.steps_per_rollout=1"]), ("b", ["optim.minibatch=100000"])):
        tr = make(tiny_model_dir, tmp_path / name, *extra)
        tr.gradient_observer = grads.append
        assert tr.iteration()["optimizer_steps"] == 1
    assert len(grads) == 2
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_kl_is_logged_only_where_it_is_computed(tiny_model_dir, tmp_path):
    assert math.isfinite(make(tiny_model_dir, tmp_path / "a").iteration()["kl"])  # the preset's beta 0.004
    row = make(tiny_model_dir, tmp_path / "b", "algorithm.kl_beta=0").iteration()
    assert math.isnan(row["kl"]) and math.isfinite(row["loss"])  # null in metrics.jsonl


def _random_reward(**_):
    gen = torch.Generator().manual_seed(0)
    return lambda images, prompts, meta: torch.rand(len(prompts), generator=gen)


@pytest.mark.parametrize("lora,preset", [(True, "tempflow"), (False, "tempflow"), (True, "nft"), (False, "awm"),
                                         (True, "tempflow_nft")])
def test_two_iterations_change_every_trainable_parameter_and_not_the_reference(tiny_model_dir, tmp_path, lora,
                                                                               preset, monkeypatch):
    monkeypatch.setitem(reward_registry.REWARDS, "random", _random_reward)
    tr = make(tiny_model_dir, tmp_path, f"lora.enabled={str(lora).lower()}", "algorithm.kl_beta=0.1", "reward=random",
              preset=preset)
    before = {n: p.detach().clone() for n, p in tr.named}
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.5, 0.5])
    cond = tr.encode(["a red circle", "a square"])
    with torch.no_grad(), tr.model.reference():
        ref_before = tr.model.velocity(x, t, cond, 4.5)
    for _ in range(2):
        tr.iteration()
    changed = [n for n, p in tr.named if not torch.equal(p, before[n])]
    assert len(changed) == len(before) > 0
    with torch.no_grad(), tr.model.reference():
        assert torch.equal(tr.model.velocity(x, t, cond, 4.5), ref_before)
    with torch.no_grad():
        assert not torch.equal(tr.model.velocity(x, t, cond, 4.5), ref_before)
    assert all(torch.isfinite(p).all() for p in tr.params)


def test_nan_rewards_are_skipped_and_never_reach_the_weights(tiny_model_dir, tmp_path, monkeypatch):
    def half_nan(**_):
        def fn(images, prompts, meta):
            r = torch.rand(len(prompts))
            r[: len(prompts) // 2] = float("nan")
            return r
        return fn

    monkeypatch.setitem(reward_registry.REWARDS, "half_nan", half_nan)
    tr = make(tiny_model_dir, tmp_path, "reward=half_nan")
    row = tr.iteration()
    assert 0 < row["nonfinite_frac"] < 1
    assert math.isfinite(row["loss"])
    assert all(torch.isfinite(p).all() for p in tr.params)


def test_non_finite_loss_skips_the_update(tiny_model_dir, tmp_path, monkeypatch):
    import tempflow.algorithms.transitions as trainer_mod
    from tempflow.math.losses import PolicyLossOutput

    def nan_loss(*args, **kwargs):
        return PolicyLossOutput(torch.tensor(float("nan"), requires_grad=True), torch.ones(1), torch.zeros(()))

    tr = make(tiny_model_dir, tmp_path)
    before = [p.detach().clone() for p in tr.params]
    monkeypatch.setattr(trainer_mod, "policy_loss", nan_loss)
    row = tr.iteration()
    assert row["skipped_updates"] >= 1
    assert all(torch.equal(a, b) for a, b in zip(before, tr.params))


@pytest.mark.parametrize(
    "override,message",
    [
        ("rollout.seeds_per_prompt=-1", "seeds_per_prompt must be >= 1"),
        ("algorithm.children=0", "children must be >= 2"),
        ("algorithm.branch_points=[3,12]", "outside the grid"),
        ("algorithm.clip_range=0", "clip_range must be > 0"),
        ("algorithm.name=dance", "unknown algorithm 'dance'"),
        ("advantage.group_by=batch", "group_by must be one of"),
        ("algorithm.branch_sample=20", "branch_sample must be in"),
        ("optim.lr_schedule=step", "lr_schedule must be one of constant, linear, cosine"),
        ("optim.warmup=1", "warmup is a fraction of the budget"),
        ("optim.lr_final=2", "lr_final is a fraction of optim.lr"),
        ("advantage.std=global", "advantage.std must be one of group, pooled, batch"),
        ("rollout.children=3", "unknown config key 'rollout.children'.*it is now algorithm.children"),
        ("loss.kl_beta=0.1", "unknown config key 'loss'.*it is now algorithm"),
        ("algorithm.window=fixed", "unknown config key 'algorithm.window'.*an option of flow_grpo"),
        ("algorithm.name=my_missing_module:Algo", "algorithm 'my_missing_module:Algo' cannot be imported"),
        ("algorithm.name=tempflow.training.loop:Trainer", "not a subclass of tempflow.algorithms.Algorithm"),
    ],
)
def test_bad_training_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, "configs/shapes/tempflow.yaml", [override])


@pytest.mark.parametrize("preset,overrides,message", [
    ("nft", ["algorithm.beta=0"], r"algorithm.beta must be in \(0, 1\], got 0.0"),
    ("nft", ["algorithm.beta=1.5"], r"algorithm.beta must be in \(0, 1\], got 1.5"),
    ("nft", ["algorithm.decay_type=3"], "algorithm.decay_type must be 0, 1 or 2, got 3"),
    ("nft", ["algorithm.timesteps=11"], "algorithm.timesteps must be <= rollout.num_steps"),
    ("nft", ["algorithm.solver=heun"], "algorithm.solver must be one of euler, dpm2"),
    ("nft", ["algorithm.children=4"], "unknown config key 'algorithm.children'.*tempflow_grpo, tempflow_nft"),
    ("nft", ["advantage.group_by=seed_step"], "nft groups by prompt: set advantage.group_by=prompt"),
    ("awm", ["algorithm.timesteps=13"], r"algorithm.timesteps \(13\) strata need as many grid indices"),
    ("awm", ["algorithm.anchor_decay=1"], r"algorithm.anchor_decay must be in \[0, 1\)"),
    ("awm", ["algorithm.beta=0.5"], "unknown config key 'algorithm.beta'.*nft, tempflow_nft"),
    ("tempflow_nft", ["algorithm.objective=global"], "algorithm.objective must be one of local, anchored, both"),
    ("tempflow_nft", ["algorithm.beta=-1"], r"algorithm.beta must be in \(0, 1\]"),
    ("tempflow_nft", ["algorithm.clip_range=0.1"], "unknown config key 'algorithm.clip_range'"),
    ("flow_grpo", ["algorithm.ratio=ppo"], "algorithm.ratio must be one of plain, guard"),
])
def test_bad_options_of_each_algorithm_are_refused(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, f"configs/shapes/{preset}.yaml", overrides)


def test_flow_grpo_fast_shares_the_prefix_and_guard_starts_on_policy(tiny_model_dir, tmp_path):
    """Flow-GRPO-Fast: the 3 trajectories of a prompt share noise and the ODE path up to the window, and
    split at its SDE steps; the prefix runs once per prompt. GRPO-Guard's ratio is 1 on-policy."""
    tr = make(tiny_model_dir, tmp_path, "rollout.seeds_per_prompt=3", "algorithm.fast=true", "algorithm.window=fixed",
              "algorithm.window_size=1", "algorithm.window_start=2", "algorithm.ratio=guard", preset="flow_grpo")
    ro = tr.rollout(["a red circle", "two squares"])
    assert set(ro.step.tolist()) == {2} and len(ro) == 6
    assert torch.equal(ro.x[0], ro.x[1]) and torch.equal(ro.x[0], ro.x[2]) and not torch.equal(ro.x[0], ro.x[3])
    assert not torch.equal(ro.x_next[0], ro.x_next[1])  # the window's SDE noise is each trajectory's own
    assert ro.nfe == (2 * 2 + 6 * 2) * 2  # the prefix once per prompt, then every trajectory; CFG doubles
    row = tr.iteration()
    assert abs(row["ratio_first"] - 1.0) < 1e-6 and math.isfinite(row["loss"])


def test_windows_and_branch_point_sampling():
    import random

    from tempflow.algorithms.flow_grpo import FlowGRPOConfig, window_steps
    from tempflow.algorithms.tempflow_grpo import TempFlowConfig, pick_branch_points

    assert window_steps(FlowGRPOConfig(), 10, 0, random.Random(0)) == list(range(9))
    fixed = FlowGRPOConfig(window="fixed", window_size=3, window_start=2)
    assert window_steps(fixed, 10, 5, random.Random(0)) == [2, 3, 4]
    sliding = FlowGRPOConfig(window="sliding", window_size=3, window_shift_every=10)
    assert [window_steps(sliding, 10, it, random.Random(0))[0] for it in (0, 9, 10, 35, 500)] == [0, 0, 1, 3, 6]
    rnd = FlowGRPOConfig(window="random", window_size=4)
    starts = {window_steps(rnd, 10, 0, random.Random(s))[0] for s in range(50)}
    assert starts == set(range(6))
    tf = TempFlowConfig(branch_sample=3)
    picks = pick_branch_points(tf, 10, random.Random(1))
    assert len(picks) == 3 and picks == sorted(picks) and all(0 <= j <= 8 for j in picks)
    assert pick_branch_points(TempFlowConfig(branch_points=[1, 4]), 10, random.Random(0)) == [1, 4]


def test_learning_rate_follows_the_schedule_over_the_iterations(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "iterations=4", "optim.lr_schedule=cosine", "optim.warmup=0.25",
              "optim.lr_final=0.1")
    lrs = []
    for _ in range(4):
        lrs.append(tr.iteration()["lr"])
        assert all(g["lr"] == lrs[-1] for g in tr.opt.param_groups)  # what the optimizer used
    # iteration i runs at i/4 of the budget: warm-up from 0, the peak, then cosine down to 0.1 x 1e-2
    expected = [0.0, 1e-2, 1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi / 3)),
                1e-3 + 9e-3 * 0.5 * (1 + math.cos(2 * math.pi / 3))]
    assert lrs == pytest.approx(expected)


def test_evaluation_with_several_samples_is_what_tempflow_eval_reports(tiny_model_dir, tmp_path):
    from tempflow.evaluate import evaluate, verifier_scoring
    from tempflow.prompts import load_prompts
    from tempflow.training.run import run_eval
    from tempflow.worlds import get_world

    # the shipped base, so that the images hold shapes and the scores depend on which seeds drew them
    tr = make(tiny_model_dir, tmp_path, "model=shapes-base", "eval.samples=3", "eval.limit=12", "eval.num_steps=8",
              "eval.seed=5")
    lines = load_prompts("shapes-eval", 12)
    row = run_eval(tr, lines, tmp_path / "out")
    with tr.ema_weights():
        summary, _ = evaluate(tr.model, lines, verifier_scoring(get_world("shapes"), lines), 8, tr.cfg.eval.guidance,
                              5, samples=3)
    assert 0 < summary["overall"] < summary["pass_at_k_overall"]  # samples of one line differ
    assert row["eval_overall"] == pytest.approx(summary["overall"])
    assert row["eval_reward"] == pytest.approx(summary["reward_mean"])
    assert row["eval_pass_at_k"] == pytest.approx(summary["pass_at_k_overall"])
    assert all(row[f"eval_{c}"] == pytest.approx(v) for c, v in summary["per_category"].items())
    assert (tmp_path / "out" / "samples" / "eval_step_000000.png").is_file()
    with pytest.raises(ConfigError, match="eval.samples must be >= 1"):
        load_config(TrainConfig, "configs/shapes/tempflow.yaml", ["eval.samples=0"])


def test_mixed_precision_iteration(tiny_model_dir, tmp_path):
    tr = make(tiny_model_dir, tmp_path, "optim.mixed_precision=bf16")
    row = tr.iteration()
    assert math.isfinite(row["loss"]) and all(torch.isfinite(p).all() for p in tr.params)
    assert all(p.dtype == torch.float32 for p in tr.params)  # master weights stay float32


def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_in_bf16(monkeypatch):
    from tempflow.training.loop import resolve_precision

    cpu = torch.device("cpu")
    assert [resolve_precision(p, cpu) for p in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    for avx512_bf16, amx, expected in [(True, False, "bf16"), (False, True, "bf16"), (False, False, "no")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", cpu) == expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert resolve_precision("auto", cpu) == "no"  # a torch without the probe: float32


@pytest.mark.parametrize("budget,total,unit", [([], 7, "it"), (["max_minutes=0.5"], 30.0, "s"),
                                               (["max_nfe=5000"], 5000, " NFE")])
def test_progress_bar_counts_the_budget_that_binds(budget, total, unit):
    from types import SimpleNamespace

    from tempflow.training.run import _progress, _progress_bar

    cfg = load_config(TrainConfig, "configs/shapes/tempflow.yaml", ["iterations=7", *budget])
    trainer = SimpleNamespace(step=3, elapsed=12.34, nfe_total=7000)
    bar = _progress_bar(cfg, trainer, main=True)
    assert bar.total == total and ("{total:.0f}" + unit + " [") in bar.bar_format
    # progress never passes the budget: 3 iterations; 12.3 of 30 s; 7000 NFE capped at 5000
    assert _progress(cfg, trainer) == ({"it": 3, "s": 12.3, " NFE": 5000}[unit], total, unit)
    bar.close()


def test_state_group_ids_and_an_order_that_keeps_a_state_together():
    from tempflow.algorithms.rollout import first_rows, state_order
    from tempflow.math.advantages import group_ids

    keys = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 1], [1, 0, 0]])
    ids = group_ids(*keys.T)
    assert ids.tolist() == [0, 0, 2, 0, 1, 2]
    assert first_rows(ids).tolist() == [0, 4, 2]
    order = state_order(ids, torch.Generator().manual_seed(3))
    assert sorted(order.tolist()) == list(range(6))
    runs = [int(ids[i]) for i in order]
    assert [s for k, s in enumerate(runs) if k == 0 or s != runs[k - 1]] == sorted(set(runs), key=runs.index)
    assert [int(i) for i in order if ids[i] == 0] == [0, 1, 3]  # a state keeps its rows' order
    # one row per state: exactly the plain permutation of the rows
    distinct = group_ids(*torch.arange(7).reshape(7, 1).repeat(1, 3).T)
    torch.testing.assert_close(state_order(distinct, torch.Generator().manual_seed(5)),
                               torch.randperm(7, generator=torch.Generator().manual_seed(5)))


def test_minibatch_loss_runs_the_model_once_per_state_with_the_gradient_of_one_call_per_row(tiny_model_dir,
                                                                                            tmp_path):
    from tempflow.math.losses import kl_loss, policy_loss
    from tempflow.math.sde import sde_step

    tr = make(tiny_model_dir, tmp_path, "algorithm.kl_beta=0.1")
    prompts = ["a red circle", "two squares"]
    ro = tr.rollout(prompts)
    cond = tr.encode(prompts)
    adv = torch.randn(len(ro), generator=torch.Generator().manual_seed(0))
    idx = torch.randperm(len(ro), generator=torch.Generator().manual_seed(1))[:20]
    with torch.no_grad():  # move the policy off the reference, so that the KL term has a gradient
        for p in tr.params:
            p.add_(0.01 * torch.randn_like(p))
    batch = []
    inner = tr.policy.wrapped

    def counting(x, *a, **k):
        batch.append(x.shape[0])
        return inner(x, *a, **k)

    tr.policy.wrapped = counting
    loss, _ = tr.algorithm.loss(ro, idx, adv[idx], cond)
    states = len({tuple(k) for k in ro.state_keys()[idx].tolist()})
    assert batch == [states] and states < len(idx)
    fast = torch.autograd.grad(loss, tr.params)
    # the same loss with one model call per row
    r, lc = tr.cfg.rollout, tr.cfg.algorithm
    x, step = ro.x[idx], ro.step[idx]
    sigmas = tr.policy.sigmas(r.num_steps)
    t, t_next = sigmas[step], sigmas[step + 1]
    rows = cond.index(ro.prompt_index[idx])
    out = sde_step(x, inner(x, t, rows.tokens, rows.pooled, r.guidance), t, t_next, lc.noise_level,
                   prev=ro.x_next[idx])
    with torch.no_grad(), tr.model.reference():
        ref = sde_step(x, tr.model.velocity(x, t, rows, r.guidance), t, t_next, lc.noise_level).mean
    kl = kl_loss(out.mean, ref, out.std)
    assert kl > 0
    slow = policy_loss(out.log_prob, ro.log_prob_old[idx], adv[idx], lc.clip_range, tr.algorithm.weights[step]).loss
    slow = slow + lc.kl_beta * kl
    torch.testing.assert_close(loss, slow, rtol=1e-5, atol=1e-7)
    for a, b in zip(fast, torch.autograd.grad(slow, tr.params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["tempflow", "flow_grpo"])
def test_the_update_runs_one_model_row_per_state(tiny_model_dir, tmp_path, algorithm):
    extra = ["optim.minibatch=100000"] + (["rollout.seeds_per_prompt=3"] if algorithm == "flow_grpo" else [])
    row = make(tiny_model_dir, tmp_path, *extra, preset=algorithm).iteration()
    assert row["trained_rows"] > 0
    # a branch point's 3 children share a state (and groups are whole states); Flow-GRPO's rows do not
    assert row["trained_rows"] == (3 if algorithm == "tempflow" else 1) * row["update_rows"]

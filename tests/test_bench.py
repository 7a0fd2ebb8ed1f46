"""Benchmarks: budgets, the learning summary and the gradient noise (hand-computed), short runs of each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tempflow.bench.gradient import bench_gradient, gradient_noise, preconditioned, rollout_gradient
from tempflow.bench.learning import bench_learning
from tempflow.bench.learning_summary import RunCurve, learning_table, summarise_learning
from tempflow.bench.presets import Budget, expand_configs, preset_path, training_presets
from tempflow.bench.system import bench_system
from tempflow.errors import TempflowError

TINY = ["rollout.prompts_per_iter=2", "rollout.num_steps=4", "eval.limit=12", "eval.every=1", "eval.num_steps=4",
        "checkpoint_every=1", "threads=1"]


def test_budget_parse():
    assert Budget.parse("600s") == Budget(600.0, "seconds")
    assert Budget.parse("2e6nfe") == Budget(2e6, "nfe")
    assert Budget.parse("100it") == Budget(100.0, "iterations")
    assert "iterations=100" in Budget.parse("100it").overrides()
    assert "max_minutes=10.0" in Budget.parse("600s").overrides()
    for bad in ("600", "-5s", "fast", "nanit", "0it"):
        with pytest.raises(TempflowError, match="budget"):
            Budget.parse(bad)


def test_presets_resolve_in_a_preset_folder(tmp_path):
    shapes = training_presets()  # configs/shapes: every training preset, in name order, not pretrain.yaml
    assert shapes == sorted(shapes) and {"flow_grpo", "tempflow", "nft"} <= set(shapes) and "pretrain" not in shapes
    (tmp_path / "mine.yaml").write_text(f"extends: {Path('configs/shapes/tempflow.yaml').resolve()}\n")
    (tmp_path / "base.yaml").write_text("seed: 3\n")  # a family's shared part, not a preset
    (tmp_path / "notes.yaml").write_text("model: {image_size: 32}\n")  # no training config
    assert training_presets(tmp_path) == ["mine"]
    assert preset_path("mine", tmp_path) == tmp_path / "mine.yaml"
    assert preset_path("configs/shapes/nft.yaml", tmp_path).name == "nft.yaml"  # a YAML path as given
    assert expand_configs(f"{tmp_path}/*.yaml,x") == [str(tmp_path / "mine.yaml"), str(tmp_path / "notes.yaml"), "x"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(TempflowError, match="holds no training preset"):
        training_presets(tmp_path / "empty")
    with pytest.raises(TempflowError, match="is not a folder"):
        training_presets(tmp_path / "missing")


def _rows(evals: list[tuple[int, float, float]], nfe_per_step: int) -> list[dict]:
    """metrics.jsonl rows: an iteration row per step, an eval row at the given (step, time, overall)."""
    rows, last = [], max(s for s, _, _ in evals)
    for step in range(1, last + 1):
        rows.append({"step": step, "nfe": nfe_per_step, "reward_mean": 0.5})
    for step, t, acc in evals:
        rows.append({"step": step, "time_s": t, "eval_overall": acc, "eval_reward": 0.0, "eval_s": 1.0,
                     "eval_counting": acc / 2})
    return rows


def test_summary_hand_computed():
    fg = [RunCurve.from_metrics("flow_grpo", s, _rows([(0, 0, 0.4), (10, 100, 0.5), (20, 200, 0.6)], 1000))
          for s in (0, 1)]
    for c, acc in zip(fg, (0.5, 0.6)):  # the final models on the whole set
        c.full = {"overall": acc, "per_category": {"counting": acc / 2}, "n": 324}
    tf = [RunCurve.from_metrics("tempflow", 0, _rows([(0, 0, 0.4), (10, 50, 0.6), (20, 100, 0.7)], 3000)),
          RunCurve.from_metrics("tempflow", 1, _rows([(0, 0, 0.4), (10, 60, 0.5), (20, 120, 0.65)], 3000))]
    assert fg[0].nfe == [0, 10_000, 20_000]
    s = summarise_learning(fg + tf, [0.5, 0.6], "flow_grpo", "tempflow")
    p = s["presets"]
    assert p["flow_grpo"]["final_overall"]["mean"] == pytest.approx(0.6)
    assert p["tempflow"]["final_overall"]["mean"] == pytest.approx(0.675)
    assert p["tempflow"]["final_overall"]["std"] == pytest.approx(0.025)
    assert p["tempflow"]["final_categories"]["counting"]["mean"] == pytest.approx(0.3375)
    # 0.6: flow_grpo at 200 s (both seeds); tempflow seed 0 at 50 s, seed 1 at 120 s -> mean 85 s
    r = p["tempflow"]["reach"]["0.6"]["seconds"]
    assert r["mean"] == pytest.approx(85.0) and r["reached"] == 2
    assert s["ratios"]["0.6"]["seconds"] == pytest.approx(85 / 200)
    assert s["ratios"]["0.6"]["iterations"] == pytest.approx(15 / 20)
    assert s["ratios"]["0.6"]["nfe"] == pytest.approx((30_000 + 60_000) / 2 / 20_000)
    mb = s["match_baseline"]
    assert mb["target"] == pytest.approx(0.6) and mb["fraction"] == pytest.approx(85 / 200)
    assert not mb["trivial"] and "first reaches it after 85 s" in learning_table(s)
    assert p["flow_grpo"]["final_full"]["mean"] == pytest.approx(0.55)
    assert p["flow_grpo"]["final_full"]["std"] == pytest.approx(0.05)
    assert p["flow_grpo"]["final_full"]["categories"]["counting"] == pytest.approx(0.275)
    assert p["tempflow"]["final_full"] is None  # not evaluated
    table = learning_table(s)
    assert "| tempflow |" in table and "0.675 ± 0.025" in table
    assert "| flow_grpo | 0.550 ± 0.050 | 0.275 |" in table


def test_summary_gain_and_pass_at_k_over_the_base_drawn_the_same_way():
    fg = [RunCurve.from_metrics("flow_grpo", s, _rows([(0, 0, 0.4), (10, 100, 0.5)], 1000)) for s in (0, 1)]
    for c, acc, passed in zip(fg, (0.5, 0.6), (0.7, 0.9)):
        c.full = {"overall": acc, "per_category": {"counting": acc / 2}, "n": 324, "samples": 4,
                  "pass_at_k": {"counting": passed}, "pass_at_k_overall": passed}
    base = {"overall": 0.45, "per_category": {"counting": 0.2}, "n": 324, "samples": 4,
            "pass_at_k": {"counting": 0.6}, "pass_at_k_overall": 0.6}
    s = summarise_learning(fg, [], "flow_grpo", "tempflow", base)
    full = s["presets"]["flow_grpo"]["final_full"]
    assert full["gain"] == pytest.approx(0.1) and full["pass_at_k"] == pytest.approx(0.8) and full["samples"] == 4
    table = learning_table(s)
    assert "(324 lines x 4 samples each" in table
    assert "| preset | overall | gain | pass@4 | counting |" in table
    assert "| base | 0.450 | - | 0.600 | 0.200 |" in table
    assert "| flow_grpo | 0.550 ± 0.050 | +0.100 | 0.800 | 0.275 |" in table


def test_summary_says_when_the_baseline_never_left_the_start():
    fg = RunCurve.from_metrics("flow_grpo", 0, _rows([(0, 0, 0.5), (10, 100, 0.45)], 10))
    tf = RunCurve.from_metrics("tempflow", 0, _rows([(0, 0, 0.5), (10, 100, 0.55)], 30))
    s = summarise_learning([fg, tf], [0.5], "flow_grpo", "tempflow")
    assert s["match_baseline"]["trivial"]
    assert "nothing to catch up" in learning_table(s)


def test_summary_threshold_never_reached():
    c = RunCurve.from_metrics("flow_grpo", 0, _rows([(0, 0, 0.4), (5, 10, 0.45)], 10))
    s = summarise_learning([c], [0.9], "flow_grpo", "tempflow")
    assert s["presets"]["flow_grpo"]["reach"]["0.9"]["seconds"] == {"mean": None, "reached": 0, "runs": 1}
    assert "ratios" not in s
    assert "-" in learning_table(s)


def test_bench_learning_short(tmp_path, tiny_model_dir):
    out = tmp_path / "bench"
    tiny = [*TINY, "rollout.seeds_per_prompt=2", f"model={tiny_model_dir}"]
    s = bench_learning(["tempflow", "flow_grpo"], [0], Budget.parse("2it"), out, overrides=tiny, thresholds=[0.0])
    for name in ("summary.json", "summary.md", "learning.png"):
        assert (out / name).is_file()
    data = json.loads((out / "summary.json").read_text())
    assert set(data["presets"]) == {"tempflow", "flow_grpo"}
    assert data["presets"]["tempflow"]["final_budget"]["iterations"] == 2
    assert data["presets"]["tempflow"]["reach"]["0.0"]["iterations"]["mean"] == 0  # reached at the start
    assert data["ratios"]["0.0"]["iterations"] is None  # 0 / 0: no ratio
    assert (data["baseline"], data["method"]) == ("tempflow", "flow_grpo")  # the first and second preset
    assert s["table"].startswith("| preset |")
    full = json.loads((out / "tempflow" / "seed0" / "final_eval.json").read_text())["summary"]
    assert full["n"] == 324 and data["presets"]["tempflow"]["final_full"]["values"] == [full["overall"]]
    assert "whole evaluation set (324 samples each" in s["table"]
    base = json.loads((out / "base_eval.json").read_text())  # the starting model, drawn the same way
    assert base["key"]["model"] == str(tiny_model_dir) and base["summary"]["n"] == 324
    assert data["base_full"] == base["summary"]
    gain = full["overall"] - base["summary"]["overall"]
    assert data["presets"]["tempflow"]["final_full"]["gain"] == pytest.approx(gain)
    assert "| base | " in s["table"]
    before = (out / "tempflow" / "seed0" / "metrics.jsonl").read_text()
    bench_learning(["tempflow"], [0], Budget.parse("2it"), out, overrides=tiny)
    assert (out / "tempflow" / "seed0" / "metrics.jsonl").read_text() == before  # a finished run is kept
    again = bench_learning(["tempflow"], [0], Budget.parse("2it"), out, overrides=tiny, final_eval=12)
    assert again["presets"]["tempflow"]["final_full"]["n"] == 12  # another spread: evaluated anew
    drawn = bench_learning(["tempflow"], [0], Budget.parse("2it"), out, overrides=tiny, final_eval=12,
                           final_samples=2, final_seed=1000)
    full, base = drawn["presets"]["tempflow"]["final_full"], drawn["base_full"]
    assert full["samples"] == 2 and "pass_at_k" in full and base["samples"] == 2 and base["n"] == 12
    key = json.loads((out / "tempflow" / "seed0" / "final_eval.json").read_text())["key"]
    assert key["seed"] == 1000 and key["samples"] == 2
    assert "(12 lines x 2 samples each" in drawn["table"] and "pass@2" in drawn["table"]
    with pytest.raises(TempflowError, match="--final-samples must be >= 1"):
        bench_learning(["tempflow"], [0], Budget.parse("2it"), tmp_path / "other", overrides=tiny, final_samples=0)
    assert not (tmp_path / "other").exists()  # refused before anything ran
    assert bench_learning(["tempflow"], [0], Budget.parse("2it"), out, overrides=tiny,
                          final_eval=None)["presets"]["tempflow"]["final_full"] is None
    kept = bench_learning(["tempflow"], [0], Budget.parse("2it"), out, overrides=[*tiny, "threads=2"],
                          final_eval=None)  # threads change speed, not results: the run is kept
    assert kept["presets"]["tempflow"]["final_budget"]["iterations"] == 2
    with pytest.raises(TempflowError, match=r"optim.lr \(5e-05 there, 0.001 asked\).*pass the same --set"):
        bench_learning(["tempflow"], [0], Budget.parse("2it"), out, overrides=[*tiny, "optim.lr=1e-3"])


def test_bench_learning_summarises_every_finished_run_in_its_folder(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "bench"
    tiny = [*TINY, f"model={tiny_model_dir}"]
    bench_learning(["tempflow"], [0], Budget.parse("2it"), out, overrides=tiny, final_eval=None)
    s = bench_learning(["tempflow"], [1], Budget.parse("2it"), out, overrides=tiny, final_eval=None)
    assert s["presets"]["tempflow"]["final_overall"]["seeds"] == [0, 1]  # seed 0's run is not dropped
    assert s["seeds"] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["seeds"] == [0, 1]
    assert "tempflow seed 0 finished earlier" in capsys.readouterr().out
    other = bench_learning(["flow_grpo"], [0], Budget.parse("1it"), out, overrides=tiny, final_eval=None)
    assert set(other["presets"]) == {"flow_grpo"}  # the tempflow runs have another budget
    assert f"{out / 'tempflow' / 'seed1'} was trained with other settings" in capsys.readouterr().out
    again = bench_learning(["tempflow"], [1], Budget.parse("2it"), out, overrides=tiny, final_eval=None)
    assert set(again["presets"]) == {"tempflow"} and again["seeds"] == [0, 1]


def test_bench_learning_refuses_bad_preset(tmp_path):
    with pytest.raises(TempflowError):
        bench_learning(["no_such_preset"], [0], Budget.parse("1it"), tmp_path)


def test_bench_system_short(tiny_model_dir):
    res = bench_system("tempflow", iterations=1,
                       overrides=[*TINY, "algorithm.branch_sample=0", f"model={tiny_model_dir}"])
    phases = res["main_s"] + res["branch_s"] + res["decode_s"]
    assert 0 < phases <= res["rollout_s"] * 1.05
    assert res["nfe"] > 0 and res["images_per_s"] > 0 and res["peak_memory_mb"] > 0
    assert res["limit_s"] > 0 and res["ratio"] > 0
    assert res["limit_forward_s"] + res["limit_update_s"] == pytest.approx(res["limit_s"])


def test_gradient_noise_hand_computed():
    gram = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 0.0], [2.0, 0.0, 4.0]])
    r = gradient_noise(gram)
    # diagonal mean 4; rows' off-diagonal means 1.5, 0.5, 1.0 -> signal 1, its se 0.5 / sqrt(3)
    assert r["total"] == pytest.approx(4.0) and r["signal"] == pytest.approx(1.0)
    assert r["signal_share"] == pytest.approx(0.25)
    assert r["signal_se"] == pytest.approx(0.5 / 3**0.5)
    assert r["resolved"] and r["iterations_to_snr1"] == pytest.approx(3.0)  # noise 3 over signal 1
    with pytest.raises(ValueError):
        gradient_noise(torch.ones(1, 1))


def test_gradient_noise_recovers_a_known_signal_share():
    gen = torch.Generator().manual_seed(0)
    dims, n = 4000, 80
    true = torch.randn(dims, generator=gen)
    true /= true.norm()  # |G|^2 = 1
    grads = true + 3.0 * torch.randn(n, dims, generator=gen) / dims**0.5  # noise 9: share 0.1, 9 iterations
    r = gradient_noise(grads @ grads.T)
    assert r["signal_share"] == pytest.approx(0.1, abs=0.03)
    assert r["iterations_to_snr1"] == pytest.approx(9.0, rel=0.35)
    noise_only = torch.randn(n, dims, generator=gen)
    r = gradient_noise(noise_only @ noise_only.T)
    assert not r["resolved"] and r["iterations_to_snr1"] is None


def test_adam_scaling_counts_every_coordinate_alike():
    gen = torch.Generator().manual_seed(1)
    n, dims = 60, 2000
    # one loud coordinate of pure noise beside many quiet ones that carry a common signal
    quiet = 0.01 * (1.0 + torch.randn(n, dims, generator=gen))  # share 1/2 in every quiet coordinate
    loud = 100.0 * torch.randn(n, 1, generator=gen)
    grads = torch.cat([loud, quiet, torch.zeros(n, 1)], dim=1)
    raw = gradient_noise(grads @ grads.T)
    assert not raw["resolved"]  # the loud coordinate's noise hides the signal in the raw Gram
    pre = preconditioned(grads)
    assert pre.dtype == grads.dtype  # no float64 copy of every gradient
    assert torch.allclose(pre.pow(2).mean(0)[:-1], torch.ones(dims + 1), atol=1e-5)
    assert torch.equal(pre[:, -1], torch.zeros(n))  # a coordinate that never moves stays 0
    adam = gradient_noise(pre @ pre.T)
    assert adam["resolved"] and adam["signal_share"] == pytest.approx(0.5, abs=0.05)


def test_the_gradient_hook_is_the_first_update_direction(tiny_model_dir, tmp_path):
    """rollout_gradient (Trainer.gradient after the iteration's rollout, score and advantages) equals the
    gradient that a normal iteration's single optimizer step accumulates (same seed), as the trainer's
    gradient_observer sees it, and leaves the weights as they were."""
    from tempflow.config import load_config
    from tempflow.training.config import TrainConfig
    from tempflow.training.loop import Trainer

    over = [*TINY, "rollout.seeds_per_prompt=2", f"model={tiny_model_dir}", "optim.grad_accum=1000",
            "optim.minibatch=8", "optim.mixed_precision=no"]
    cfg = load_config(TrainConfig, "configs/shapes/tempflow.yaml", over)
    a = Trainer(cfg, tmp_path / "a")
    before = [p.detach().clone() for p in a.params]
    grad, info = rollout_gradient(a)
    assert all(torch.equal(p, q) for p, q in zip(a.params, before))
    assert all(p.grad is None for p in a.params)
    assert info["trained_rows"] > 0 and info["images"] > 0 and info["nfe"] > 0
    assert torch.isfinite(grad).all() and grad.norm() > 0
    assert grad.shape == (sum(p.numel() for p in a.params),) and grad.dtype == torch.float32
    b = Trainer(cfg, tmp_path / "b")
    seen = []
    b.gradient_observer = seen.append
    row = b.iteration()
    assert len(seen) == 1 == row["optimizer_steps"] and row["trained_rows"] == info["trained_rows"]
    # the same rows in other minibatches: equal up to the order of float32 sums
    assert (grad - seen[0]).norm() < 1e-4 * grad.norm()
    again, _ = rollout_gradient(a)  # the next rollout: another estimate
    assert not torch.allclose(again, grad)


def test_bench_gradient_short(tmp_path, tiny_model_dir):
    out = tmp_path / "g"
    tiny = [*TINY, "rollout.seeds_per_prompt=2", f"model={tiny_model_dir}"]
    s = bench_gradient(["tempflow", "flow_grpo"], 3, tiny, out)
    data = json.loads((out / "gradient.json").read_text())
    assert set(data["presets"]) == {"tempflow", "flow_grpo"}
    for r in data["presets"].values():
        assert r["n"] == 3 and r["seconds_per_iter"] > 0 and r["images_per_iter"] > 0 and r["total"] > 0
        # Adam-scaled, each coordinate that moves contributes 1 to the mean squared norm
        assert r["adam"]["n"] == 3 and r["adam"]["total"] == pytest.approx(round(r["adam"]["total"]), rel=1e-4)
        assert r["adam"]["total"] > 0
    assert s["table"].startswith("| preset |") and "| tempflow | 3 |" in s["table"]
    assert (out / "gradient.md").read_text().strip() == s["table"]
    with pytest.raises(TempflowError, match="iterations must be >= 2"):
        bench_gradient(["tempflow"], 1, tiny)


def test_bench_gradient_refuses_gradients_beyond_memory(tiny_model_dir, monkeypatch):
    import tempflow.bench.gradient as bench

    monkeypatch.setattr(bench, "_memory_bytes", lambda: 1000)
    with pytest.raises(TempflowError, match=r"more than half this machine's memory: train LoRA"):
        bench_gradient(["tempflow"], 4, [*TINY, f"model={tiny_model_dir}"])


def test_bench_cli_short(tmp_path, tiny_model_dir, capsys):
    from tempflow.cli import main

    tiny = ["--set", f"model={tiny_model_dir}", "--set", "rollout.num_steps=4", "--set", "threads=1"]
    out = tmp_path / "b"
    assert main(["bench", "learning", "--short", "--presets", "tempflow,flow_grpo", "--budget", "1it",
                 "--out", str(out), *tiny]) == 0
    assert "| tempflow |" in capsys.readouterr().out and (out / "learning.png").is_file()
    assert main(["bench", "system", "--short", "--iterations", "1", *tiny]) == 0
    assert "iteration / limit" in capsys.readouterr().out
    assert main(["bench", "gradient", "--short", "--iterations", "2", "--presets", "tempflow", *tiny]) == 0
    assert "| tempflow | 2 |" in capsys.readouterr().out
    assert main(["bench", "gradient", "--iterations", "1"]) == 2
    assert "--iterations must be >= 2" in capsys.readouterr().err
    assert main(["bench", "gradient", "--presets", ","]) == 2
    assert "--presets needs at least one preset" in capsys.readouterr().err
    assert main(["bench", "gradient", "--presets", "no_such_preset", "--iterations", "2"]) == 2
    assert "no_such_preset" in capsys.readouterr().err
    assert main(["bench", "learning", "--budget", "ten", "--out", str(out)]) == 2
    assert "budget" in capsys.readouterr().err

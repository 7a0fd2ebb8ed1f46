"""Nothing lost, nothing silent: divergence guards, the run folder's lock, torn metrics, wrong
checkpoints and a full disk."""

import errno
import json
import math
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from run_files import latest_step, metric_rows
from tempflow import rewards as reward_registry
from tempflow.cli import main
from tempflow.config import load_config
from tempflow.training.checkpoint import CheckpointError, RunLock, load_checkpoint, save_checkpoint
from tempflow.training.config import TrainConfig
from tempflow.training.guard import RunStopped, StepGuard, all_finite, divergence_warnings, first_non_finite
from tempflow.training.loop import Trainer

FAST = ["rollout.prompts_per_iter=2", "rollout.seeds_per_prompt=2", "rollout.num_steps=4", "eval.every=0",
        "lora.rank=4", "optim.minibatch=16", "ema.every=1", "threads=1", "algorithm.children=2",
        "algorithm.branch_sample=1", "checkpoint_every=1", "keep_checkpoints=5"]


def _train(model, out, *extra, resume=False):
    """`tempflow train` in this process (so that a test can patch it); returns the exit code."""
    sets = [a for s in [f"model={model}", *FAST, *extra] for a in ("--set", s)]
    if resume:
        return main(["train", "--resume", str(out), *sets[2:]])
    return main(["train", "--config", "configs/shapes/tempflow.yaml", "--out", str(out), *sets])


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


# ---- the pure pieces ---------------------------------------------------------------------------------


def test_first_non_finite_names_the_tensor():
    ok, bad = torch.ones(3), torch.tensor([1.0, float("inf")])
    assert first_non_finite([("a", ok), ("b", torch.arange(3)), ("c", bad)]) == "c"
    assert first_non_finite([("a", ok)]) is None
    assert all_finite([ok, ok]) and not all_finite([ok, torch.tensor([float("nan")])]) and not all_finite([bad])


def test_step_guard_undoes_a_step_exactly():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([w], lr=0.1)
    guard = StepGuard([w], opt)
    for _ in range(2):  # the first step creates the optimizer state, which undo removes
        before_w = w.detach().clone()
        before_state = {k: v.clone() for k, v in opt.state[w].items()} if w in opt.state else {}
        w.grad = torch.randn(5)
        guard.keep()
        opt.step()
        assert not torch.equal(w, before_w)
        guard.undo()
        assert torch.equal(w, before_w)
        assert {k: v.tolist() for k, v in opt.state.get(w, {}).items()} == {k: v.tolist()
                                                                          for k, v in before_state.items()}
        w.grad = torch.randn(5)
        opt.step()  # a kept step, so that the second round undoes a step with state


def _rows(rewards, kl=None, std=0.1):
    return [{"step": i + 1, "reward_mean": r, "reward_std": std, "kl": (kl[i] if kl else 0.01)}
            for i, r in enumerate(rewards)]


def test_reward_collapse_warns_once_where_it_starts():
    rewards = [0.5] * 20 + [0.5 - 0.05 * k for k in range(1, 11)] + [0.0] * 5
    fired = [w for n in range(1, len(rewards) + 1) for w in divergence_warnings(_rows(rewards[:n]), window=5)]
    assert [w.kind for w in fired] == ["reward_collapse"]
    assert 20 < fired[0].step < 30 and "collapsing" in fired[0].message
    steady = [0.5 + 0.05 * math.sin(k) for k in range(40)]
    assert not any(divergence_warnings(_rows(steady[:n]), window=5) for n in range(1, 41))
    assert not divergence_warnings(_rows(rewards), window=5, reward_drop=0)  # off


def test_kl_spike_warns():
    kl = [0.01] * 15 + [0.5, 0.6]
    rows = _rows([0.5] * 17, kl)
    assert [w.kind for w in divergence_warnings(rows[:16], window=10)] == ["kl_spike"]
    assert divergence_warnings(rows, window=10) == []  # still high: not said again
    assert divergence_warnings(rows[:16], window=10, spike=0) == []


# ---- weights ------------------------------------------------------------------------------------------


def _trainer(model, tmp_path, *extra):
    cfg = load_config(TrainConfig, "configs/shapes/tempflow.yaml", [f"model={model}", *FAST, *extra])
    return Trainer(cfg, tmp_path / "run")


def test_a_step_that_makes_the_weights_non_finite_is_undone_then_stops_the_run(tiny_model_dir, tmp_path):
    tr = _trainer(tiny_model_dir, tmp_path, "guard.max_bad_steps=2", "optim.steps_per_rollout=1")
    tr.iteration()
    before = [p.detach().clone() for p in tr.params]
    ema, steps = [e.clone() for e in tr.ema], tr.optimizer_steps
    tr.current_lr = lambda: float("inf")  # every step now turns the weights to NaN
    row = tr.iteration()
    assert row["rolled_back_steps"] == 1 and row["optimizer_steps"] == 0 and tr.optimizer_steps == steps
    assert all(torch.equal(p, b) for p, b in zip(tr.params, before))
    assert all(torch.equal(e, b) for e, b in zip(tr.ema, ema))
    with pytest.raises(RunStopped, match="diverged: 2 optimizer step"):
        tr.iteration()
    assert all(torch.equal(p, b) for p, b in zip(tr.params, before))


def test_without_rollback_the_first_non_finite_step_stops(tiny_model_dir, tmp_path):
    tr = _trainer(tiny_model_dir, tmp_path, "guard.rollback=false")
    tr.current_lr = lambda: float("inf")
    with pytest.raises(RunStopped, match="diverged: 1 optimizer step"):
        tr.iteration()


def test_a_diverging_run_exits_2_and_never_saves_non_finite_weights(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "current_lr", lambda self: float("inf") if self.step >= 2 else 1e-3)
    run = tmp_path / "run"
    assert _train(tiny_model_dir, run, "iterations=6") == 2
    line = _stderr_line(capsys)
    # iterations 3 and 4 each had their one step undone; iteration 5's third in a row stopped the run
    assert "diverged: 3 optimizer step(s) in a row" in line and "(iteration 5)" in line
    assert "--resume" in line and "the newest checkpoint is step 4" in line
    assert latest_step(run) == 4 and not (run / "final").exists()
    rows = [r for r in metric_rows(run) if "reward_mean" in r]
    assert [r["rolled_back_steps"] for r in rows] == [0, 0, 1, 1]
    for ckpt in (run / "checkpoints").glob("step_*"):
        assert first_non_finite(load_file(str(ckpt / "state.safetensors")).items()) is None


def test_non_finite_checkpoints_are_never_written_nor_used(tmp_path):
    save_checkpoint(tmp_path, 1, {"param.w": torch.ones(2)}, {"a": 1})
    with pytest.raises(CheckpointError, match="'param.w' holds NaN"):
        save_checkpoint(tmp_path, 2, {"param.w": torch.tensor([1.0, float("nan")])}, {"a": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    # one written by other means is passed over, naming the tensor
    bad = tmp_path / "checkpoints" / "step_000003"
    bad.mkdir()
    save_file({"param.w": torch.tensor([float("inf"), 0.0])}, str(bad / "state.safetensors"))
    (bad / "meta.json").write_text(json.dumps({"step": 3}))
    (tmp_path / "checkpoints" / "latest").write_text("step_000003")
    tensors, meta, warnings = load_checkpoint(tmp_path)
    assert meta["step"] == 1 and "step_000003" in warnings[0] and "'param.w' holds NaN" in warnings[0]


def test_a_model_with_non_finite_weights_is_never_written_nor_loaded(tiny_model_dir, tmp_path, capsys):
    from tempflow.errors import TempflowError
    from tempflow.models import load_model

    model = load_model(tiny_model_dir)
    name, p = next(iter(model.transformer.named_parameters()))
    with torch.no_grad():
        p[0] = float("nan")
    with pytest.raises(TempflowError, match=f"model not written .*{name}.* NaN"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # a folder whose weights were made NaN elsewhere: refused by every command that reads it
    folder = tmp_path / "hand"
    subprocess.run(["cp", "-r", tiny_model_dir, str(folder)], check=True)
    f = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(f))
    assert main(["sample", "--model", str(folder), "--prompt", "a red circle", "--out", str(tmp_path / "s")]) == 2
    assert f"weight {name!r} holds NaN" in _stderr_line(capsys)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    subprocess.run(["cp", "-r", f"{folder}/.", str(run / "final")], check=True)
    assert main(["export", str(run), "--out", str(tmp_path / "e"), "--merged"]) == 2
    assert "NaN or infinite weights" in _stderr_line(capsys) and not (tmp_path / "e").exists()


# ---- rewards ----------------------------------------------------------------------------------------------


def test_non_finite_rewards_in_a_row_stop_the_run_with_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    calls = []

    def flaky(**_):
        def fn(images, prompts, meta):
            calls.append(1)
            bad = len(calls) >= 3  # iterations 3, 4, ...: NaN
            return torch.full((len(prompts),), float("nan")) if bad else torch.rand(len(prompts))
        return fn

    monkeypatch.setitem(reward_registry.REWARDS, "flaky", flaky)
    run = tmp_path / "run"
    assert _train(tiny_model_dir, run, "iterations=10", "reward=flaky", "guard.nonfinite_iterations=2") == 2
    line = _stderr_line(capsys)
    assert "NaN or infinite in 2 iterations in a row (steps 3-4)" in line and "--resume" in line
    assert latest_step(run) == 4  # the work is kept
    rows = [r for r in metric_rows(run) if "reward_mean" in r]
    assert [r["nonfinite_rewards"] for r in rows] == [0.0, 0.0, 1.0, 1.0]


# ---- the run folder -----------------------------------------------------------------------------------------


def test_a_run_folder_in_use_is_refused(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_model_dir, run, "iterations=1") == 0
    before = (run / "metrics.jsonl").read_text()
    lock = RunLock(run)  # as a live run holds it (a second open of the lock file conflicts even in one process)
    try:
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--set", "iterations=3"]) == 2
        assert f"is in use by pid {os.getpid()}" in _stderr_line(capsys)
        assert (run / "metrics.jsonl").read_text() == before
    finally:
        lock.release()
    assert _train(tiny_model_dir, run, "iterations=2", resume=True) == 0  # free again


def test_a_torn_metrics_line_is_dropped_on_resume(tiny_model_dir, tmp_path, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train(tiny_model_dir, ref, "iterations=3") == 0
    assert _train(tiny_model_dir, run, "iterations=2") == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward_me')  # power lost mid-line
    capsys.readouterr()
    assert _train(tiny_model_dir, run, "iterations=3", resume=True) == 0
    assert "dropped 1 torn line(s)" in capsys.readouterr().out
    assert metric_rows(run) == metric_rows(ref)


def _edit_checkpoint(run, step, tensors=None, meta=None):
    path = run / "checkpoints" / f"step_{step:06d}"
    if tensors:
        state = load_file(str(path / "state.safetensors"))
        state = tensors(state)
        save_file(state, str(path / "state.safetensors"))
    if meta:
        data = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps(meta(data)))


def test_checkpoints_that_read_but_do_not_fit_fall_back(tiny_model_dir, tmp_path, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train(tiny_model_dir, ref, "iterations=3") == 0
    assert _train(tiny_model_dir, run, "iterations=3") == 0

    def wrong_shape(state):
        key = next(k for k in state if k.startswith("param."))
        state[key] = torch.zeros(3)
        return state

    _edit_checkpoint(run, 3, tensors=wrong_shape)
    _edit_checkpoint(run, 2, meta=lambda m: {k: v for k, v in m.items() if k != "sampler"})
    (run / "final").rename(tmp_path / "old_final")
    capsys.readouterr()
    assert _train(tiny_model_dir, run, "iterations=3", resume=True) == 0
    out = capsys.readouterr().out
    assert "step_000003 is not usable by this run" in out and "has shape (3,)" in out
    assert "step_000002 is not usable by this run (missing key 'sampler')" in out
    assert metric_rows(run) == metric_rows(ref)  # resumed from step 1 and redone

    for step in range(4):
        _edit_checkpoint(run, step, meta=lambda m: {k: v for k, v in m.items() if k != "optimizer"})
    assert _train(tiny_model_dir, run, "iterations=5", resume=True) == 2
    assert "no usable checkpoint" in _stderr_line(capsys)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    import tempflow.training.checkpoint as ckpt

    real, calls = ckpt.save_file, []

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 3:  # step 2's checkpoint
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    run = tmp_path / "run"
    assert _train(tiny_model_dir, run, "iterations=4") == 2
    line = _stderr_line(capsys)
    assert "cannot write checkpoint step 2 (No space left on device)" in line
    assert "the newest checkpoint is step 1" in line and "--resume" in line
    assert latest_step(run) == 1 and not list((run / "checkpoints").glob(".tmp_*"))
    monkeypatch.setattr(ckpt, "save_file", real)
    assert _train(tiny_model_dir, run, "iterations=4", resume=True) == 0
    assert latest_step(run) == 4


def test_divergence_warnings_reach_the_log_the_metrics_and_the_curve(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import tempflow.training.run as train_mod
    from tempflow.training.guard import Alert

    def fake(rows, *args):
        return [Alert(2, "kl_spike", "kl jumped")] if rows[-1]["step"] == 2 else []

    drawn = {}
    monkeypatch.setattr(train_mod, "divergence_warnings", fake)
    monkeypatch.setattr(train_mod, "plot_curve", lambda rows, path, title: drawn.setdefault("rows", rows))
    run = tmp_path / "run"
    assert _train(tiny_model_dir, run, "iterations=3") == 0
    assert "tempflow: warning: step 2: kl jumped" in capsys.readouterr().err
    rows = [r for r in metric_rows(run) if "reward_mean" in r]
    assert [r.get("warnings") for r in rows] == [None, ["kl_spike"], None]
    assert [r.get("warnings") for r in drawn["rows"] if "reward_mean" in r] == [None, ["kl_spike"], None]


def test_the_curve_marks_warnings(tmp_path):
    from tempflow.plots import curve_figure

    rows = [{"step": i, "reward_mean": 0.5, "time_s": float(i), **({"warnings": ["reward_collapse"]} if i == 3 else {})}
            for i in range(1, 6)]
    fig = curve_figure(rows)
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(lines) == 4 and {tuple(ln.get_xdata()) for ln in lines} == {(3, 3), (3.0, 3.0)}

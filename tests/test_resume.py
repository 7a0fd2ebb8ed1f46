"""A run killed (SIGKILL) and resumed produces the metrics of a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from run_files import latest_step, metric_rows

OWN = {  # each algorithm's options; the old policy (nft, tempflow_nft) and the anchor (awm) are resumed too
    "tempflow": ["rollout.seeds_per_prompt=2", "algorithm.children=3", "algorithm.branch_sample=2",
                 "algorithm.clip_range=0.1"],
    "nft": ["rollout.seeds_per_prompt=2", "algorithm.timesteps=2"],
    "awm": ["rollout.seeds_per_prompt=2", "rollout.num_steps=6", "algorithm.timesteps=2"],
    "tempflow_nft": ["rollout.seeds_per_prompt=2", "algorithm.children=3", "algorithm.branch_sample=2",
                     "algorithm.objective=both"],
}


ITERATIONS = {"nft": 16, "awm": 16}  # their tiny iterations are quick: more of them, so that the kill lands inside


def _args(model, out, preset):
    sets = [f"model={model}", f"iterations={ITERATIONS.get(preset, 6)}", "checkpoint_every=1",
            "rollout.prompts_per_iter=3", "rollout.num_steps=4", "eval.every=3", "eval.limit=6", "eval.num_steps=2",
            "lora.rank=4",
            "optim.minibatch=8", "ema.every=1", "threads=1", "optim.lr=3e-3",
            "optim.lr_schedule=cosine", "optim.warmup=0.2", *OWN[preset]]  # the schedule continues after the kill
    return [sys.executable, "-m", "tempflow", "train", "--config", f"configs/shapes/{preset}.yaml", "--out",
            str(out)] + [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("preset", list(OWN))
def test_kill_and_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, preset):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_args(tiny_model_dir, ref, preset), check=True, capture_output=True, env=env, timeout=300)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_args(tiny_model_dir, run, preset), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 240
    while latest_step(run) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside a later iteration, or inside a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(run)
    assert 2 <= killed_at < ITERATIONS.get(preset, 6), "the run must be killed part-way"

    resume = [sys.executable, "-m", "tempflow", "train", "--resume", str(run)]
    subprocess.run(resume, check=True, capture_output=True, env=env, timeout=300)

    assert metric_rows(run) == metric_rows(ref)
    a = load_file(str(ref / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(run / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tempflow", "train", "--resume", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a training run" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    import torch

    from tempflow.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"a": 1}, keep=3)
    save_checkpoint(tmp_path, 2, {"w": torch.full((2,), 2.0)}, {"a": 2}, keep=3)
    (tmp_path / "checkpoints" / "step_000002" / "state.safetensors").write_bytes(b"torn")
    tensors, meta, warnings = load_checkpoint(tmp_path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(2)) and "step_000002" in warnings[0]
    (tmp_path / "checkpoints" / "step_000001" / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_checkpoint(tmp_path)


def test_checkpoints_are_pruned_and_latest_points_at_the_newest(tmp_path):
    import torch

    from tempflow.training.checkpoint import save_checkpoint

    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000003", "step_000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000004"

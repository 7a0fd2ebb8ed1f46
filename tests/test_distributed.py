"""Two processes (torchrun and accelerate launch, gloo on the CPU) train exactly as one process with the
same global batch and seeds; a killed two-process run resumes exactly; resuming on another number of
processes is refused."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_dump
from run_files import latest_step, metric_rows
from tempflow import rewards

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml",
            "--main_process_port", str(_free_port())]


@pytest.fixture(scope="module")
def dumps(tiny_model_dir, tmp_path_factory):
    """Each case of dist_dump.CASES run by one process (here) and by two (torchrun)."""
    out = tmp_path_factory.mktemp("dumps")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(rewards.REWARDS, "mean_pixel", dist_dump._mean_pixel)
        for case in dist_dump.CASES:
            dist_dump.run_case(str(out / "one"), case, tiny_model_dir)
    r = subprocess.run([*TORCHRUN, "tests/dist_dump.py", str(out / "two"), tiny_model_dir], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _load(out: Path, case: str) -> tuple[dict, list[dict]]:
    one = load_file(str(out / "one" / case / "rank_0.safetensors"))
    return one, [load_file(str(out / "two" / case / f"rank_{r}.safetensors")) for r in (0, 1)]


def _assert_same_advantages(two: list[dict], one: dict) -> None:
    """The advantage of every row, split over two processes, is the one process's (to float rounding:
    the rewards they normalise may differ in the last bits, see above)."""
    torch.testing.assert_close(torch.cat([t["row_adv"] for t in two]), one["row_adv"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(dist_dump.CASES))
def test_two_processes_compute_what_one_does(dumps, case):
    one, two = _load(dumps, case)
    # rollouts: every child made once (rank 0 the first units, rank 1 the rest), from the same noise;
    # equal to float rounding only, as a model call over half the batch may round differently (BLAS
    # kernels are chosen by batch size on some CPUs)
    assert torch.equal(torch.cat([t["row_id"] for t in two]), one["row_id"])
    rows = [k for k in ("x_next", "log_prob_old", "x0", "row_t", "row_noise") if k in one]
    assert rows
    for key in rows:
        torch.testing.assert_close(torch.cat([t[key] for t in two]), one[key], rtol=1e-5, atol=1e-5, msg=key)
    # gathered rewards and group keys: identical on both processes, and those of one process
    assert torch.equal(two[0]["rewards"], two[1]["rewards"]) and torch.equal(two[0]["keys"], two[1]["keys"])
    assert torch.equal(two[0]["keys"], one["keys"])
    torch.testing.assert_close(two[0]["rewards"], one["rewards"], rtol=1e-5, atol=1e-6)
    _assert_same_advantages(two, one)
    assert one["rewards"].std() > 0 and (one["row_adv"] != 0).any()
    # gradients after the all-reduce: the same on both processes, and those of one process
    grads = [k for k in one if k.startswith("grad.")]
    assert grads
    for k in grads:
        assert torch.equal(two[0][k], two[1][k])
        torch.testing.assert_close(two[0][k], one[k], rtol=1e-4, atol=1e-7)
    # weights after the update, and the algorithm's state after it (an old policy, an anchor, ...)
    for k in (k for k in one if k.startswith(("weight.", "algorithm."))):
        assert torch.equal(two[0][k], two[1][k])
        torch.testing.assert_close(two[0][k], one[k], rtol=1e-5, atol=1e-6)


def test_a_group_split_between_processes_gets_the_advantages_of_one_process(dumps):
    one, two = _load(dumps, "flow_grpo")
    shared = set(two[0]["image_prompt"].tolist()) & set(two[1]["image_prompt"].tolist())
    assert shared, "the case must put one prompt group on both processes"
    _assert_same_advantages(two, one)


def _train_args(model, out):
    sets = [f"model={model}", "iterations=6", "checkpoint_every=1", "rollout.prompts_per_iter=3",
            "rollout.seeds_per_prompt=2", "algorithm.children=3", "rollout.num_steps=4", "algorithm.branch_sample=2",
            "eval.every=3", "eval.limit=5", "eval.num_steps=2", "lora.rank=4", "optim.minibatch=8", "ema.every=1",
            "threads=1", "algorithm.clip_range=0.1", "optim.lr=3e-3", "reward=jpeg_compressibility"]
    return ["-m", "tempflow", "train", "--out", str(out)] + [a for s in sets for a in ("--set", s)]


def test_killed_two_process_run_resumes_exactly_and_only_on_two(tiny_model_dir, tmp_path):
    ref = tmp_path / "ref"  # uninterrupted, launched with accelerate
    r = subprocess.run([*_accelerate(), *_train_args(tiny_model_dir, ref)], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((ref / "samples").glob("*.png"))) == 3  # written once, by the main process
    assert json.loads((ref / "checkpoints" / "step_000006" / "meta.json").read_text())["world_size"] == 2

    run = tmp_path / "killed"  # launched with torchrun, killed (launcher and workers) part-way
    proc = subprocess.Popen([*TORCHRUN, *_train_args(tiny_model_dir, run)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while latest_step(run) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(run)
    assert 2 <= killed_at < 6, "the run must be killed part-way"

    one = subprocess.run([sys.executable, "-m", "tempflow", "train", "--resume", str(run)], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and "Traceback" not in one.stderr
    lines = [ln for ln in one.stderr.splitlines() if ln.startswith("tempflow: error:")]
    assert len(lines) == 1 and "written by 2 process(es) and this run has 1" in lines[0], one.stderr[-2000:]

    r = subprocess.run([*TORCHRUN, "-m", "tempflow", "train", "--resume", str(run)], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert metric_rows(run) == metric_rows(ref)
    a = load_file(str(ref / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(run / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_units_are_shared_in_balanced_contiguous_chunks():
    from tempflow.training.distributed import unit_range

    for world in range(1, 9):
        for n in range(world, 30):
            chunks = [unit_range(n, world, r) for r in range(world)]
            assert chunks[0][0] == 0 and chunks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
            sizes = [hi - lo for lo, hi in chunks]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_a_units_noise_does_not_depend_on_its_batch():
    from tempflow.algorithms.rollout import unit_noise

    batch = unit_noise([11, 22, 33], step=2, count=3, shape=(3, 4, 4))  # (9, 3, 4, 4), unit-major
    assert torch.equal(batch[3:6], unit_noise([22], step=2, count=3, shape=(3, 4, 4)))
    assert not torch.equal(batch[3:6], unit_noise([22], step=3, count=3, shape=(3, 4, 4)))
    assert not torch.equal(batch[3], batch[4])


def test_sharding_configurations_are_refused_clearly(monkeypatch):
    from tempflow.errors import TempflowError
    from tempflow.training.distributed import Dist

    monkeypatch.setattr(Dist, "kind", property(lambda self: "FSDP"))
    with pytest.raises(TempflowError, match="FSDP.*configs/accelerate/ddp.yaml"):
        Dist()

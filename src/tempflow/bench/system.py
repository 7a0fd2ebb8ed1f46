"""`tempflow bench system`: one preset's training iteration broken into phases (rollout main path,
SDE steps and child completion, decoding, reward, update), its model calls, images per second and
peak memory, against the compute limit: the same forward and forward + backward work run back to
back in the largest batches that fit, measured in the same process.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import torch

from tempflow.bench.numbers import fmt
from tempflow.bench.presets import PRESET_DIR, load_preset


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int = 3) -> float:
    """Best of `repeats` wall-clock seconds of fn()."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _largest_batch_rate(make_fn, start: int, cap: int, device: torch.device) -> tuple[float, int]:
    """(seconds per row, batch) at the fastest of batches start, 2*start, ... <= cap that fit."""
    best, best_b, b = float("inf"), start, start
    while b <= cap:
        try:
            fn = make_fn(b)
            fn()  # warm-up
            per_row = _time(fn, device) / b
        except torch.OutOfMemoryError:
            break
        if per_row < best:
            best, best_b = per_row, b
        b *= 2
    return best, best_b


def compute_limit(trainer, cond_rows: int, forward_images: int, update_rows: int, cap: int = 1024) -> dict:
    """Seconds that `forward_images` guided velocity rows (no grad) and `update_rows` forward+backward
    rows (with the reference forward when KL is on) take back to back in the largest batches."""
    model, r = trainer.model, trainer.cfg.rollout
    dev = model.device
    cond_all = trainer.encode(trainer.sampler.prompts[:cond_rows])
    shape = model.latent_shape()

    def rows_cond(b: int):
        return cond_all.index(torch.arange(b) % len(cond_all))

    def fwd(b: int):
        x, t, c = torch.randn(b, *shape, device=dev), torch.full((b,), 0.5, device=dev), rows_cond(b)

        def run() -> None:
            with torch.no_grad(), trainer.policy.autocast():
                model.velocity(x, t, c, r.guidance)
        return run

    def fwd_bwd(b: int):
        x, t, c = torch.randn(b, *shape, device=dev), torch.full((b,), 0.5, device=dev), rows_cond(b)

        def run() -> None:
            model.train()
            with trainer.policy.autocast():
                v = model.velocity(x, t, c, r.guidance)
            v.float().pow(2).mean().backward()
            if getattr(trainer.cfg.algorithm, "kl_beta", 0) > 0:
                with torch.no_grad(), model.reference(), trainer.policy.autocast():
                    model.velocity(x, t, c, r.guidance)
            for p in trainer.params:
                p.grad = None
            model.eval()
        return run

    f_rate, f_batch = _largest_batch_rate(fwd, 16, cap, dev)
    b_rate, b_batch = _largest_batch_rate(fwd_bwd, 16, cap, dev)
    return {"limit_forward_s": f_rate * forward_images, "limit_forward_batch": f_batch,
            "limit_update_s": b_rate * update_rows, "limit_update_batch": b_batch,
            "limit_s": f_rate * forward_images + b_rate * update_rows}


def bench_system(preset: str, iterations: int = 3, overrides: list[str] | None = None,
                 out: str | Path | None = None, preset_dir: str | Path = PRESET_DIR) -> dict:
    """Time `iterations` training iterations of `preset` (a name in `preset_dir` or a YAML path), after
    one warm-up, phase by phase, and the compute limit of the same work; OUT/system.json when `out`."""
    import tempfile

    from tempflow.algorithms.rollout import PHASES
    from tempflow.training.loop import Trainer

    cfg = load_preset(preset, overrides or [], preset_dir)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp)
        dev = trainer.model.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        trainer.iteration()  # warm-up: caches, allocator, lazy initialisation
        rows = []
        for _ in range(iterations):
            _sync(dev)
            t0 = time.perf_counter()
            row = trainer.iteration()
            _sync(dev)
            row["iteration_s"] = time.perf_counter() - t0
            rows.append(row)
        mean = {k: statistics.fmean(r[k] for r in rows)
                for k in ("iteration_s", "rollout_s", "reward_s", "update_s", "nfe", "images", "update_rows",
                          *PHASES)}
        peak = _peak_memory_mb(dev)  # of training, before the limit's large batches
        nfe_rows = mean["nfe"]  # single-image evaluations, CFG counted twice
        guided = 2 if cfg.rollout.guidance != 1.0 else 1
        limit = compute_limit(trainer, cfg.rollout.prompts_per_iter, int(nfe_rows / guided),
                              int(mean["update_rows"]))
        result = {
            "preset": str(preset), "device": str(dev), "threads": torch.get_num_threads(),
            "iterations": iterations, **mean, "images_per_s": mean["images"] / mean["iteration_s"],
            "peak_memory_mb": peak, **limit,
        }
        result["ratio"] = mean["iteration_s"] / limit["limit_s"]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "system.json").write_text(json.dumps(result, indent=1))
    return result


def system_table(res: dict) -> str:
    """The lines `tempflow bench system` prints: one preset's timings by phase against the limit."""
    order = [("iteration_s", "iteration (s)"), ("main_s", "  rollout: main path"),
             ("branch_s", "  rollout: SDE steps + child completion"), ("decode_s", "  rollout: decoding"),
             ("reward_s", "  reward"), ("update_s", "  update"), ("nfe", "NFE per iteration"),
             ("images_per_s", "images per second"), ("peak_memory_mb", "peak memory (MiB)"),
             ("limit_forward_s", "limit: forward calls, no grad (s)"),
             ("limit_update_s", "limit: forward + backward (s)"), ("limit_s", "limit (s)"),
             ("ratio", "iteration / limit")]
    lines = [f"{res['preset']} on {res['device']} ({res['threads']} threads), mean of {res['iterations']} iterations"]
    for k, label in order:
        if k in res:
            lines.append(f"  {label:<42}{fmt(float(res[k]), 3):>12}")
    return "\n".join(lines)

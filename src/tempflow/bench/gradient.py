"""`tempflow bench gradient`: how much of one iteration's policy gradient is signal, and the
wall-clock each preset needs to one unit of gradient signal-to-noise.

At the starting weights, N independent rollouts each give the gradient an optimizer step that takes
all their trained rows would follow (Trainer.gradient); the Gram matrix of the N gradients separates
the signal, common to all of them, from the noise of each.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from tempflow.bench.numbers import fmt
from tempflow.bench.presets import PRESET_DIR, load_preset
from tempflow.errors import TempflowError

if TYPE_CHECKING:
    from tempflow.training.loop import Trainer


def gradient_noise(gram: torch.Tensor) -> dict:
    """How much of a one-iteration policy gradient is signal, from the Gram matrix (n, n) of n >= 2
    gradients g_i of independent rollouts at the same weights.

    E[g_i . g_j] (i != j) = |G|^2, the squared true gradient; E|g_i|^2 = |G|^2 + noise. So
    signal_share = mean off-diagonal / mean diagonal estimates |G|^2 / E|g|^2, and
    iterations_to_snr1 = noise / |G|^2 is how many iterations' gradients must be averaged before
    their mean holds as much signal as noise (the gradient noise scale, counted in iterations).
    The standard error comes from the spread of the rows' off-diagonal means; `resolved` is false
    while the signal is under two standard errors (more iterations are needed to tell)."""
    g = gram.double()
    n = g.shape[0]
    if n < 2 or g.shape != (n, n):
        raise ValueError("gradient_noise needs a square Gram matrix of at least 2 gradients")
    total = g.diagonal().mean().item()
    off = g[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    signal = off.mean().item()
    se = off.mean(1).std().item() / math.sqrt(n) if n > 2 else float("nan")
    noise = total - signal
    resolved = signal > 2 * se if math.isfinite(se) else False
    share = signal / total if total > 0 else float("nan")
    return {"n": n, "signal": signal, "signal_se": se, "total": total, "signal_share": share,
            "signal_share_se": se / total if total > 0 else float("nan"), "resolved": bool(resolved),
            "iterations_to_snr1": noise / signal if resolved else None}


def preconditioned(grads: torch.Tensor) -> torch.Tensor:
    """The gradients (n, P) as Adam steps them: each coordinate divided by its root mean square over
    the n rollouts, Adam's sqrt(v) once its second moment has settled (coordinates that never move
    stay 0). Their Gram matrix gives the signal share of what the optimizer applies, in which every
    parameter counts alike instead of the few with the largest raw gradients."""
    rms = grads.pow(2).mean(0, dtype=torch.float64).sqrt().to(grads.dtype)  # no float64 copy of all n x P
    return torch.where(rms > 0, grads / rms.clamp_min(torch.finfo(grads.dtype).tiny), 0.0)


def _memory_bytes() -> int:
    """Physical memory of this machine (POSIX), or 2**62 where it cannot be read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 2**62


def rollout_gradient(trainer: Trainer) -> tuple[torch.Tensor, dict]:
    """A fresh rollout's policy gradient at the trainer's current weights, nothing stepped: the
    iteration's phases (rollout, score, advantages) and then Trainer.gradient in place of the update;
    with {images, trained_rows, nfe, seconds} of that rollout."""
    t0 = time.perf_counter()
    prompts = trainer.sampler.next(trainer.cfg.rollout.prompts_per_iter)
    ro = trainer.rollout(prompts)
    rewards, _ = trainer.score(ro, prompts)
    grad, rows = trainer.gradient(ro, trainer.advantages(ro, rewards), trainer.encode(prompts))
    nfe = int(trainer.dist.sum(torch.tensor([ro.nfe])))  # every process's model calls
    return grad, {"images": len(rewards), "trained_rows": rows, "nfe": nfe, "seconds": time.perf_counter() - t0}


def bench_gradient(presets: list[str], iterations: int, overrides: list[str] | None = None,
                   out: str | Path | None = None, preset_dir: str | Path = PRESET_DIR) -> dict:
    """For each preset (a name in `preset_dir` or a YAML path): `iterations` independent rollouts'
    policy gradients at the starting weights (rollout_gradient), their signal share and the wall-clock
    to one unit of signal-to-noise; OUT/gradient.json and gradient.md when `out`. The gradients are
    kept on the CPU (iterations x trainable parameters floats)."""
    import tempfile

    from tempflow.training.loop import Trainer

    if iterations < 2:
        raise TempflowError("--iterations must be >= 2: the signal is measured between independent gradients")
    results = {}
    for name in presets:
        cfg = load_preset(name, overrides or [], preset_dir)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, tmp)
            need = iterations * sum(p.numel() for p in trainer.params) * 4
            if need > 0.5 * _memory_bytes():
                raise TempflowError(f"{iterations} gradients of {name}'s trainable parameters need "
                                    f"{need / 2**30:.1f} GiB, more than half this machine's memory: train LoRA "
                                    "adapters (--set lora.enabled=true) or pass fewer --iterations")
            grads, infos = [], []
            for _ in tqdm(range(iterations), desc=f"gradient {name}", unit="it", dynamic_ncols=True):
                grad, info = rollout_gradient(trainer)
                grads.append(grad)
                infos.append(info)
        gm = torch.stack(grads)
        res = gradient_noise(gm @ gm.T)
        pre = preconditioned(gm)
        res["adam"] = gradient_noise(pre @ pre.T)
        del pre
        mean = {k: statistics.fmean(i[k] for i in infos) for k in ("images", "trained_rows", "nfe", "seconds")}
        its = res["iterations_to_snr1"]
        res.update({"preset": name, **{f"{k}_per_iter": v for k, v in mean.items()},
                    "seconds_to_snr1": its * mean["seconds"] if its is not None else None,
                    "images_to_snr1": its * mean["images"] if its is not None else None})
        results[name] = res
        del grads, gm
    summary = {"iterations": iterations, "overrides": list(overrides or []), "presets": results,
               "table": gradient_table(results)}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gradient.json").write_text(json.dumps(summary, indent=1))
        (Path(out) / "gradient.md").write_text(summary["table"] + "\n")
    return summary


def gradient_table(results: dict) -> str:
    """The markdown table of `bench gradient`: one row per preset."""
    lines = ["| preset | gradients | s / iteration | images / iteration | signal share | "
             "iterations to SNR 1 | seconds to SNR 1 | signal share, Adam-scaled |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        share = f"{r['signal_share']:.4f} ± {r['signal_share_se']:.4f}"
        adam_share = f"{r['adam']['signal_share']:.4f} ± {r['adam']['signal_share_se']:.4f}"
        unresolved = "not resolved"
        lines.append(f"| {name} | {r['n']} | {r['seconds_per_iter']:.1f} | {r['images_per_iter']:.0f} | {share} | "
                     f"{fmt(r['iterations_to_snr1'], 1) if r['resolved'] else unresolved} | "
                     f"{fmt(r['seconds_to_snr1'], 0) if r['resolved'] else unresolved} | {adam_share} |")
    return "\n".join(lines)

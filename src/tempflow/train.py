"""`tempflow train`: run the Trainer with logging, evaluation, checkpoints and resume."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tempflow import checkpoint as ckpt
from tempflow.config import load_config, to_yaml
from tempflow.distributed import unit_range
from tempflow.errors import PromptError, TempflowError
from tempflow.evaluate import line_seeds, summarise
from tempflow.images import save_grid
from tempflow.io import atomic_write_bytes
from tempflow.plots import plot_curve
from tempflow.sampling import generate
from tempflow.shapes.grammar import parse_prompt
from tempflow.shapes.prompts import load_prompts, spread
from tempflow.shapes.verifier import score
from tempflow.train_config import TrainConfig
from tempflow.trainer import Trainer, write_metrics_line

TIMING_KEYS = ("time_s", "rollout_s", "main_s", "branch_s", "decode_s", "reward_s", "update_s", "eval_s")


def _eval_lines(cfg: TrainConfig) -> list[str]:
    return load_prompts(cfg.eval.prompts, cfg.eval.limit)


def _eval_scores(trainer: Trainer, images: torch.Tensor, lines: list[str]) -> torch.Tensor:
    """Reward of every process's evaluation images, combined over all of them (running statistics frozen)."""
    fn, d = trainer.reward_fn, trainer.dist
    with getattr(fn, "frozen", contextlib.nullcontext)():  # evaluation must not move running reward statistics
        if hasattr(fn, "raw_scores"):
            return fn.combine(d.gather(fn.raw_scores(images, lines, [{} for _ in lines])))
        return d.gather(fn(images, lines, [{} for _ in lines]).float().reshape(-1).cpu())


def run_eval(trainer: Trainer, lines: list[str], out_dir: Path) -> dict:
    """Evaluate the EMA weights; shapes prompts get per-category accuracy, others the reward mean.

    With eval.samples = K, each line is drawn K times (sample k of line i with seed eval.seed + k * lines
    + i) and the accuracy is the mean over the samples, with pass@K beside it. Several processes share
    the lines by the rule that shares units (a line keeps its seeds); scores and the grid's images (the
    first sample of each line) are gathered and the main process writes the grid."""
    e, d = trainer.cfg.eval, trainer.dist
    t0 = time.perf_counter()
    lo, hi = unit_range(len(lines), d.world, d.rank)
    try:
        specs = [parse_prompt(p) for p in lines]
    except PromptError:
        specs = None
    texts = [s.text() for s in specs] if specs is not None else lines
    n, fracs, stricts, rewards, images = len(lines), [], [], [], None
    with trainer.ema_weights():
        for k in range(e.samples):  # the seeds `tempflow eval --samples` draws with
            drawn = generate(trainer.model, texts[lo:hi], line_seeds(e.seed, k, n, lo, hi), e.num_steps, e.guidance)
            images = drawn if images is None else images  # the grid shows the first sample of each line
            if specs is not None:
                frac, strict = score(drawn, specs[lo:hi])
                fracs.append(d.gather(torch.from_numpy(frac)))
                stricts.append(d.gather(torch.from_numpy(strict)))
            else:
                rewards.append(_eval_scores(trainer, drawn, lines[lo:hi]).float())
    if specs is not None:
        summary = summarise(specs, torch.stack(fracs, 1).numpy(), torch.stack(stricts, 1).numpy())
        row = {"eval_overall": summary["overall"], "eval_reward": summary["reward_mean"],
               **{f"eval_{k}": v for k, v in summary["per_category"].items()}}
        if e.samples > 1:
            row["eval_pass_at_k"] = summary["pass_at_k_overall"]
    else:
        row = {"eval_reward": float(torch.cat(rewards).mean())}
    rows = spread(len(lines), 32)
    grid = d.gather(images[[i - lo for i in rows if lo <= i < hi]])
    if d.is_main:
        save_grid(grid, out_dir / "samples" / f"eval_step_{trainer.step:06d}.png", [lines[i] for i in rows], cols=8)
    return {"step": trainer.step, **row, "eval_guidance": e.guidance, "eval_s": time.perf_counter() - t0}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines written after the checkpoint we resume from."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def resume_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The run's own config, with optional overrides (for example a larger iterations)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise TempflowError(f"{str(run_dir)!r} is not a training run (no config.yaml); check the --resume path")
    return load_config(TrainConfig, path, overrides)


def _start(cfg: TrainConfig, run_dir: Path, resume: bool) -> tuple[Trainer, bool]:
    if not resume and (run_dir / "checkpoints").exists():
        raise TempflowError(f"{str(run_dir)!r} already holds a run; resume it with --resume {run_dir} or pick --out")
    trainer = Trainer(cfg, run_dir)
    main = trainer.dist.is_main  # only the main process writes into the run folder
    if resume:
        if main:
            ckpt.clean_partial(run_dir)
        trainer.dist.barrier()
        tensors, meta, warnings = ckpt.load_checkpoint(run_dir)  # every process reads the same checkpoint
        for w in warnings if main else []:
            print(f"tempflow: warning: {w}")
        trainer.load_state(tensors, meta)
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
        return trainer, True
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("")
    trainer.dist.barrier()
    return trainer, False


def _save(trainer: Trainer) -> None:
    tensors, meta = trainer.state()  # every process takes part (its random states are gathered)
    if trainer.dist.is_main:
        ckpt.save_checkpoint(trainer.run_dir, trainer.step, tensors, meta, trainer.cfg.keep_checkpoints)


def _progress(cfg: TrainConfig, trainer: Trainer) -> tuple[float, float, str]:
    """(done, total, unit) of the budget that binds: seconds (max_minutes), model calls (max_nfe) or
    iterations; done never passes total."""
    if cfg.max_minutes:
        total = round(cfg.max_minutes * 60, 1)
        return min(round(trainer.elapsed, 1), total), total, "s"
    if cfg.max_nfe:
        return min(trainer.nfe_total, cfg.max_nfe), cfg.max_nfe, " NFE"
    return trainer.step, cfg.iterations, "it"


def _progress_bar(cfg: TrainConfig, trainer: Trainer, main: bool) -> tqdm:
    """A bar over the run's budget: a time or NFE budget shows time or model calls, not a made-up
    iteration count."""
    done, total, unit = _progress(cfg, trainer)
    fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f}" + unit + " [{elapsed}<{remaining}{postfix}]"
    return tqdm(total=total, initial=done, desc="train", dynamic_ncols=True, disable=not main, bar_format=fmt)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Train until cfg.iterations (or max_minutes); returns RUN_DIR/final."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    trainer, resumed = _start(cfg, run_dir, resume)
    main = trainer.dist.is_main
    metrics = run_dir / "metrics.jsonl"
    if main:
        atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=trainer.step + 1 if resumed else None)
    lines = _eval_lines(cfg) if cfg.eval.every else []

    def log(row: dict) -> None:
        if not main:
            return
        write_metrics_line(metrics, row)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and v == v:
                writer.add_scalar(k, v, row["step"])

    if not resumed:
        if lines:
            log({**run_eval(trainer, lines, run_dir), "time_s": 0.0})
        _save(trainer)
    saved_at = trainer.step  # a resumed run starts from its newest checkpoint
    bar = _progress_bar(cfg, trainer, main)
    last_eval = None
    while trainer.step < cfg.iterations:
        t0 = time.perf_counter()
        try:
            row = trainer.iteration()
        except TempflowError as e:  # the trainer is as it was after the last iteration: keep that work
            if trainer.step != saved_at:
                _save(trainer)
            bar.close()
            if main:
                writer.close()
            raise TempflowError(f"{e} -- the run is saved at step {trainer.step}; after fixing this, continue "
                                f"with: tempflow train --resume {run_dir}") from None
        trainer.elapsed += trainer.dist.max(time.perf_counter() - t0)  # the slowest process: the same everywhere
        row["time_s"] = trainer.elapsed
        log(row)
        if row["nonfinite_frac"] > 0 and main:
            bar.write(f"step {trainer.step}: {row['nonfinite_frac']:.0%} of groups had NaN/inf rewards; skipped")
        out_of_time = bool(cfg.max_minutes and trainer.elapsed > cfg.max_minutes * 60) or bool(
            cfg.max_nfe and trainer.nfe_total >= cfg.max_nfe)
        done = trainer.step >= cfg.iterations or out_of_time
        if lines and (trainer.step % cfg.eval.every == 0 or done):
            ev = {**run_eval(trainer, lines, run_dir), "time_s": trainer.elapsed}
            log(ev)
            last_eval = ev["eval_overall"] if "eval_overall" in ev else ev["eval_reward"]
        if trainer.step % cfg.checkpoint_every == 0 or done:
            _save(trainer)
            saved_at = trainer.step
        bar.update(_progress(cfg, trainer)[0] - bar.n)
        bar.set_postfix(step=trainer.step, reward=f"{row['reward_mean']:.3f}",
                        **({"eval": f"{last_eval:.3f}"} if last_eval else {}))
        if out_of_time:
            if main:
                bar.write(f"budget (max_minutes / max_nfe) reached at step {trainer.step}; "
                          f"continue with --resume {run_dir} --set max_minutes=0 --set max_nfe=0")
            break
    bar.close()
    final = run_dir / "final"
    if main:
        writer.close()
        final = trainer.save_final()
        plot_curve(read_metrics(metrics), run_dir / "curve.png", title=f"{cfg.algorithm.name} on {cfg.prompts}")
    trainer.dist.close()  # everyone waits for the main process's last writes, then leaves the process group
    return final


def before_after(rows: list[dict]) -> str:
    """A table of the first and the last evaluation of a run."""
    evals = [r for r in rows if "eval_overall" in r]
    if len(evals) < 2:
        return ""
    first, last = evals[0], evals[-1]
    keys = [k for k in first if k.startswith("eval_") and k not in ("eval_s", "eval_reward", "eval_guidance")]
    guidance = f" (guidance {first['eval_guidance']:g})" if "eval_guidance" in first else ""
    out = [f"{'accuracy' + guidance:<24}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}"]
    for k in keys:
        out.append(f"{k[5:]:<24}{first[k]:>12.3f}{last.get(k, float('nan')):>12.3f}")
    return "\n".join(out)



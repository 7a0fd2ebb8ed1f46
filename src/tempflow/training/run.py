"""`tempflow train`: run the Trainer with logging, evaluation, checkpoints and resume."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tempflow.config import load_config, to_yaml
from tempflow.errors import TempflowError
from tempflow.evaluate import line_seeds, summarise, verifier_scoring
from tempflow.images import save_grid
from tempflow.io import atomic_write_bytes
from tempflow.plots import plot_curve
from tempflow.prompts import load_prompts, spread
from tempflow.sampling import generate
from tempflow.training import checkpoint as ckpt
from tempflow.training.config import TrainConfig
from tempflow.training.distributed import unit_range
from tempflow.training.guard import RunStopped, divergence_warnings
from tempflow.training.loop import Trainer, sync_file, write_metrics_line
from tempflow.worlds import world_of

TIMING_KEYS = ("time_s", "rollout_s", "main_s", "branch_s", "decode_s", "reward_s", "update_s", "eval_s")


def _eval_lines(cfg: TrainConfig) -> list[str]:
    return load_prompts(cfg.eval.prompts, cfg.eval.limit)


def _eval_scores(trainer: Trainer, images: torch.Tensor, lines: list[str]) -> torch.Tensor:
    """Reward of every process's evaluation images, combined over all of them (running statistics frozen)."""
    fn, d = trainer.reward_fn, trainer.dist
    with fn.frozen():  # evaluation must not move running reward statistics
        return fn.combine(d.gather(fn.raw_scores(images, lines, [{} for _ in lines])))


def run_eval(trainer: Trainer, lines: list[str], out_dir: Path) -> dict:
    """Evaluate the EMA weights: prompts of a world with a verifier get per-category accuracy, others
    the reward mean.

    With eval.samples = K, each line is drawn K times (sample k of line i with seed eval.seed + k * lines
    + i) and the accuracy is the mean over the samples, with pass@K beside it. Several processes share
    the lines by the rule that shares units (a line keeps its seeds); scores and the grid's images (the
    first sample of each line) are gathered and the main process writes the grid."""
    e, d = trainer.cfg.eval, trainer.dist
    t0 = time.perf_counter()
    lo, hi = unit_range(len(lines), d.world, d.rank)
    world = world_of(lines, [trainer.cfg.eval.prompts])
    verifier = world if world is not None and world.has_verifier else None
    n, fracs, stricts, images = len(lines), [], [], None
    with trainer.ema_weights():
        for k in range(e.samples):  # the seeds `tempflow eval --samples` draws with
            drawn = generate(trainer.model, lines[lo:hi], line_seeds(e.seed, k, n, lo, hi), e.num_steps, e.guidance)
            images = drawn if images is None else images  # the grid shows the first sample of each line
            if verifier is not None:
                verdict = verifier.judge(drawn, lines[lo:hi])
                fracs.append(d.gather(torch.as_tensor(np.asarray(verdict.frac, dtype=np.float32))))
                stricts.append(d.gather(torch.as_tensor(np.asarray(verdict.strict, dtype=bool))))
            else:
                fracs.append(_eval_scores(trainer, drawn, lines[lo:hi]).float())
    if verifier is not None:
        summary = summarise(verifier_scoring(verifier, lines), torch.stack(fracs, 1).numpy(),
                            torch.stack(stricts, 1).numpy())
        row = {"eval_overall": summary["overall"], "eval_reward": summary["reward_mean"],
               **{f"eval_{k}": v for k, v in summary["per_category"].items()}}
        if e.samples > 1:
            row["eval_pass_at_k"] = summary["pass_at_k_overall"]
    else:
        row = {"eval_reward": float(torch.cat(fracs).mean())}
    rows = spread(len(lines), 32)
    grid = d.gather(images[[i - lo for i in rows if lo <= i < hi]])
    if d.is_main:
        save_grid(grid, out_dir / "samples" / f"eval_step_{trainer.step:06d}.png", [lines[i] for i in rows], cols=8)
    return {"step": trainer.step, **row, "eval_guidance": e.guidance, "eval_s": time.perf_counter() - t0}


def _parse_metrics(text: str) -> tuple[list[dict], int]:
    """(rows, lines dropped): every line that is not a JSON object with a step (a line torn by a crash or
    a full disk) is dropped."""
    rows, torn = [], 0
    for ln in text.splitlines():
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            int(row["step"])
        except (ValueError, TypeError, KeyError):
            torn += 1
            continue
        rows.append(row)
    return rows, torn


def _truncate_metrics(path: Path, step: int) -> str:
    """Keep the lines of steps up to `step` (the checkpoint the run resumes from), dropping torn ones;
    returns what was dropped, in words ("" if nothing)."""
    if not path.is_file():
        return ""
    rows, torn = _parse_metrics(path.read_text(encoding="utf-8", errors="replace"))
    keep = [r for r in rows if int(r["step"]) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
    later = len(rows) - len(keep)
    said = [f"{torn} torn line(s)"] * bool(torn) + [f"{later} line(s) of steps after {step}"] * bool(later)
    return " and ".join(said)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (torn lines left out)."""
    return _parse_metrics(path.read_text(encoding="utf-8", errors="replace"))[0] if path.is_file() else []


def resume_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The run's own config, with optional overrides (for example a larger iterations)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise TempflowError(f"{str(run_dir)!r} is not a training run (no config.yaml); check the --resume path")
    return load_config(TrainConfig, path, overrides)


def _agree(trainer: Trainer, error: str, cls: type[TempflowError] = TempflowError) -> None:
    """Raise the first process's error on every process (what only the main process does, such as
    writing, may fail: all must stop together)."""
    errors = [e for e in trainer.dist.gather_objects(error) if e]
    if errors:
        raise cls(errors[0])


def _lock(trainer: Trainer, run_dir: Path) -> ckpt.RunLock | None:
    """The main process locks the run folder; a second process training in it is refused."""
    lock, error = None, ""
    if trainer.dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = ckpt.RunLock(run_dir)
        except TempflowError as e:
            error = str(e)
    _agree(trainer, error)
    return lock


def _check_fresh(run_dir: Path) -> None:
    if (run_dir / "checkpoints").exists():
        raise TempflowError(f"{str(run_dir)!r} already holds a run; resume it with --resume {run_dir} or pick --out")


def _start(cfg: TrainConfig, run_dir: Path, resume: bool) -> tuple[Trainer, bool, ckpt.RunLock | None]:
    if not resume:
        _check_fresh(run_dir)  # before the model loads; again under the lock
    trainer = Trainer(cfg, run_dir)
    main = trainer.dist.is_main  # only the main process writes into the run folder
    lock = _lock(trainer, run_dir)
    try:
        if resume:
            if main:
                ckpt.clean_partial(run_dir)
            trainer.dist.barrier()
            # every process reads the same checkpoint, falling back past ones that do not fit the run
            _, _, warnings = ckpt.load_checkpoint(run_dir, trainer.load_state)
            for w in warnings if main else []:
                print(f"tempflow: warning: {w}")
            if main:
                dropped = _truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
                if dropped:
                    print(f"tempflow: resuming at step {trainer.step}: dropped {dropped} from metrics.jsonl")
            return trainer, True, lock
        _check_fresh(run_dir)  # another process may have started a run here meanwhile
        if main:
            (run_dir / "metrics.jsonl").write_text("")
        trainer.dist.barrier()
        return trainer, False, lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _newest(run_dir: Path) -> str:
    step = ckpt.newest_step(run_dir)
    return "there is no checkpoint yet" if step is None else f"the newest checkpoint is step {step}"


def _disk_error(e: OSError, what: str, run_dir: Path) -> str:
    """One line for a failed write (a full disk, a folder gone read-only)."""
    reason = e.strerror or str(e)
    return (f"cannot write {what} ({reason}); {_newest(run_dir)}: free space or fix the folder, then continue "
            f"with: tempflow train --resume {run_dir}")


def _save(trainer: Trainer) -> None:
    """Checkpoint the trainer (metrics flushed to the disk first). A checkpoint that cannot be written
    (non-finite values, a full disk) stops the run on every process, the previous one still the newest."""
    tensors, meta = trainer.state()  # every process takes part (its random states are gathered)
    error = ""
    if trainer.dist.is_main:
        try:
            sync_file(trainer.run_dir / "metrics.jsonl")
            ckpt.save_checkpoint(trainer.run_dir, trainer.step, tensors, meta, trainer.cfg.keep_checkpoints)
        except ckpt.CheckpointError as e:
            error = f"{e}; {_newest(trainer.run_dir)}"
        except OSError as e:
            error = _disk_error(e, f"checkpoint step {trainer.step}", trainer.run_dir)
    _agree(trainer, error, RunStopped)


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
    """Train until cfg.iterations (or max_minutes); returns RUN_DIR/final. The run folder is locked
    while it trains."""
    run_dir = Path(run_dir)
    trainer, resumed, lock = _start(cfg, run_dir, resume)
    try:
        return _train(cfg, trainer, resumed)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, trainer: Trainer, resumed: bool) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    run_dir, main = trainer.run_dir, trainer.dist.is_main
    metrics = run_dir / "metrics.jsonl"
    writer = None
    history = [r for r in read_metrics(metrics) if "reward_mean" in r] if resumed and main else []

    def log(row: dict) -> None:
        error = ""
        if main:
            try:
                write_metrics_line(metrics, row)
            except OSError as e:
                error = _disk_error(e, str(metrics), run_dir)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v == v:
                    writer.add_scalar(k, v, row["step"])
        _agree(trainer, error, RunStopped)

    try:
        if main:
            atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())
            writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=trainer.step + 1 if resumed else None)
        lines = _eval_lines(cfg) if cfg.eval.every else []
        if not resumed:
            if lines:
                log({**run_eval(trainer, lines, run_dir), "time_s": 0.0})
            _save(trainer)
        bar = _progress_bar(cfg, trainer, main)
        try:
            _loop(cfg, trainer, lines, log, history, writer, bar)
        finally:
            bar.close()
        final = run_dir / "final"
        if main:
            final = trainer.save_final()
            plot_curve(read_metrics(metrics), run_dir / "curve.png", title=f"{cfg.algorithm.name} on {cfg.prompts}")
    except OSError as e:  # the final model, the curve or the config could not be written
        raise RunStopped(_disk_error(e, e.filename or "the run folder", run_dir)) from None
    finally:
        if writer is not None:
            writer.close()
    trainer.dist.close()  # everyone waits for the main process's last writes, then leaves the process group
    return final


def _loop(cfg: TrainConfig, trainer: Trainer, lines: list[str], log, history: list[dict], writer, bar: tqdm) -> None:
    """The iterations, with evaluation, checkpoints, budgets and the divergence guards."""
    run_dir, main, g = trainer.run_dir, trainer.dist.is_main, cfg.guard
    saved_at, last_eval = trainer.step, None  # a resumed run starts from its newest checkpoint
    streak = 0  # iterations in a row with half or more of the rewards non-finite
    while trainer.step < cfg.iterations:
        t0 = time.perf_counter()
        try:
            row = trainer.iteration()
        except RunStopped as e:  # the weights diverged mid-update: nothing of this iteration is kept
            raise RunStopped(f"{e}, then continue with: tempflow train --resume {run_dir} --set optim.lr=... "
                             f"({_newest(run_dir)})") from None
        except TempflowError as e:  # the trainer is as it was after the last iteration: keep that work
            if trainer.step != saved_at:
                _save(trainer)
            raise TempflowError(f"{e} -- the run is saved at step {trainer.step}; after fixing this, continue "
                                f"with: tempflow train --resume {run_dir}") from None
        trainer.elapsed += trainer.dist.max(time.perf_counter() - t0)  # the slowest process: the same everywhere
        row["time_s"] = trainer.elapsed
        history.append(row)
        alerts = divergence_warnings(history, g.window, g.reward_drop, g.spike) if main else []
        if alerts:
            row["warnings"] = [a.kind for a in alerts]
        log(row)
        for a in alerts:
            bar.write(f"tempflow: warning: step {a.step}: {a.message}", file=sys.stderr)
            writer.add_text("warnings", a.message, a.step)
        if row["nonfinite_frac"] > 0 and main:
            bar.write(f"step {trainer.step}: {row['nonfinite_frac']:.0%} of groups had NaN/inf rewards; skipped")
        streak = streak + 1 if row["nonfinite_rewards"] >= 0.5 else 0
        out_of_time = bool(cfg.max_minutes and trainer.elapsed > cfg.max_minutes * 60) or bool(
            cfg.max_nfe and trainer.nfe_total >= cfg.max_nfe)
        done = trainer.step >= cfg.iterations or out_of_time
        if lines and (trainer.step % cfg.eval.every == 0 or done):
            ev = {**run_eval(trainer, lines, run_dir), "time_s": trainer.elapsed}
            log(ev)
            last_eval = ev["eval_overall"] if "eval_overall" in ev else ev["eval_reward"]
        if trainer.step % cfg.checkpoint_every == 0 or done or streak >= g.nonfinite_iterations:
            _save(trainer)
            saved_at = trainer.step
        if streak >= g.nonfinite_iterations:
            raise RunStopped(f"half or more of the rewards were NaN or infinite in {streak} iterations in a row "
                             f"(steps {trainer.step - streak + 1}-{trainer.step}): check the reward "
                             f"({cfg.reward!r}) and the images it gets; the run is saved at step {trainer.step}, "
                             f"continue with: tempflow train --resume {run_dir} (guard.nonfinite_iterations "
                             "sets how many such iterations stop a run)")
        bar.update(_progress(cfg, trainer)[0] - bar.n)
        bar.set_postfix(step=trainer.step, reward=f"{row['reward_mean']:.3f}",
                        **({"eval": f"{last_eval:.3f}"} if last_eval else {}))
        if out_of_time:
            if main:
                bar.write(f"budget (max_minutes / max_nfe) reached at step {trainer.step}; "
                          f"continue with --resume {run_dir} --set max_minutes=0 --set max_nfe=0")
            break


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



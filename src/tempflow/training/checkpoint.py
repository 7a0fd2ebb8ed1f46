"""Full-state checkpoints: tensors in safetensors, everything else in JSON; written atomically.

    RUN_DIR/checkpoints/step_000010/state.safetensors   weights, optimizer moments, EMA, RNG states
    RUN_DIR/checkpoints/step_000010/meta.json           step, sampler position, RNG states, config
    RUN_DIR/checkpoints/latest                          name of the newest complete checkpoint

A checkpoint folder is built under a temporary name and renamed into place, so a run killed at any
moment leaves either the previous checkpoint or the new one, never half of one; a write that fails
(a full disk) leaves nothing behind. A checkpoint with a NaN or infinite value is never written. Loading
never unpickles anything, and falls back to an older checkpoint when the newest is unreadable, holds
non-finite values or does not fit the run (a missing key, a tensor of the wrong shape).

RUN_DIR/.lock is held (flock) by the process that trains in the folder, so that a second one is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tempflow.errors import TempflowError
from tempflow.io import atomic_write_bytes
from tempflow.training.guard import first_non_finite

LOCK_FILE = ".lock"


class CheckpointError(TempflowError):
    """No usable checkpoint."""


def _dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep`. A tensor with a
    NaN or infinite value is refused (CheckpointError, nothing written); an OSError (a full disk) leaves
    no partial folder behind and the previous checkpoint the newest."""
    bad = first_non_finite(tensors.items())
    if bad is not None:
        raise CheckpointError(f"checkpoint step {step} not written: {bad!r} holds NaN or infinite values")
    root = _dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_bytes(root / "latest", name.encode())
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _candidates(root: Path) -> list[Path]:
    found = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        found = [named] + [p for p in found if p != named]
    return found


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    if not isinstance(meta, dict):
        raise ValueError("meta.json does not hold an object")
    int(meta["step"])
    bad = first_non_finite(tensors.items())
    if bad is not None:
        raise CheckpointError(f"{bad!r} holds NaN or infinite values")
    return tensors, meta


def _reason(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"missing key {e.args[0]!r}" if e.args else "a missing key"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return first[:300]


def newest_step(run_dir: str | Path) -> int | None:
    """The step of the checkpoint `latest` names, or None without one."""
    latest = _dir(run_dir) / "latest"
    try:
        return int(latest.read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):
        return None


def load_checkpoint(run_dir: str | Path, apply: Callable[[dict[str, torch.Tensor], dict], None] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(tensors, meta, warnings) of the newest usable checkpoint, falling back to older ones.

    A checkpoint is unusable when it cannot be read, holds NaN or infinite values, or `apply` (which
    loads it into the run) fails on it for any reason but a TempflowError that is not a CheckpointError
    (those say the run itself does not fit, for example another process count: they propagate). Every
    fallback is one line in `warnings`; when none is usable, one CheckpointError."""
    root = _dir(run_dir)
    if not root.is_dir() or not _candidates(root):
        raise CheckpointError(f"no checkpoint in {str(root)!r}; start a new run without --resume")
    warnings = []
    for path in _candidates(root):
        stage = "unreadable"
        try:
            tensors, meta = _read(path)
            stage = "not usable by this run"
            if apply is not None:
                apply(tensors, meta)
            return tensors, meta, warnings
        except Exception as e:  # corrupt, partial or wrong: say so and fall back to an older one
            if isinstance(e, TempflowError) and not isinstance(e, CheckpointError):
                raise
            warnings.append(f"checkpoint {path.name} is {stage} ({_reason(e)}); trying an older one")
    raise CheckpointError(f"no usable checkpoint in {str(root)!r}: {warnings[-1].split('; trying')[0]}; "
                          "start a new run with another --out")


class RunLock:
    """An exclusive lock on a run folder (flock on RUN_DIR/.lock, released by the kernel when the
    process dies); the file holds the owner's pid for the message a second process gets."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir, self._fd = Path(run_dir), -1
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no lock
            return
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TempflowError(f"{str(self.run_dir)} is in use by pid {owner}: wait for it to finish or stop it "
                                "before resuming") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary folders left by a run killed while writing a checkpoint."""
    for tmp in _dir(run_dir).glob(".tmp_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors plus JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": torch.as_tensor(v) for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def python_rng_from_json(data: list) -> tuple:
    return (data[0], tuple(data[1]), data[2])

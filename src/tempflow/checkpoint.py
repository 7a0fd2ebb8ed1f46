"""Full-state checkpoints: tensors in safetensors, everything else in JSON; written atomically.

    RUN_DIR/checkpoints/step_000010/state.safetensors   weights, optimizer moments, EMA, RNG states
    RUN_DIR/checkpoints/step_000010/meta.json           step, sampler position, RNG states, config
    RUN_DIR/checkpoints/latest                          name of the newest complete checkpoint

A checkpoint folder is built under a temporary name and renamed into place, so a run killed at any
moment leaves either the previous checkpoint or the new one, never half of one. Loading never
unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tempflow.errors import TempflowError
from tempflow.io import atomic_write_bytes


class CheckpointError(TempflowError):
    """No usable checkpoint."""


def _dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep`."""
    root = _dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
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


def load_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(tensors, meta, warnings) of the newest readable checkpoint; an older one if the newest is corrupt."""
    root = _dir(run_dir)
    if not root.is_dir() or not _candidates(root):
        raise CheckpointError(f"no checkpoint in {str(root)!r}; start a new run without --resume")
    warnings = []
    for path in _candidates(root):
        try:
            tensors = load_file(str(path / "state.safetensors"))
            meta = json.loads((path / "meta.json").read_text())
            int(meta["step"])
            return tensors, meta, warnings
        except Exception as e:  # corrupt or partial: say so and fall back to an older one
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.append(f"checkpoint {path.name} is unreadable ({first}); trying an older one")
    raise CheckpointError(f"every checkpoint in {str(root)!r} is corrupt: {warnings[-1]}")


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

"""What the benchmarks run: presets, named in a preset folder or given as YAML paths, and budgets.

A preset name (tempflow, say) is the file NAME.yaml in the preset folder; anything ending
in .yaml or .yml is a path. A folder's training presets are its YAML files that load as a training
config, less base.yaml, which only holds what a family's presets share. This module imports nothing
heavy: the command line takes its defaults and budgets from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tempflow.errors import ConfigError, TempflowError

if TYPE_CHECKING:
    from tempflow.training.config import TrainConfig

PRESET_DIR = "configs/shapes"  # the presets of the built-in shapes world
SHARED_PART = "base.yaml"  # in a preset folder: what its presets share, not a preset
BUDGET_UNITS = {"s": "seconds", "nfe": "nfe", "it": "iterations"}


@dataclass(frozen=True)
class Budget:
    """How long each benchmark run trains: seconds of training, model calls (nfe) or iterations."""

    amount: float
    unit: str  # seconds | nfe | iterations

    @staticmethod
    def parse(text: str) -> Budget:
        """'600s', '2e6nfe', '100it' -> Budget."""
        t = text.strip().lower()
        for suffix, unit in sorted(BUDGET_UNITS.items(), key=lambda kv: -len(kv[0])):
            if t.endswith(suffix):
                try:
                    amount = float(t[: -len(suffix)])
                except ValueError:
                    break
                if amount > 0 and math.isfinite(amount):
                    return Budget(amount, unit)
                break
        raise TempflowError(f"budget {text!r} must be a positive number with a unit: 600s, 2e6nfe or 100it")

    def overrides(self) -> list[str]:
        """Config overrides that make `tempflow train` stop at this budget."""
        if self.unit == "seconds":
            return [f"max_minutes={self.amount / 60}", "iterations=1000000"]
        if self.unit == "nfe":
            return [f"max_nfe={int(self.amount)}", "iterations=1000000"]
        return [f"iterations={int(self.amount)}"]

    def __str__(self) -> str:
        return f"{self.amount:g} {self.unit}"


def preset_path(name: str, preset_dir: str | Path = PRESET_DIR) -> Path:
    """The YAML file of a preset: NAME.yaml in `preset_dir`, or `name` itself when it is a YAML path."""
    from tempflow.config import find_preset

    if name.endswith((".yaml", ".yml")):
        return find_preset(name)
    return find_preset(Path(preset_dir) / f"{name}.yaml")


def load_preset(name: str, overrides: list[str], preset_dir: str | Path = PRESET_DIR) -> TrainConfig:
    """The training config of a preset (preset_path) with `overrides` (KEY=VALUE) applied."""
    from tempflow.config import load_config
    from tempflow.training.config import TrainConfig

    return load_config(TrainConfig, preset_path(name, preset_dir), overrides)


def training_presets(preset_dir: str | Path = PRESET_DIR) -> list[str]:
    """The names of the training presets in `preset_dir`, sorted: the presets a benchmark runs when it
    is given none. Files that do not load as a training config (a pretraining preset, say) are not."""
    folder = Path(preset_dir)
    if not folder.is_dir():
        raise ConfigError(f"--preset-dir {str(preset_dir)!r} is not a folder")
    names = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == SHARED_PART:
            continue
        try:
            load_preset(str(path), [])
        except TempflowError:
            continue
        names.append(path.stem)
    if not names:
        raise ConfigError(f"--preset-dir {str(preset_dir)!r} holds no training preset (NAME.yaml); pass "
                          "--presets with YAML paths, or another --preset-dir")
    return names


def expand_configs(text: str) -> list[str]:
    """Comma-separated preset names or paths; a glob is expanded (sorted), less the shared parts
    (base.yaml) that only hold what a family's presets share."""
    import glob

    out: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        if any(c in item for c in "*?["):
            matches = sorted(m for m in glob.glob(item) if Path(m).name != SHARED_PART)
            if not matches:
                raise ConfigError(f"--config {item!r} matches no config file")
            out += matches
        elif item:
            out.append(item)
    if not out:
        raise ConfigError("--config needs at least one preset name or YAML path")
    return out

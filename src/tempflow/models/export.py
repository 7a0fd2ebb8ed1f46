"""`tempflow export RUN_DIR --out DIR [--merged]`: the trained (EMA) model of a run, for diffusers users.

The source is RUN_DIR/final/, which the trainer writes at the end of a run with the EMA weights:

- with LoRA, ``final/lora/pytorch_lora_weights.safetensors`` holds the adapter in diffusers' format
  (the pipeline class's ``save_lora_weights``, peft's state dict, the LoraConfig as metadata);
  export copies it, and ``pipe.load_lora_weights(DIR)`` loads it into the base pipeline;
- ``--merged`` writes a whole model folder with the LoRA fused into the weights: for a diffusers
  run a pipeline folder (``save_pretrained``, loadable with ``DiffusionPipeline.from_pretrained``),
  for the shapes model its own model folder. A run without LoRA (full fine-tuning) can only be
  exported merged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tempflow.errors import TempflowError
from tempflow.models.lora import ADAPTER_FILE, LORA_DIR, LORA_FILE
from tempflow.training.guard import non_finite_in_files


def _final(run_dir: Path) -> Path:
    final = run_dir / "final"
    if not final.is_dir():
        hint = (f"continue it with: tempflow train --resume {run_dir}" if (run_dir / "checkpoints").is_dir()
                else "give the folder of a training run (tempflow train --out RUN_DIR)")
        raise TempflowError(f"{str(run_dir)!r} has no final/ model: the run has not finished; {hint}")
    return final


def _fresh(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise TempflowError(f"{str(out)!r} is not empty; give a new folder with --out")
    out.mkdir(parents=True, exist_ok=True)


def export_run(run_dir: str | Path, out: str | Path, merged: bool = False, device: str = "cpu") -> Path:
    """Export a run's final EMA model to `out`: its LoRA in diffusers' format, or (`merged`) a whole model
    folder with the LoRA fused in. `device` is where a merged diffusers model is fused (the CPU is enough)."""
    run_dir, out = Path(run_dir), Path(out)
    final = _final(run_dir)
    bad = non_finite_in_files(final)
    if bad is not None:  # written by hand or by an older version: a run's own final/ is checked when written
        raise TempflowError(f"{str(final)!r} holds NaN or infinite weights ({bad}); nothing exported")
    lora = final / LORA_DIR / LORA_FILE
    if not merged:
        if not lora.is_file():
            raise TempflowError(f"run {str(run_dir)!r} fine-tuned all weights (lora.enabled=false), so it has no "
                                "LoRA to export; export the whole model with --merged")
        _fresh(out)
        shutil.copy2(lora, out / LORA_FILE)
        return out
    if (final / ADAPTER_FILE).is_file():  # a diffusers LoRA run: base pipeline + adapter, fused here
        from tempflow.io import read_json
        from tempflow.models import ModelOptions, load_model

        options = read_json(final / ADAPTER_FILE).get("options", {})
        model = load_model(str(final), ModelOptions(**{**options, "device": device, "offload": False}))
        _fresh(out)
        model.save(out)
        return out
    _fresh(out)  # final/ already holds the whole model (shapes, or full fine-tuning): copy it
    shutil.copytree(final, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LORA_DIR))
    return out

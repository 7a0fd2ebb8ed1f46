"""LoRA for diffusers transformers: target selection and saving in diffusers' LoRA format."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tempflow.errors import TempflowError
from tempflow.training.guard import first_non_finite

# lora.init: how the adapters' A matrices start (B starts at zero either way, so the adapted model
# starts as the base): peft's default (Kaiming-uniform A) or "gaussian" (A ~ N(0, 1/rank^2)), the
# initialisation of Flow-GRPO's and TempFlow-GRPO's training scripts
LORA_INITS = ("default", "gaussian")


def peft_init_weights(init: str) -> bool | str:
    """peft's ``init_lora_weights`` value for a lora.init name."""
    if init not in LORA_INITS:
        raise ValueError(f"LoRA init must be one of {', '.join(LORA_INITS)}, got {init!r}")
    return True if init == "default" else init


def lora_target_names(transformer: nn.Module, suffixes: list[str]) -> list[str]:
    """Full names of the modules whose name ends with one of `suffixes`, less the dead ones.

    In a joint-attention block with ``context_pre_only`` (the last block of SD3 / SD3.5) the text
    tokens' outputs are dropped, so the text query projection ``add_q_proj`` receives no gradient:
    an adapter there would never train, and is left out.
    """
    dead: set[str] = set()
    for name, module in transformer.named_modules():
        if getattr(module, "context_pre_only", False) and hasattr(module, "attn"):
            dead.add(f"{name}.attn.add_q_proj")
    names = []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes):
            if name not in dead:
                names.append(name)
    return names


LORA_DIR = "lora"  # a run's final/lora/: the trained adapter in diffusers' format
LORA_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
ADAPTER_FILE = "tempflow_adapter.json"  # final/ of a diffusers LoRA run: base model, its options, LoRA settings


def save_transformer_lora(transformer: nn.Module, path: str | Path, loader: type) -> Path:
    """Write the peft adapter of a diffusers transformer as `path/pytorch_lora_weights.safetensors`.

    `loader` is the pipeline class (or its LoRA loader mixin) whose ``save_lora_weights`` defines the
    format: keys ``transformer.<module>.lora_A.weight``, plus the adapter's LoraConfig (rank, alpha,
    targets) as metadata, so that ``pipe.load_lora_weights(path)`` rebuilds the same scaling.
    """
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    state = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
    bad = first_non_finite(state.items())
    if bad is not None:
        raise TempflowError(f"LoRA not written to {str(path)!r}: weight {bad!r} holds NaN or infinite values")
    path.mkdir(parents=True, exist_ok=True)
    metadata = transformer.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    loader.save_lora_weights(path, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata,
                             weight_name=LORA_FILE)
    return path / LORA_FILE

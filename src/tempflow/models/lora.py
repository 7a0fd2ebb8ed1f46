"""LoRA target selection for diffusers transformers."""

from __future__ import annotations

from torch import nn


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

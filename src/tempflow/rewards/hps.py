"""HPSv2 / HPSv2.1 without open_clip: its open_clip ViT-H-14 weights converted into a transformers CLIPModel.

HPS checkpoints are open_clip state dicts (``visual.*`` for the image tower, the text tower at top
level, fused ``attn.in_proj_*`` attention weights, ``(in, out)`` projection matrices).
``convert_open_clip_state_dict`` renames and reshapes them into ``CLIPModel`` parameters; the
architecture (widths, depths, heads, GELU) comes from a ``CLIPConfig``, by default the one of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the model HPS was fine-tuned from. The score is HPS's:
the cosine of the image and prompt embeddings (about 0.2 to 0.35).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tempflow.errors import TempflowError
from tempflow.rewards.clip import LAION_VIT_H14, load_clip
from tempflow.rewards.loading import (
    build_with_weights,
    check_images,
    load_pretrained,
    load_state_dict_file,
    require,
    resolve_device,
    resolve_dtype,
    resolve_file,
)
from tempflow.rewards.spec import RewardFn

HPS_REPO = "xswu/HPSv2"
HPS_FILE = "HPS_v2.1_compressed.pt"  # HPSv2.1; "HPS_v2_compressed.pt" is HPSv2.0

_TOP = {  # open_clip name -> CLIPModel name (tensors kept as they are)
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_BLOCK = {  # per residual block, open_clip suffix -> CLIPModel suffix
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_IGNORED = {"attn_mask"}  # the causal mask, a buffer that some open_clip versions saved


def _block_tensors(tower: str, layer: str, rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"{tower}.encoder.layers.{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):  # fused q, k, v stacked along dim 0
        kind = rest.rsplit("_", 1)[1]
        return {f"{prefix}self_attn.{p}_proj.{kind}": t.clone() for p, t in zip("qkv", value.chunk(3, dim=0))}
    module, _, param = rest.rpartition(".")
    if module not in _BLOCK:
        raise KeyError(rest)
    return {f"{prefix}{_BLOCK[module]}.{param}": value}


def convert_open_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict (ViT image tower, built-in text tower) -> transformers CLIPModel state dict."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        block = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()  # open_clip: x @ proj, transformers: Linear
        elif block:
            tower = "vision_model" if block.group(1) else "text_model"
            try:
                out.update(_block_tensors(tower, block.group(2), block.group(3), value))
            except KeyError:
                unknown.append(key)
        elif key not in _IGNORED:
            unknown.append(key)
    if unknown:
        raise TempflowError(f"not an open_clip ViT CLIP state dict: {len(unknown)} unknown tensors "
                            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
    return out


def clip_from_open_clip(sd: dict[str, torch.Tensor], config: Any, reward: str = "hpsv2") -> Any:
    """A transformers CLIPModel (architecture ``config``, a CLIPConfig) holding open_clip weights ``sd``."""
    tf = require("transformers", reward)
    converted = convert_open_clip_state_dict(sd)
    return build_with_weights(lambda: tf.CLIPModel(config), converted, reward).eval()


def make_hpsv2(model: str = HPS_REPO, filename: str = HPS_FILE, processor: str = LAION_VIT_H14,
               config: str | None = None, device: str | None = None, dtype: str = "float32",
               batch_size: int = 32) -> RewardFn:
    """HPSv2 (Wu et al., 2023): cosine of the image and prompt embeddings of the HPS-tuned ViT-H-14.

    ``model``: an open_clip checkpoint (.pt as published, read without unpickling code, or
    .safetensors), a folder or hub repo holding ``filename``, or a folder with an already converted
    transformers CLIPModel (``config.json`` + weights). ``processor``: tokenizer and image
    preprocessing; ``config``: where the CLIPConfig is read (default: ``processor``).
    """
    tf = require("transformers", "hpsv2")
    resolve_device(device)  # bad values fail before any loading
    resolve_dtype(dtype)
    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        clip = load_pretrained(lambda: tf.CLIPModel.from_pretrained(str(folder)), "CLIP model", model, "hpsv2")
    else:
        weights = load_state_dict_file(resolve_file(model, filename, "hpsv2"), "hpsv2")
        source = config or processor
        cfg = load_pretrained(lambda: tf.CLIPConfig.from_pretrained(source), "CLIP config", source, "hpsv2")
        clip = clip_from_open_clip(weights, cfg)
    enc = load_clip(clip, processor, "hpsv2", device, dtype, batch_size)

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        check_images(images, prompts, "hpsv2")
        return enc.cosine(images, prompts)

    return reward

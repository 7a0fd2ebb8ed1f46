"""ImageReward (Xu et al., 2023) from transformers' BLIP building blocks, loading the published checkpoint.

Architecture: a BLIP ViT (``BlipVisionModel``) encodes the image; a BERT text encoder whose layers
cross-attend to the image tokens (``BlipTextModel``, run bidirectionally) encodes the prompt; the
MLP head (``tempflow.rewards.mlp``) maps its first token to a score, standardised with the mean and
std ImageReward publishes. ``convert_imagereward_state_dict`` renames the checkpoint's timm-style
ViT tensors (``blip.visual_encoder.*``); the text encoder's names already match. The widths, depths
and patch size are read from the weights; heads default to width / 64 (BLIP's ViT-L and BERT-base).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from tempflow.errors import TempflowError
from tempflow.rewards.loading import (
    batched,
    build_with_weights,
    check_images,
    load_pretrained,
    load_state_dict_file,
    require,
    resolve_device,
    resolve_dtype,
    resolve_file,
)
from tempflow.rewards.mlp import RewardMLP
from tempflow.rewards.preprocess import ImageTransform
from tempflow.rewards.spec import RewardFn

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
BERT_TOKENIZER = "bert-base-uncased"
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's published standardisation

_VISION = {  # timm ViT name -> BlipVisionModel name
    "cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _vision_key(key: str) -> str | None:
    if key in _VISION:
        return _VISION[key]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m.group(2) in _VISION_BLOCK:
        return f"encoder.layers.{m.group(1)}.{_VISION_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def convert_imagereward_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward checkpoint -> state dict of ``ImageRewardModel`` (``vision.*``, ``text.*``, ``mlp.*``).

    Parts of BLIP that the score does not use (projections, ITM head, decoder) are dropped.
    """
    out, unknown = {}, []
    for key, value in sd.items():
        if key.startswith("blip.visual_encoder."):
            new = _vision_key(key.removeprefix("blip.visual_encoder."))
            if new is None:
                unknown.append(key)
            else:
                out[f"vision.{new}"] = value
        elif key.startswith("blip.text_encoder."):
            rest = key.removeprefix("blip.text_encoder.")
            if rest != "embeddings.position_ids" and not rest.startswith("pooler."):
                out[f"text.{rest}"] = value
        elif key.startswith("mlp."):
            out[key] = value
    if unknown:
        raise TempflowError(f"not an ImageReward checkpoint: {len(unknown)} unknown vision tensors "
                            f"({', '.join(unknown[:3])})")
    return out


def _configs(sd: dict[str, torch.Tensor], vision_heads: int | None, text_heads: int | None, tf: Any) -> tuple:
    """BlipVisionConfig and BlipTextConfig read from the converted tensors."""
    def count(prefix: str) -> int:
        return len({k.split(".")[3] for k in sd if k.startswith(prefix)})

    try:
        width = sd["vision.embeddings.class_embedding"].shape[-1]
        patch = sd["vision.embeddings.patch_embedding.weight"].shape[-1]
        tokens = sd["vision.embeddings.position_embedding"].shape[1] - 1
        words, hidden = sd["text.embeddings.word_embeddings.weight"].shape
        vision = tf.BlipVisionConfig(
            hidden_size=width, intermediate_size=sd["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=count("vision.encoder.layers."), num_attention_heads=vision_heads or width // 64,
            image_size=patch * math.isqrt(tokens), patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
        text = tf.BlipTextConfig(
            vocab_size=words, hidden_size=hidden, num_hidden_layers=count("text.encoder.layer."),
            num_attention_heads=text_heads or hidden // 64,
            intermediate_size=sd["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
            encoder_hidden_size=sd["text.encoder.layer.0.crossattention.self.key.weight"].shape[1],
            max_position_embeddings=sd["text.embeddings.position_embeddings.weight"].shape[0],
            layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True, pad_token_id=0,
            bos_token_id=None, eos_token_id=None, sep_token_id=None)
    except KeyError as e:
        raise TempflowError(f"not an ImageReward checkpoint: no tensor {e.args[0]!r}") from None
    return vision, text


class ImageRewardModel(nn.Module):
    """(pixel_values (B, 3, S, S), input_ids (B, L), attention_mask (B, L)) -> (B,) standardised reward."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        tf = require("transformers", "imagereward")
        self.vision = tf.BlipVisionModel(vision_config)
        self.text = tf.BlipTextModel(text_config, add_pooling_layer=False)  # cross-attention layers: is_decoder
        self.mlp = RewardMLP(text_config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, Dv)
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=image_mask).last_hidden_state  # (B, L, D), bidirectional
        return (self.mlp(text[:, 0]).float() - SCORE_MEAN) / SCORE_STD


def load_imagereward_model(sd: dict[str, torch.Tensor], vision_heads: int | None = None,
                           text_heads: int | None = None) -> ImageRewardModel:
    """An ImageRewardModel holding a published ImageReward checkpoint's tensors."""
    tf = require("transformers", "imagereward")
    converted = convert_imagereward_state_dict(sd)
    vision, text = _configs(converted, vision_heads, text_heads, tf)
    return build_with_weights(lambda: ImageRewardModel(vision, text), converted, "imagereward").eval()


def make_imagereward(model: str = IMAGEREWARD_REPO, filename: str = IMAGEREWARD_FILE, tokenizer: str = BERT_TOKENIZER,
                     vision_heads: int | None = None, text_heads: int | None = None, max_length: int = 35,
                     device: str | None = None, dtype: str = "float32", batch_size: int = 32) -> RewardFn:
    """ImageReward: the human-preference score of an image for its prompt (about -2 to 2, mean 0 on its data).

    ``model``: ``ImageReward.pt`` as published (read without unpickling code) or a .safetensors
    with the same keys, or a folder or hub repo holding ``filename``. ``tokenizer``: BERT's
    (bert-base-uncased); prompts are cut or padded to ``max_length`` tokens as ImageReward does.
    Images are resized and cropped to the ViT's input size and normalised with CLIP's mean and std.
    """
    tf = require("transformers", "imagereward")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    sd = load_state_dict_file(resolve_file(model, filename, "imagereward"), "imagereward")
    net = load_imagereward_model(sd, vision_heads, text_heads).to(device=dev, dtype=dt).requires_grad_(False)
    tok = load_pretrained(lambda: tf.AutoTokenizer.from_pretrained(tokenizer), "tokenizer", tokenizer, "imagereward")
    size = net.vision.config.image_size
    transform = ImageTransform(shortest_edge=size, crop=(size, size))

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        check_images(images, prompts, "imagereward")

        def run(rows: slice) -> torch.Tensor:
            t = tok(prompts[rows], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
            x = transform(images[rows].to(dev)).to(dt)  # (b, 3, S, S)
            return net(x, t["input_ids"].to(dev), t["attention_mask"].to(dev)).cpu()

        return batched(run, images.shape[0], batch_size)

    return reward

"""CLIP-family rewards on transformers' ``CLIPModel``: ``pickscore``, ``clipscore``, ``aesthetic``.

Each factory takes ``model=`` (a local folder or a hub id of a CLIPModel) and ``processor=`` (a
folder or hub id with the tokenizer and ``preprocessor_config.json``; default: the model's own).
Images are preprocessed by ``tempflow.rewards.preprocess`` on tensors, prompts are tokenised to
the text tower's full context (so a prompt's embedding does not depend on its batch), and each
distinct prompt of a call is encoded once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tempflow.errors import TempflowError
from tempflow.rewards.loading import (
    batched,
    check_images,
    load_pretrained,
    load_state_dict_file,
    require,
    resolve_device,
    resolve_dtype,
    resolve_file,
)
from tempflow.rewards.mlp import load_mlp
from tempflow.rewards.preprocess import ImageTransform, load_transform
from tempflow.rewards.spec import RewardFn

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
LAION_VIT_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's and HPSv2's processor
CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"  # the LAION improved-aesthetic-predictor head


class ClipEncoder:
    """A CLIPModel with its tokenizer and tensor preprocessing: unit-norm image and text embeddings."""

    def __init__(self, model: Any, tokenizer: Any, transform: ImageTransform, device: torch.device,
                 dtype: torch.dtype, batch_size: int = 32) -> None:
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer, self.transform = tokenizer, transform
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.max_length = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) float32 unit vectors."""

        def run(rows: slice) -> torch.Tensor:
            x = self.transform(images[rows].to(self.device)).to(self.dtype)  # (b, 3, h, w)
            pooled = self.model.vision_model(pixel_values=x).pooler_output
            return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

        return batched(run, images.shape[0], self.batch_size)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> (B, D) float32 unit vectors; each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))

        def run(rows: slice) -> torch.Tensor:
            tok = self.tokenizer(unique[rows], padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device)).pooler_output
            return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

        emb = batched(run, len(unique), self.batch_size)  # (U, D)
        index = {p: i for i, p in enumerate(unique)}
        return emb[[index[p] for p in prompts]]

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) float32 cosine similarity of each image with its prompt, on the CPU."""
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(-1).cpu()


def load_clip(model: str | Any, processor: str, reward: str, device: str | None, dtype: str | torch.dtype,
              batch_size: int) -> ClipEncoder:
    """A ClipEncoder from a CLIPModel (or its folder / hub id) and a processor folder / hub id."""
    tf = require("transformers", reward)
    dev, dt = resolve_device(device), resolve_dtype(dtype)  # bad values fail before any loading
    if isinstance(model, str):
        source = model
        model = load_pretrained(lambda: tf.CLIPModel.from_pretrained(source), "CLIP model", source, reward)
    tokenizer = load_pretrained(lambda: tf.AutoTokenizer.from_pretrained(processor), "tokenizer", processor, reward)
    return ClipEncoder(model, tokenizer, load_transform(processor, reward), dev, dt, batch_size)


def make_pickscore(model: str = PICKSCORE_MODEL, processor: str = LAION_VIT_H14, scale: float | None = None,
                   device: str | None = None, dtype: str = "float32", batch_size: int = 32) -> RewardFn:
    """PickScore: ``scale * cosine(image, prompt)``.

    ``scale=None`` uses the model's ``exp(logit_scale)`` as PickScore's own scoring code does; that
    is 100 for PickScore_v1, so scores are about 100 * cosine (roughly 18 to 23 on typical images).
    """
    enc = load_clip(model, processor, "pickscore", device, dtype, batch_size)
    factor = float(enc.model.logit_scale.float().exp()) if scale is None else float(scale)

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        check_images(images, prompts, "pickscore")
        return factor * enc.cosine(images, prompts)

    return reward


def make_clipscore(model: str = CLIP_VIT_L14, processor: str | None = None, scale: float = 2.5,
                   device: str | None = None, dtype: str = "float32", batch_size: int = 32) -> RewardFn:
    """CLIP-S (Hessel et al., 2021): ``scale * max(cosine(image, prompt), 0)``, scale 2.5 as in the paper."""
    enc = load_clip(model, processor or model, "clipscore", device, dtype, batch_size)

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        check_images(images, prompts, "clipscore")
        return scale * enc.cosine(images, prompts).clamp(min=0)

    return reward


def make_aesthetic(weights: str | None = None, model: str = CLIP_VIT_L14, processor: str | None = None,
                   device: str | None = None, dtype: str = "float32", batch_size: int = 32) -> RewardFn:
    """LAION improved aesthetic predictor: its MLP on the unit-norm CLIP ViT-L/14 image embedding (about 1 to 10).

    ``weights``: the MLP head, ``sac+logos+ava1-l14-linearMSE.pth`` as published (a plain state
    dict, loaded without unpickling code) or a .safetensors with the same keys, or a folder or hub
    repo holding that .pth. The prompt is not used.
    """
    if weights is None:
        raise TempflowError(f"reward 'aesthetic' needs weights=PATH to the aesthetic predictor's MLP ({AESTHETIC_FILE} "
                            "or a .safetensors with the same keys)")
    enc = load_clip(model, processor or model, "aesthetic", device, dtype, batch_size)
    mlp = load_mlp(load_state_dict_file(resolve_file(weights, AESTHETIC_FILE, "aesthetic"), "aesthetic"), "aesthetic")
    mlp = mlp.to(enc.device).requires_grad_(False)
    width = enc.model.config.projection_dim
    if mlp.layers[0].in_features != width:
        raise TempflowError(f"reward 'aesthetic': the MLP takes {mlp.layers[0].in_features}-dim embeddings but the "
                            f"CLIP model {model!r} gives {width}-dim ones; use CLIP ViT-L/14 ({CLIP_VIT_L14})")

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        check_images(images, prompts, "aesthetic")
        return mlp(enc.embed_images(images)).float().cpu()

    return reward

"""A model's sizes at a training config's settings, for the memory estimate (estimate).

The transformer, the VAE and the text encoders are built on the meta device from their
configurations (the published ones in `tempflow.bench.published_configs`, or a local diffusers
pipeline folder's): every parameter count and shape, and no memory and no download.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tempflow.bench.published_configs import PUBLISHED
from tempflow.errors import ConfigError
from tempflow.training.config import TrainConfig

FLOAT = 4  # float32 bytes: latents, log-probabilities, images, trained weights, AdamW, EMA


def pipeline_spec(model: str) -> dict[str, Any]:
    """{"_class_name", component: (library, class, config)} of a published model (hub id) or a local
    diffusers pipeline folder."""
    if model in PUBLISHED:
        return PUBLISHED[model]
    path = Path(model)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(f"the memory estimate has no configuration of model {model!r}: it knows "
                          f"{', '.join(PUBLISHED)} and local diffusers pipeline folders")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    if index.get("_class_name") not in ("StableDiffusion3Pipeline", "FluxPipeline"):
        raise ConfigError(f"the memory estimate covers SD3 and FLUX pipelines; {model!r} is a "
                          f"{index.get('_class_name')}")
    spec: dict[str, Any] = {"_class_name": index["_class_name"]}
    for name, value in index.items():
        if (name in ("transformer", "vae") or name.startswith("text_encoder")) and isinstance(value, list) \
                and value[1] is not None:
            config = json.loads((path / name / "config.json").read_text(encoding="utf-8"))
            spec[name] = (value[0], value[1], config)
    return spec


def build_on_meta(library: str, class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """A diffusers or transformers module from its config, every tensor on the meta device (no memory)."""
    import diffusers
    import transformers

    with torch.device("meta"):
        if library == "diffusers":
            return getattr(diffusers, class_name).from_config(config)
        cls = getattr(transformers, class_name)
        return cls(cls.config_class.from_dict(config))


def module_bytes(module: torch.nn.Module, dtype_bytes: int) -> int:
    """Bytes of a module's parameters and buffers cast to a floating dtype of `dtype_bytes`."""
    total = sum(p.numel() * dtype_bytes for p in module.parameters())
    return total + sum(b.numel() * (dtype_bytes if b.is_floating_point() else b.element_size())
                       for b in module.buffers())


def lora_size(transformer: torch.nn.Module, targets: list[str], rank: int) -> tuple[int, int]:
    """(modules, parameters) of rank-`rank` LoRA on the transformer's `targets` (module-name suffixes)."""
    from tempflow.models.lora import lora_target_names

    names = lora_target_names(transformer, targets)
    modules = dict(transformer.named_modules())
    return len(names), sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)


def vae_peak_elements(vae_config: dict[str, Any], latent_side: int) -> int:
    """Elements of the VAE decoder's largest activation for one image: an up block's channels at its
    upsampled resolution (each block but the last doubles the side)."""
    channels = list(reversed(vae_config["block_out_channels"]))
    return max(ch * (latent_side * 2 ** min(i + 1, len(channels) - 1)) ** 2 for i, ch in enumerate(channels))


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs of a model at a config's settings."""

    family: str  # "sd3" or "flux"
    weights: dict[str, int]  # bytes of transformer, each text encoder and the VAE (parameters and buffers)
    weight_bytes: int  # bytes of one frozen transformer weight
    params: dict[str, int]  # their parameter counts
    trained_params: int  # LoRA's parameters, or the transformer's with full fine-tuning
    lora_modules: int  # adapted modules (0 with full fine-tuning)
    latent: tuple[int, int, int]  # (C, h, w) of one sample
    image: tuple[int, int, int]  # (3, H, W) of one image
    text_tokens: int  # tokens of one conditioning row
    cond_row_bytes: int  # one prompt's conditioning (tokens and pooled), in the text encoders' dtype
    image_tokens: int  # the transformer's image sequence
    hidden: int  # the transformer's width
    blocks: int  # transformer blocks (each checkpointed)
    act_bytes: int  # bytes of one activation
    vae_act_bytes: int  # bytes of one VAE activation
    cfg_batch: bool  # classifier-free guidance doubles the batch (SD3); FLUX takes guidance as an input
    decode_batch: int  # images per VAE call
    vae_peak: int  # elements of the decoder's largest activation per image

    @property
    def latent_bytes(self) -> int:
        return FLOAT * math.prod(self.latent)

    @property
    def image_bytes(self) -> int:
        return FLOAT * math.prod(self.image)

    def forwards_per_row(self, guidance: float) -> int:
        """Transformer rows per velocity row (Policy.forwards_per_row)."""
        return 1 if guidance == 1.0 or not self.cfg_batch else 2


def _model_class(family: str) -> Any:
    if family == "sd3":
        from tempflow.models.sd3 import SD3FlowModel

        return SD3FlowModel
    from tempflow.models.flux import FluxFlowModel

    return FluxFlowModel


_SIZES: dict[tuple, ModelSizes] = {}


def model_sizes(cfg: TrainConfig) -> ModelSizes:
    """The sizes of cfg.model at cfg.model_options and cfg.lora, built on the meta device (cached)."""
    o, lora = cfg.model_options, cfg.lora
    key = (cfg.model, o.dtype, o.device, o.resolution, o.max_sequence_length, cfg.optim.mixed_precision,
           lora.enabled, lora.rank, tuple(lora.targets))
    if key not in _SIZES:
        _SIZES[key] = _model_sizes(cfg)
    return _SIZES[key]


def _model_sizes(cfg: TrainConfig) -> ModelSizes:
    from tempflow.algorithms.rollout import decode_batch
    from tempflow.models.pipeline import vae_dtype

    spec = pipeline_spec(cfg.model)
    family = "sd3" if spec["_class_name"] == "StableDiffusion3Pipeline" else "flux"
    cls, o = _model_class(family), cfg.model_options
    dtype = o.torch_dtype(cls.gpu_dtype)
    wb, vb = torch.finfo(dtype).bits // 8, torch.finfo(vae_dtype(dtype)).bits // 8
    modules = {name: build_on_meta(*spec[name]) for name in spec if name != "_class_name"}
    weights = {name: module_bytes(m, vb if name == "vae" else wb) for name, m in modules.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    t_cfg, vae_cfg = spec["transformer"][2], spec["vae"][2]
    if cfg.lora.enabled:
        lora_modules, trained = lora_size(modules["transformer"], list(cfg.lora.targets) or
                                          list(cls.default_lora_targets), cfg.lora.rank)
    else:
        lora_modules, trained = 0, params["transformer"]
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    side = (o.resolution or t_cfg.get("sample_size", 128) * scale) // scale
    t5_tokens = o.max_sequence_length or cls.default_max_sequence_length
    t5 = next(c for lib, name, c in (spec[k] for k in spec if k.startswith("text_encoder")) if name == "T5EncoderModel")
    if family == "sd3":
        latent = (t_cfg["in_channels"], side, side)
        image_tokens = (side // t_cfg["patch_size"]) ** 2
        text_tokens = spec["text_encoder"][2]["max_position_embeddings"] + t5_tokens
        blocks = t_cfg["num_layers"]
    else:
        latent = (t_cfg["in_channels"] // 4, side, side)
        image_tokens = (side // 2) ** 2
        text_tokens = t5_tokens
        blocks = t_cfg["num_layers"] + t_cfg["num_single_layers"]
    row = (text_tokens * t5["d_model"] + t_cfg["pooled_projection_dim"]) * wb
    half = wb == 2 or cfg.optim.mixed_precision in ("bf16", "fp16") or (
        cfg.optim.mixed_precision == "auto" and o.torch_device().type == "cuda")
    return ModelSizes(
        family=family, weights=weights, weight_bytes=wb, params=params, trained_params=trained,
        lora_modules=lora_modules,
        latent=latent, image=(3, side * scale, side * scale), text_tokens=text_tokens, cond_row_bytes=row,
        image_tokens=image_tokens, hidden=t_cfg["num_attention_heads"] * t_cfg["attention_head_dim"], blocks=blocks,
        act_bytes=2 if half else 4, vae_act_bytes=vb, cfg_batch=family == "sd3", decode_batch=decode_batch(cls),
        vae_peak=vae_peak_elements(vae_cfg, side))

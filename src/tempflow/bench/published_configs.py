"""The published component configurations of the real models, for sizes without their weights.

Each dict is the shape-determining part of a component's ``config.json`` in the model's Hugging Face
repository (``<repo>/<component>/config.json``): stabilityai/stable-diffusion-3.5-medium,
stabilityai/stable-diffusion-3.5-large and black-forest-labs/FLUX.1-dev. Keys that do not change a
tensor's shape (dropout, initialisation, token ids) are left out. The repositories are gated, so the
values were taken from public copies of those files; `tempflow.bench.estimate` builds every component from
them on the meta device, which gives, for instance, 2,243,171,520 transformer parameters for
SD3.5-Medium and 11,901,408,320 for FLUX.1-dev.
"""

from __future__ import annotations

from typing import Any

# transformers configs of the text encoders shared by the families
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "projection_dim": 768, "vocab_size": 49408, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "max_position_embeddings": 77, "projection_dim": 1280, "vocab_size": 49408, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128}


def _vae(scaling: float, shift: float) -> dict[str, Any]:
    """The 16-channel AutoencoderKL of SD3.5 and FLUX.1 (the same shapes, their own latent scaling)."""
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "act_fn": "silu",
            "sample_size": 1024, "scaling_factor": scaling, "shift_factor": shift, "use_quant_conv": False,
            "use_post_quant_conv": False}


SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm"}
SD35_LARGE_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
    "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": "rms_norm"}
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56]}


def _sd35(transformer: dict[str, Any]) -> dict[str, Any]:
    return {"_class_name": "StableDiffusion3Pipeline",
            "transformer": ("diffusers", "SD3Transformer2DModel", transformer),
            "vae": ("diffusers", "AutoencoderKL", _vae(1.5305, 0.0609)),
            "text_encoder": ("transformers", "CLIPTextModelWithProjection", CLIP_L),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G),
            "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL)}


# hub id -> pipeline class and (library, class, config) of each component
PUBLISHED: dict[str, dict[str, Any]] = {
    "stabilityai/stable-diffusion-3.5-medium": _sd35(SD35_MEDIUM_TRANSFORMER),
    "stabilityai/stable-diffusion-3.5-large": _sd35(SD35_LARGE_TRANSFORMER),
    "black-forest-labs/FLUX.1-dev": {
        "_class_name": "FluxPipeline",
        "transformer": ("diffusers", "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER),
        "vae": ("diffusers", "AutoencoderKL", _vae(0.3611, 0.1159)),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL)},
}

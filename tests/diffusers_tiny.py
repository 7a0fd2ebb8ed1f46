"""Tiny, randomly initialised SD3 and FLUX pipelines built offline (no download), for adapter tests.

Real checkpoints and these folders go through the same ``from_pretrained`` code path: the folders
hold the same components (transformer, VAE, scheduler, CLIP and T5 text encoders and tokenizers),
only small. Tokenizers are built with the ``tokenizers`` library: a byte-level BPE with CLIP's
special tokens and a Unigram model with T5's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

WORDS = ["a", "red", "blue", "green", "cat", "dog", "photo", "of", "on", "the", "square", "circle", "two"]
CLIP_TOKENS = 32  # CLIP context length (77 in the real models)
T5_TOKENS = 16  # T5 tokens per prompt (256 for SD3, 512 for FLUX in the real pipelines)
TEXT_DIM = 32  # T5 width = the transformers' joint_attention_dim
RES = 32  # image side in pixels
PROMPTS = ["a red cat", "a photo of a blue dog", "two green squares", "a circle on the square"]


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with CLIP's conventions (end-of-text is the largest id and the padding)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_TOKENS)


def t5_tokenizer() -> T5TokenizerFast:
    """A Unigram tokenizer with T5's special tokens (<pad> 0, </s> 1, <unk> 2) and a few words."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def clip_config(hidden: int, projection: int) -> CLIPTextConfig:
    tok = clip_tokenizer()
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=CLIP_TOKENS, projection_dim=projection,
                          hidden_act="gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)


def t5_encoder() -> T5EncoderModel:
    tok_size = 3 + 1 + len(WORDS) + 26
    return T5EncoderModel(T5Config(vocab_size=tok_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, dense_act_fn="gelu_new", is_gated_act=True,
                                   feed_forward_proj="gated-gelu"))


def vae(latent_channels: int, shift: float, scale: float) -> AutoencoderKL:
    """Two blocks: 32 px images <-> 16x16 latents (vae scale factor 2)."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=RES,
                         shift_factor=shift, scaling_factor=scale)


def build_sd3(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline folder: SD3 transformer (2 blocks, the last context_pre_only), two CLIP text
    encoders with projection, a T5 encoder, a static-shift scheduler."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=RES // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=24,
        pos_embed_max_size=RES)  # up to 128 px
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(4, shift=0.1, scale=0.7),
        text_encoder=CLIPTextModelWithProjection(clip_config(16, 12)).eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(16, 12)).eval(), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder().eval(), tokenizer_3=t5_tokenizer(),
    )
    pipe.save_pretrained(folder)
    return folder


def build_flux(folder: Path, seed: int = 0) -> Path:
    """A FluxPipeline folder: FLUX transformer (1 double + 1 single block, guidance embedding), a CLIP text
    encoder (pooled), a T5 encoder, a dynamic-shift scheduler."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae(4, shift=0.1159, scale=0.3611),
        text_encoder=CLIPTextModel(clip_config(16, 16)).eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder().eval(), tokenizer_2=t5_tokenizer(),
    )
    pipe.save_pretrained(folder)
    return folder

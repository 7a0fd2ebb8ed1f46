"""Tiny, randomly initialised stand-ins of the reward models' files, built offline, and checks of them.

Other reward tests import the builders from here.
"""

from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

try:  # the Pillow-backed processor (the default one needs torchvision)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ClipImageProcessor
except ImportError:  # older transformers
    from transformers import CLIPImageProcessor as ClipImageProcessor

WORDS = ["a", "red", "cat", "dog", "photo", "of", "blue", "square", "on", "the"]
CLIP_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE tokenizer with CLIP's conventions; its end-of-text token has the largest id."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in CLIP_MERGES]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=CLIP_MERGES)


def clip_config(act: str = "quick_gelu", image_size: int = 32, context: int = 16) -> CLIPConfig:
    tok = clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=context, hidden_act=act, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, hidden_act=act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def image_processor(size: int = 32, crop: int = 32, **kw) -> ClipImageProcessor:
    return ClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop}, **kw)


def save_processor(path: Path, size: int = 32, crop: int = 32, **kw) -> Path:
    """Tokenizer + image preprocessing config, as a CLIPProcessor folder."""
    CLIPProcessor(image_processor=image_processor(size, crop, **kw), tokenizer=clip_tokenizer()).save_pretrained(path)
    return path


def save_clip(path: Path, act: str = "quick_gelu") -> tuple[Path, CLIPModel]:
    """A tiny CLIPModel folder with its processor files."""
    model = CLIPModel(clip_config(act)).eval()
    model.save_pretrained(path)
    save_processor(path)
    return path, model


def bert_tokenizer(path: Path) -> Path:
    """A tiny WordPiece tokenizer (BERT's special tokens, a few words) saved to ``path``."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + ["##s", "."])}
    BertTokenizer(vocab=vocab).save_pretrained(path)
    return path


def uint8_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) float images on the uint8 grid (k / 255), smooth gradients plus noise."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, h).view(1, 1, h, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, 1, w)
    base = torch.rand(n, 3, 1, 1, generator=g) * ys + torch.rand(n, 3, 1, 1, generator=g) * xs
    x = (base / 2 + 0.25 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)
    return (x * 255).round() / 255


def test_clip_tokenizer_pads_after_end_of_text():
    tok = clip_tokenizer()
    ids = tok(["a cat", "a red dog"], padding="max_length", max_length=8)["input_ids"]
    assert ids[0][0] == tok.bos_token_id and ids[0][3] == tok.eos_token_id
    assert tok.eos_token_id == len(tok) - 1  # open_clip pools at the argmax of the ids


def test_tiny_clip_folder_round_trips(tmp_path):
    path, model = save_clip(tmp_path / "clip")
    loaded = CLIPModel.from_pretrained(path).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.vision_model(pixel_values=x).pooler_output,
                           loaded.vision_model(pixel_values=x).pooler_output)

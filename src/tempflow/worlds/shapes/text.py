"""The built-in text encoder: word-level tokens over the grammar's vocabulary and a small transformer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from tempflow.worlds.shapes.grammar import COLOURS, NUMBERS, RELATIONS, SHAPES

SPECIALS = ("<pad>", "<bos>", "<unk>")
PAD, BOS, UNK = 0, 1, 2


def grammar_vocabulary() -> list[str]:
    """Every word of the grammar, specials first, in a fixed order."""
    words = ["a", "an", "and", *NUMBERS, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES)]
    for rel in RELATIONS:
        words += rel.split()
    return list(SPECIALS) + list(dict.fromkeys(words))


class WordTokenizer:
    """Lower-cased words to ids; every sequence starts with <bos>, so "" (no prompt) is one token."""

    def __init__(self, vocab: list[str], max_tokens: int) -> None:
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_tokens) int64 ids, padded with <pad> and cut at max_tokens."""
        ids = torch.full((len(prompts), self.max_tokens), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().replace(",", " ").rstrip(".").split()
            toks = [BOS] + [self.index.get(w, UNK) for w in words]
            toks = toks[: self.max_tokens]
            ids[row, : len(toks)] = torch.tensor(toks)
        return ids


@dataclass
class TextEncoderConfig:
    vocab_size: int
    max_tokens: int = 16  # longest prompt of the grammar is 11 words plus <bos>
    width: int = 64  # token embedding size, fed to the flow transformer's joint attention
    depth: int = 2  # transformer layers
    heads: int = 4  # attention heads


class TextEncoder(nn.Module):
    """Token embeddings (B, L, width) and a pooled embedding (B, width), the mean over real tokens."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.max_tokens, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ids != PAD  # (B, L)
        h = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, L, D)
        h = self.norm(self.blocks(h, src_key_padding_mask=~keep))
        h = h * keep[..., None]  # padding carries nothing into the joint attention
        pooled = h.sum(1) / keep.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        return h, pooled

    def config_dict(self) -> dict:
        return asdict(self.cfg)

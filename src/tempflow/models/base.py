"""The FlowModel protocol: what the sampler, the evaluator and the trainer need from a model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Conditioning:
    """Encoded prompts: token embeddings (B, L, D) and pooled embeddings (B, P)."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, rows: torch.Tensor | slice) -> Conditioning:
        return Conditioning(self.tokens[rows], self.pooled[rows])

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        return Conditioning(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]))


@runtime_checkable
class FlowModel(Protocol):
    """A text-to-image flow model in the time convention of tempflow.flow (t = 1 is noise)."""

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise PromptError for prompts this model cannot take."""
        ...

    def encode_prompts(self, prompts: list[str]) -> Conditioning: ...

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
        """v for a batch x (B, C, H, W) at times t (B,), classifier-free guided (one batched call)."""
        ...

    def sigmas(self, num_steps: int) -> torch.Tensor: ...

    def latent_shape(self) -> tuple[int, int, int]: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) sample -> (B, 3, H, W) images in [0, 1]."""
        ...

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]: ...

    def save(self, path: str | Path) -> None: ...

"""JPEG (in)compressibility: the size in kB of each image encoded by Pillow as JPEG.

The images are quantised to uint8 (``round(255 x)``) and encoded at quality 95, the set-up of the
compressibility tasks in the DDPO and Flow-GRPO papers; compressibility is the negated size, so
flatter images score higher. Built through the registry (``make_reward``), an image with a NaN or
infinite pixel is never encoded and scores NaN (``tempflow.rewards.spec.score_finite``).
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from tempflow.errors import TempflowError
from tempflow.rewards.loading import check_images
from tempflow.rewards.spec import RewardFn


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """(B, 3, H, W) finite, in [0, 1] -> (B,) float32 encoded JPEG size in kB (1000 bytes)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def _check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise TempflowError(f"JPEG quality must be an integer from 1 to 100, got {quality!r}")


def make_jpeg_incompressibility(quality: int = 95) -> RewardFn:
    """fn(images, prompts, metadata) -> (B,) JPEG size in kB: larger files score higher."""
    _check_quality(quality)

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        check_images(images, prompts, "jpeg_incompressibility")
        return jpeg_size_kb(images, quality)

    return reward


def make_jpeg_compressibility(quality: int = 95) -> RewardFn:
    """fn(images, prompts, metadata) -> (B,) minus the JPEG size in kB: smaller files score higher."""
    _check_quality(quality)

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        check_images(images, prompts, "jpeg_compressibility")
        return -jpeg_size_kb(images, quality)

    return reward

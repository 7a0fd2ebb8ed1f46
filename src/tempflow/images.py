"""Image files: PNGs and labelled grids (PIL only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_pngs(images: torch.Tensor, folder: str | Path, names: list[str]) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for arr, name in zip(to_uint8(images), names):
        p = folder / f"{name}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def grid(images: torch.Tensor, labels: list[str] | None = None, cols: int | None = None, scale: int = 4) -> Image.Image:
    """A grid of images, each scaled up `scale` times, with an optional caption under each."""
    arrs = to_uint8(images)
    n, h, w, _ = arrs.shape
    cols = cols or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    text_h = 0 if labels is None else 12 * 3
    canvas = Image.new("RGB", (cols * (cw + 4) + 4, rows * (ch + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, arr in enumerate(arrs):
        x0 = 4 + (i % cols) * (cw + 4)
        y0 = 4 + (i // cols) * (ch + text_h + 4)
        canvas.paste(Image.fromarray(arr).resize((cw, ch), Image.NEAREST), (x0, y0))
        if labels is not None:
            for k, line in enumerate(_wrap(labels[i], max(8, cw // 6))[:3]):
                draw.text((x0, y0 + ch + 1 + 11 * k), line, fill="black", font=font)
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, labels: list[str] | None = None, cols: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, labels, cols).save(path)
    return path

"""CLIP-style image preprocessing on batched tensors: resize the shortest edge, center-crop, normalise.

It reproduces transformers' ``CLIPImageProcessor`` (Pillow backend) on float images without a round
trip through PIL: the resize is separable (width first, then height, as Pillow does) with an
antialiased kernel and each pass clamped to [0, 1] (Pillow stores the intermediate as uint8), and
the crop offsets are floored the same way. What remains is Pillow's rounding to uint8, about one
grey level at most (pinned by a test).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tempflow.errors import TempflowError
from tempflow.rewards.loading import resolve_file

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # Pillow's resampling codes as stored in preprocessor configs


@dataclass(frozen=True)
class ImageTransform:
    """images (B, 3, H, W) in [0, 1] -> (B, 3, h, w) float32, normalised for a vision tower."""

    shortest_edge: int | None = 224  # resize so the shorter side has this length; None = no resize
    size: tuple[int, int] | None = None  # or resize to exactly (height, width) instead
    crop: tuple[int, int] | None = (224, 224)  # center crop (height, width); None = no crop
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    mode: str = "bicubic"  # bicubic | bilinear

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # (B, 3, H, W)
        if self.shortest_edge is not None or self.size is not None:
            x = self.resize(x)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.size is not None:
            new_h, new_w = self.size
        else:
            s = self.shortest_edge
            new_h, new_w = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)  # floor, as transformers
        if new_w != w:
            x = F.interpolate(x, size=(h, new_w), mode=self.mode, antialias=True, align_corners=False).clamp(0, 1)
        if new_h != h:
            x = F.interpolate(x, size=(new_h, new_w), mode=self.mode, antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        return x  # (B, 3, new_h, new_w)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop the centre (height, width) of (B, C, H, W); offsets floored like transformers' center_crop."""
    h, w = x.shape[-2:]
    ch, cw = size
    if ch > h or cw > w:
        raise TempflowError(f"cannot center-crop {ch}x{cw} from a {h}x{w} image; resize it first")
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def _edge(value: Any, key: str) -> int | tuple[int, int]:
    """A size entry of a preprocessor config: an int, {'shortest_edge': n} or {'height': h, 'width': w}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise TempflowError(f"unsupported {key!r} in the image preprocessor config: {value!r}")


def transform_from_config(cfg: dict[str, Any]) -> ImageTransform:
    """An ImageTransform from the dict of a CLIP-style ``preprocessor_config.json``."""
    size = _edge(cfg.get("size", 224), "size") if cfg.get("do_resize", True) else None
    crop = _edge(cfg.get("crop_size", 224), "crop_size") if cfg.get("do_center_crop", True) else None
    if isinstance(crop, int):
        crop = (crop, crop)
    resample = int(cfg.get("resample", 3))
    if resample not in RESAMPLE:
        raise TempflowError(f"unsupported resample={resample} in the image preprocessor config; use 2 or 3")
    normalise = cfg.get("do_normalize", True)
    mean = tuple(cfg.get("image_mean", OPENAI_MEAN)) if normalise else (0.0, 0.0, 0.0)
    std = tuple(cfg.get("image_std", OPENAI_STD)) if normalise else (1.0, 1.0, 1.0)
    edge, exact = (size, None) if not isinstance(size, tuple) else (None, size)
    return ImageTransform(edge, exact, crop, mean, std, RESAMPLE[resample])  # type: ignore[arg-type]


def load_transform(source: str, reward: str) -> ImageTransform:
    """The ImageTransform of a processor folder or hub repo.

    Read from its ``preprocessor_config.json``, or from the ``image_processor`` entry of the
    ``processor_config.json`` that recent transformers versions write instead.
    """
    try:
        path, key = resolve_file(source, "preprocessor_config.json", reward), None
    except TempflowError:
        path, key = resolve_file(source, "processor_config.json", reward), "image_processor"
    try:
        cfg = json.loads(path.read_text())
        cfg = cfg[key] if key else cfg
    except (OSError, ValueError, KeyError) as e:
        raise TempflowError(f"reward {reward!r}: no image preprocessor config in {str(path)!r} ({e!r})") from None
    return transform_from_config(cfg)

"""A GenEval-style verifier for the shapes world, with classical image processing only.

image -> palette assignment (nearest colour, background included) -> connected components per
colour -> shape from descriptors (fill of the bounding box, top/bottom mass asymmetry) -> objects.
A prompt's spec becomes a list of constraints; the reward is the fraction satisfied, and a sample
is strictly correct when all are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from tempflow.shapes.grammar import COLOURS, SHAPES, Spec
from tempflow.shapes.world import BACKGROUND, PALETTE, relation_holds

_PALETTE = np.asarray([BACKGROUND] + [PALETTE[c] for c in COLOURS], dtype=np.float32)  # (K+1, 3)
_EIGHT = np.zeros((3, 3, 3), dtype=bool)
_EIGHT[1] = True  # 8-connectivity inside an image, never across the batch axis
TRIANGLE_ASYMMETRY = 0.2  # (bottom - top) / area above this: an upright triangle
SQUARE_FILL = 0.8  # area / box area above this, and 3 or 4 box corners set: a square


@dataclass(frozen=True)
class Detection:
    """One detected object; centroid normalised to [0, 1]."""

    shape: str
    colour: str
    cx: float
    cy: float
    area: int


def _as_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu", torch.float32).numpy()
    return np.asarray(images, dtype=np.float32)


def assign_palette(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W) int: 0 background, k >= 1 the colour COLOURS[k-1]."""
    x = np.clip(images, 0.0, 1.0).transpose(0, 2, 3, 1)  # (B, H, W, 3)
    d = ((x[..., None, :] - _PALETTE) ** 2).sum(-1)  # (B, H, W, K+1)
    return d.argmin(-1)


def classify_shape(mask: np.ndarray) -> str:
    """Shape of a component from its boolean box crop (h, w)."""
    h, w = mask.shape
    area = mask.sum()
    rows = mask.sum(1)
    half = h // 2
    asym = (rows[h - half :].sum() - rows[:half].sum()) / area
    if asym > TRIANGLE_ASYMMETRY:
        return "triangle"
    corners = int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])
    return "square" if area / (h * w) > SQUARE_FILL and corners >= 3 else "circle"


def detect(images: torch.Tensor | np.ndarray, min_area: int | None = None) -> list[list[Detection]]:
    """Objects in each image of a batch (B, 3, H, W) with values in [0, 1]."""
    x = _as_numpy(images)
    b, _, h, w = x.shape
    min_area = min_area if min_area is not None else max(3, round(0.005 * h * w))
    idx = assign_palette(x)
    k = len(COLOURS)
    planes = idx[:, None] == np.arange(1, k + 1)[None, :, None, None]  # (B, K, H, W)
    labels, _ = ndimage.label(planes.reshape(b * k, h, w), structure=_EIGHT)
    out: list[list[Detection]] = [[] for _ in range(b)]
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl][0] == lab  # (h, w)
        area = int(crop.sum())
        if area < min_area:
            continue
        plane, ys, xs = sl
        yy, xx = np.nonzero(crop)
        cy = (yy.mean() + ys.start + 0.5) / h
        cx = (xx.mean() + xs.start + 0.5) / w
        colour = COLOURS[plane.start % k]
        out[plane.start // k].append(Detection(classify_shape(crop), colour, float(cx), float(cy), area))
    return out


def constraints(dets: list[Detection], spec: Spec) -> list[bool]:
    """Each constraint of the spec, satisfied or not, for one image's detections."""
    ok: list[bool] = []
    phrases = spec.phrases
    matches = [[d for d in dets if d.shape == p.shape and (p.colour is None or d.colour == p.colour)]
               for p in phrases]
    ok += [len(m) == p.count for m, p in zip(matches, phrases)]
    for s in SHAPES:  # shape right whatever the colour, where a colour was asked
        if any(p.shape == s and p.colour for p in phrases):
            want = sum(p.count for p in phrases if p.shape == s)
            ok.append(sum(d.shape == s for d in dets) == want)
    all_coloured = all(p.colour for p in phrases)
    for c in COLOURS:  # colour right whatever the shape
        want = sum(p.count for p in phrases if p.colour == c)
        if want:
            have = sum(d.colour == c for d in dets)
            ok.append(have == want if all_coloured else have >= want)
    ok.append(len(dets) == spec.num_objects)  # nothing missing, nothing extra
    if spec.relation:
        a, b = matches
        ok.append(len(a) == 1 and len(b) == 1
                  and relation_holds((a[0].cx, a[0].cy), (b[0].cx, b[0].cy), spec.relation))
    return ok


def score(images: torch.Tensor | np.ndarray, specs: list[Spec]) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of constraints satisfied, strict correctness) per image, both (B,)."""
    dets = detect(images)
    if len(dets) != len(specs):
        raise ValueError(f"{len(dets)} images but {len(specs)} prompts")
    cons = [constraints(d, s) for d, s in zip(dets, specs)]
    frac = np.asarray([np.mean(c) for c in cons], dtype=np.float32)
    strict = np.asarray([all(c) for c in cons])
    return frac, strict

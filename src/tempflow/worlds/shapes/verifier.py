"""A GenEval-style verifier for the shapes world, with classical image processing only.

image -> palette assignment (nearest colour, background included) -> connected components per
colour -> shape from descriptors (fill of the bounding box, top/bottom mass asymmetry) -> objects.
A prompt's spec becomes a list of constraints; the reward is the fraction satisfied, and a sample
is strictly correct when all are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from tempflow.worlds.shapes.grammar import COLOURS, SHAPES, Spec
from tempflow.worlds.shapes.scenes import BACKGROUND, PALETTE, relation_margin

_PALETTE = np.asarray([BACKGROUND] + [PALETTE[c] for c in COLOURS], dtype=np.float32)  # (K+1, 3)
_EIGHT = np.zeros((3, 3, 3), dtype=bool)
_EIGHT[1] = True  # 8-connectivity inside an image, never across the batch axis
TRIANGLE_ASYMMETRY = 0.2  # (bottom - top) / area above this: an upright triangle
SQUARE_FILL = 0.8  # area / box area above this, and 3 or 4 box corners set: a square
CIRCLE_FILL = 0.85  # a drawn circle fills at most about this much of its box (pi / 4 at high resolution)
RELATION_SCALE = 0.1  # graded relation credit: 0.5 + 0.5 * tanh(margin / this), margins in image widths


@dataclass(frozen=True)
class Detection:
    """One detected object; centroid normalised to [0, 1]."""

    shape: str
    colour: str
    cx: float
    cy: float
    area: int
    likeness: tuple[float, ...] | None = None  # per shape of SHAPES, from `shape_likeness`

    def like(self, shape: str) -> float:
        """How much the component looks like `shape`, in [0, 1] (its own shape: 1 when not measured)."""
        if self.likeness is None:
            return float(shape == self.shape)
        return self.likeness[SHAPES.index(shape)]


def _as_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu", torch.float32).numpy()
    return np.asarray(images, dtype=np.float32)


def assign_palette(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W) int: 0 background, k >= 1 the colour COLOURS[k-1]."""
    x = np.clip(images, 0.0, 1.0).transpose(0, 2, 3, 1)  # (B, H, W, 3)
    d = ((x[..., None, :] - _PALETTE) ** 2).sum(-1)  # (B, H, W, K+1)
    return d.argmin(-1)


def shape_descriptors(mask: np.ndarray) -> tuple[float, float, int]:
    """(top/bottom mass asymmetry, fill of the bounding box, box corners set) of a component's
    boolean box crop (h, w)."""
    h, w = mask.shape
    area = mask.sum()
    rows = mask.sum(1)
    half = h // 2
    asym = float((rows[h - half :].sum() - rows[:half].sum()) / area)
    corners = int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])
    return asym, float(area / (h * w)), corners


def classify_shape(mask: np.ndarray) -> str:
    """Shape of a component from its boolean box crop (h, w)."""
    asym, fill, corners = shape_descriptors(mask)
    if asym > TRIANGLE_ASYMMETRY:
        return "triangle"
    return "square" if fill > SQUARE_FILL and corners >= 3 else "circle"


def shape_likeness(mask: np.ndarray) -> tuple[float, ...]:
    """How much a component looks like each shape of SHAPES, in [0, 1] and summing to 1.

    Triangle-likeness t rises linearly with the asymmetry from 0.1 to 0.3 (0.5 at the classifier's
    threshold); of the rest, square-likeness q is a quarter the fill above a circle's (0.85 to 1)
    and three quarters the share of box corners set (small circles fill their boxes almost like
    squares; corners tell them apart), so a square with rounded corners lies between the two.
    """
    asym, fill, corners = shape_descriptors(mask)
    t = float(np.clip((asym - 0.1) / 0.2, 0.0, 1.0))
    q = 0.25 * float(np.clip((fill - CIRCLE_FILL) / (1 - CIRCLE_FILL), 0.0, 1.0)) + 0.75 * corners / 4
    like = {"circle": (1 - t) * (1 - q), "square": (1 - t) * q, "triangle": t}
    return tuple(like[s] for s in SHAPES)


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
        out[plane.start // k].append(
            Detection(classify_shape(crop), colour, float(cx), float(cy), area, shape_likeness(crop)))
    return out


def _count_credit(have: int, want: int, graded: bool, at_least: bool = False) -> float:
    """1 where the count is right; graded, 1 - |have - want| / want (0 at worst) where it is not."""
    if have == want or (at_least and have >= want):
        return 1.0
    return max(0.0, 1.0 - abs(have - want) / want) if graded else 0.0


def _assignment_credit(dets: list[Detection], phrases: tuple) -> list[float]:
    """Per phrase, the mean likeness of the objects it gets when each asked-for object is matched to
    a different detection of its colour so as to maximise the total shape-likeness (0 where none is
    left): two look-alike components cannot both earn full credit for two different shapes."""
    slots = [i for i, p in enumerate(phrases) for _ in range(p.count)]
    credit = np.zeros(len(slots))
    if dets:
        gain = np.asarray([[d.like(phrases[i].shape) if phrases[i].colour in (None, d.colour) else 0.0
                            for d in dets] for i in slots])
        rows, cols = linear_sum_assignment(gain, maximize=True)
        credit[rows] = gain[rows, cols]
    return [float(credit[[j for j, i in enumerate(slots) if i == k]].mean()) for k in range(len(phrases))]


def _matches(dets: list[Detection], phrases: tuple) -> list[list[Detection]]:
    """Per phrase, the detections of its shape and (where it names one) its colour."""
    return [[d for d in dets if d.shape == p.shape and p.colour in (None, d.colour)] for p in phrases]


def _colour_counts(dets: list[Detection], phrases: tuple) -> list[tuple[int, int, bool]]:
    """(have, want, at_least) for each colour the phrases ask for, whatever the shape: exactly `want`
    objects of it where every phrase names a colour, at least `want` where some phrase takes any."""
    at_least = not all(p.colour for p in phrases)
    wants = [(c, sum(p.count for p in phrases if p.colour == c)) for c in COLOURS]
    return [(sum(d.colour == c for d in dets), want, at_least) for c, want in wants if want]


def constraint_values(dets: list[Detection], spec: Spec, graded: bool = False) -> list[float]:
    """Each constraint of the spec for one image's detections: 1.0 satisfied, 0.0 not.

    graded=True gives partial credit instead of 0 where a constraint is missed by a little: a phrase
    whose objects are not all found earns the mean shape-likeness of the components matched to them
    (`_assignment_credit`, less the share of extra look-alikes), so a square with rounded corners
    counts for part of a square; other counts off by one of three earn 2/3; a relation between the
    two asked-for objects earns 0.5 + 0.5 * tanh(margin / RELATION_SCALE) from its margin
    (`relation_margin`, positive where it holds), rising smoothly through 0.5 where it starts to hold.
    """
    values: list[float] = []
    phrases = spec.phrases
    matches = _matches(dets, phrases)
    if graded:
        near = _assignment_credit(dets, phrases)
        values += [1.0 if len(m) == p.count else max(0.0, c - max(0, len(m) - p.count) / p.count)
                   for m, p, c in zip(matches, phrases, near)]
    else:
        values += [float(len(m) == p.count) for m, p in zip(matches, phrases)]
    for s in SHAPES:  # shape right whatever the colour, where a colour was asked
        if any(p.shape == s and p.colour for p in phrases):
            want = sum(p.count for p in phrases if p.shape == s)
            values.append(_count_credit(sum(d.shape == s for d in dets), want, graded))
    values += [_count_credit(have, want, graded, at_least) for have, want, at_least in _colour_counts(dets, phrases)]
    values.append(_count_credit(len(dets), spec.num_objects, graded))  # nothing missing, nothing extra
    if spec.relation:
        a, b = matches
        if len(a) == 1 and len(b) == 1:
            margin = relation_margin((a[0].cx, a[0].cy), (b[0].cx, b[0].cy), spec.relation)
            values.append(0.5 + 0.5 * math.tanh(margin / RELATION_SCALE) if graded else float(margin > 0))
        else:
            values.append(0.0)
    return values


def constraints(dets: list[Detection], spec: Spec) -> list[bool]:
    """Each constraint of the spec, satisfied or not, for one image's detections."""
    return [v == 1.0 for v in constraint_values(dets, spec)]


FAILURES: tuple[str, ...] = ("too few objects", "too many objects", "shape", "colour", "binding", "relation")


def failure(dets: list[Detection], spec: Spec) -> str | None:
    """Why a sample misses its prompt: None where every constraint holds, else the first of FAILURES
    that applies: too few or too many objects; the right number but the wrong shapes; the right
    shapes but the wrong colours; shapes and colours right but paired wrongly; only the relation."""
    if all(constraints(dets, spec)):
        return None
    if len(dets) != spec.num_objects:
        return FAILURES[0] if len(dets) < spec.num_objects else FAILURES[1]
    if sorted(p.shape for p in spec.phrases for _ in range(p.count)) != sorted(d.shape for d in dets):
        return "shape"
    colours = _colour_counts(dets, spec.phrases)
    if any(_count_credit(have, want, False, at_least) < 1 for have, want, at_least in colours):
        return "colour"
    if any(len(m) != p.count for m, p in zip(_matches(dets, spec.phrases), spec.phrases)):
        return "binding"
    return "relation"


def score_detections(dets: list[list[Detection]], specs: list[Spec],
                     graded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`score` from detections already made."""
    if len(dets) != len(specs):
        raise ValueError(f"{len(dets)} images but {len(specs)} prompts")
    cons = [constraints(d, s) for d, s in zip(dets, specs)]
    strict = np.asarray([all(c) for c in cons])
    values = [constraint_values(d, s, graded=True) for d, s in zip(dets, specs)] if graded else cons
    frac = np.asarray([np.mean(v) for v in values], dtype=np.float32)
    return frac, strict


def score(images: torch.Tensor | np.ndarray, specs: list[Spec], graded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of constraints satisfied, strict correctness) per image, both (B,).

    With graded=True the fraction is the mean of `constraint_values(..., graded=True)`; strict
    correctness is always all constraints exactly satisfied.
    """
    return score_detections(detect(images), specs, graded)

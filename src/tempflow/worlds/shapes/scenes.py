"""Procedural scenes of the shapes world: flat coloured shapes on a dark background.

Coordinates are normalised to [0, 1] (x to the right, y downwards), so a scene renders at any
image size; 32x32 is the default and 64x64 works the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from tempflow.worlds.shapes.grammar import COLOURS, Spec

# RGB in [0, 1]; the corners of the colour cube, pulled in a little, kept well apart.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.98, 0.90, 0.15),
    "purple": (0.80, 0.20, 0.90),
    "cyan": (0.15, 0.90, 0.90),
}
BACKGROUND: tuple[float, float, float] = (0.08, 0.08, 0.08)
GAP = 0.07  # minimum free space between two objects' boxes, in image widths
RELATION_MARGIN = 0.12  # main-axis offset exceeds the cross-axis one by this much in scenes


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, centre of its bounding box and its side, all normalised."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    @property
    def centroid(self) -> tuple[float, float]:
        """Centre of mass (an upright triangle's lies a sixth of its height below the box centre)."""
        return (self.cx, self.cy + (self.size / 6 if self.shape == "triangle" else 0.0))


def shape_mask(shape: str, cx: float, cy: float, size: float, res: int) -> np.ndarray:
    """Boolean (res, res) mask of a shape, sampled at pixel centres."""
    c = (np.arange(res) + 0.5) / res
    x, y = c[None, :], c[:, None]
    h = size / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":  # apex up, base down
        top = cy - h
        depth = (y - top) / size
        return (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= h * depth)
    raise ValueError(f"unknown shape {shape!r}")


def render(objects: list[Obj], res: int = 32) -> np.ndarray:
    """One scene as float32 (3, res, res) in [0, 1]."""
    img = np.empty((3, res, res), dtype=np.float32)
    img[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    for o in objects:
        m = shape_mask(o.shape, o.cx, o.cy, o.size, res)
        img[:, m] = np.asarray(PALETTE[o.colour], dtype=np.float32)[:, None]
    return img


def render_batch(scenes: list[list[Obj]], res: int = 32) -> np.ndarray:
    """Scenes as float32 (B, 3, res, res) in [0, 1]."""
    return np.stack([render(s, res) for s in scenes])


def relation_margin(a: tuple[float, float], b: tuple[float, float], relation: str) -> float:
    """How far centroid a stands in `relation` to centroid b: the offset along the relation's axis
    minus the absolute offset across it, in image widths; positive where the relation holds."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # from a to b
    main, cross = {"left_of": (dx, dy), "right_of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return main - abs(cross)


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float = 0.0) -> bool:
    """Whether centroid a stands in `relation` to centroid b (the main-axis offset dominates)."""
    return relation_margin(a, b, relation) > margin


def _free(o: Obj, placed: list[Obj]) -> bool:
    return all(
        abs(o.cx - p.cx) >= (o.size + p.size) / 2 + GAP or abs(o.cy - p.cy) >= (o.size + p.size) / 2 + GAP
        for p in placed
    )


def _place(rng: random.Random, shape: str, colour: str, size: float, placed: list[Obj]) -> Obj | None:
    lo, hi = size / 2 + 0.03, 1 - size / 2 - 0.03
    for _ in range(200):
        o = Obj(shape, colour, rng.uniform(lo, hi), rng.uniform(lo, hi), size)
        if _free(o, placed):
            return o
    return None


def _attempt(spec: Spec, rng: random.Random) -> list[Obj] | None:
    n = spec.num_objects
    lo, hi = (0.26, 0.38) if n <= 2 else (0.22, 0.30)
    placed: list[Obj] = []
    for p in spec.phrases:
        for _ in range(p.count):
            colour = p.colour or rng.choice(COLOURS)
            o = _place(rng, p.shape, colour, rng.uniform(lo, hi), placed)
            if o is None:
                return None
            placed.append(o)
    if spec.relation and not relation_holds(placed[0].centroid, placed[1].centroid, spec.relation, RELATION_MARGIN):
        return None
    return placed


def scene_for(spec: Spec, rng: random.Random) -> list[Obj]:
    """A random scene that satisfies `spec` exactly (objects listed in phrase order)."""
    for _ in range(10_000):
        objs = _attempt(spec, rng)
        if objs is not None:
            return objs
    raise RuntimeError(f"could not lay out a scene for {spec.text()!r}")

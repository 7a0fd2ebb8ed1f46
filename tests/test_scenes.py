"""The scene generator, checked by geometry and pixels computed here, never by the relation
function (`relation_margin`) that the verifier shares with it."""

import random

import numpy as np
import pytest
from scipy import ndimage

from tempflow.worlds.shapes.grammar import CATEGORIES, RELATIONS
from tempflow.worlds.shapes.prompts import enumerate_specs, random_spec
from tempflow.worlds.shapes.scenes import (
    BACKGROUND,
    PALETTE,
    RELATION_MARGIN,
    Obj,
    render,
    render_batch,
    scene_for,
)


def _centroid(o):
    """Centre of mass of an object from its outline: a circle's or square's is its centre; an upright
    triangle's is the mean of its vertices (apex at the top of the box, base along its bottom)."""
    if o.shape != "triangle":
        return o.cx, o.cy
    h = o.size / 2
    xs, ys = (o.cx, o.cx - h, o.cx + h), (o.cy - h, o.cy + h, o.cy + h)
    return sum(xs) / 3, sum(ys) / 3


def _pixel_centroid(o, res=128):
    """Centre of mass of an object's pixels, drawn alone at `res`."""
    yy, xx = np.nonzero(_pixels(o, res))
    return (xx.mean() + 0.5) / res, (yy.mean() + 0.5) / res


def _pixels(o, res):
    """Boolean (res, res) mask of the pixels an object covers when drawn alone."""
    img = render([o], res)
    return np.any(img != np.asarray(BACKGROUND, dtype=np.float32)[:, None, None], axis=0)


# Where a stands relative to b: +1 along this axis (0 = x, 1 = y, y downwards) or -1 against it.
AXIS = {"left_of": (0, -1), "right_of": (0, 1), "above": (1, -1), "below": (1, 1)}


def _axis_offsets(a, b, relation):
    """(offset of a from b along the relation's direction, offset across it), in image widths."""
    axis, sign = AXIS[relation]
    return sign * (a[axis] - b[axis]), a[1 - axis] - b[1 - axis]


def _scenes(seed, n=50):
    rng = random.Random(seed)
    specs = [random_spec(rng) for _ in range(n)]
    return specs, [scene_for(s, rng) for s in specs]


def test_scenes_are_deterministic_per_seed():
    a, b, c = _scenes(7)[1], _scenes(7)[1], _scenes(8)[1]
    assert a == b and a != c
    assert np.array_equal(render_batch(a), render_batch(b))


@pytest.mark.parametrize("category", CATEGORIES)
def test_scenes_follow_their_spec(category):
    rng = random.Random(0)
    for spec in enumerate_specs(category)[:40]:
        objs = scene_for(spec, rng)
        assert len(objs) == spec.num_objects
        for o in objs:
            assert 0 <= o.cx - o.size / 2 and o.cx + o.size / 2 <= 1
            assert 0 <= o.cy - o.size / 2 and o.cy + o.size / 2 <= 1
        k = 0
        for p in spec.phrases:
            for o in objs[k : k + p.count]:
                assert o.shape == p.shape and (p.colour is None or o.colour == p.colour)
            k += p.count
        if spec.relation:
            main, cross = _axis_offsets(_centroid(objs[0]), _centroid(objs[1]), spec.relation)
            assert main > abs(cross), (spec.text(), objs)


@pytest.mark.parametrize("res", [32, 64])
def test_render_sizes_and_colours(res):
    specs, scenes = _scenes(3, 8)
    imgs = render_batch(scenes, res)
    assert imgs.shape == (8, 3, res, res) and imgs.dtype == np.float32
    allowed = {tuple(np.float32(v) for v in c) for c in [BACKGROUND, *PALETTE.values()]}
    pixels = {tuple(p) for p in imgs.transpose(0, 2, 3, 1).reshape(-1, 3)}
    assert pixels <= allowed


def test_palette_is_well_separated():
    cols = np.array([BACKGROUND, *PALETTE.values()])
    d = np.sqrt(((cols[:, None] - cols[None]) ** 2).sum(-1))
    assert len(PALETTE) >= 6
    assert d[~np.eye(len(cols), dtype=bool)].min() > 0.5


def test_a_scene_has_pixels_of_its_objects():
    img = render([Obj("square", "red", 0.5, 0.5, 0.25)], 32)
    red = np.all(np.isclose(img.transpose(1, 2, 0), PALETTE["red"]), axis=-1)
    assert red.sum() == 64  # an 8x8 square


def _box_gap(a, b):
    """Free space between two objects' bounding boxes: the larger of the x and y gaps (negative
    where the boxes overlap)."""
    half = (a.size + b.size) / 2
    return max(abs(a.cx - b.cx) - half, abs(a.cy - b.cy) - half)


@pytest.mark.parametrize("category", CATEGORIES)
def test_objects_never_overlap(category):
    """Bounding boxes stay apart by more than two pixels at 32x32 (so two objects of one colour
    are two components), and at 64x64 no object hides a pixel of another, not even a neighbour."""
    rng = random.Random(CATEGORIES.index(category))
    specs = [random_spec(rng, (category,)) for _ in range(300)]
    neighbours = np.ones((3, 3), dtype=bool)
    for spec in specs:
        objs = scene_for(spec, rng)
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert _box_gap(a, b) > 2 / 32, (spec.text(), a, b)
        if len(objs) < 2:
            continue
        masks = [_pixels(o, 64) for o in objs]
        grown = [ndimage.binary_dilation(m, neighbours) for m in masks]
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                assert not (grown[i] & masks[j]).any(), (spec.text(), objs[i], objs[j])
        img = render(objs, 64)
        drawn = np.any(img != np.asarray(BACKGROUND, dtype=np.float32)[:, None, None], axis=0)
        assert drawn.sum() == sum(m.sum() for m in masks), spec.text()


def test_overlap_checks_see_an_overlap():
    a, b = Obj("square", "red", 0.4, 0.4, 0.3), Obj("circle", "red", 0.55, 0.45, 0.3)
    assert _box_gap(a, b) < 0
    img = render([a, b], 64)
    drawn = np.any(img != np.asarray(BACKGROUND, dtype=np.float32)[:, None, None], axis=0)
    assert drawn.sum() < _pixels(a, 64).sum() + _pixels(b, 64).sum()


@pytest.mark.parametrize("relation", list(RELATIONS.values()))
def test_position_scenes_put_the_relation_on_its_main_axis(relation):
    """For every relation, generated scenes place the first object along the relation's axis from
    the second, by more than the offset across it plus the generator's margin; measured once from
    the objects' outlines and once from their drawn pixels, never by the relation function."""
    specs = [s for s in enumerate_specs("position") if s.relation == relation]
    rng = random.Random(sorted(RELATIONS.values()).index(relation))
    sides = set()
    for _ in range(150):
        spec = rng.choice(specs)
        a, b = scene_for(spec, rng)
        main, cross = _axis_offsets(_centroid(a), _centroid(b), relation)
        assert main - abs(cross) > RELATION_MARGIN - 1e-9, (spec.text(), a, b)
        main, cross = _axis_offsets(_pixel_centroid(a), _pixel_centroid(b), relation)
        assert main - abs(cross) > RELATION_MARGIN - 0.02, (spec.text(), a, b)
        sides.add(cross > 0)
    assert sides == {True, False}  # scenes lie on both sides of the axis, so a slip either way shows


def test_centroids_by_hand():
    tri = Obj("triangle", "red", 0.5, 0.5, 0.3)
    assert _centroid(tri) == pytest.approx((0.5, 0.55))
    assert _pixel_centroid(tri) == pytest.approx((0.5, 0.55), abs=0.01)
    assert _axis_offsets((0.2, 0.5), (0.8, 0.6), "left_of") == pytest.approx((0.6, -0.1))
    assert _axis_offsets((0.5, 0.9), (0.4, 0.2), "below") == pytest.approx((0.7, 0.1))

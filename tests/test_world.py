import random

import numpy as np
import pytest

from tempflow.worlds.shapes.grammar import CATEGORIES
from tempflow.worlds.shapes.prompts import enumerate_specs, random_spec
from tempflow.worlds.shapes.scenes import BACKGROUND, PALETTE, relation_holds, render, render_batch, scene_for


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
            assert relation_holds(objs[0].centroid, objs[1].centroid, spec.relation)


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
    from tempflow.worlds.shapes.scenes import Obj

    img = render([Obj("square", "red", 0.5, 0.5, 0.25)], 32)
    red = np.all(np.isclose(img.transpose(1, 2, 0), PALETTE["red"]), axis=-1)
    assert red.sum() == 64  # an 8x8 square

import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from tempflow.rewards import make_reward
from tempflow.worlds.shapes.grammar import CATEGORIES, RELATIONS, SHAPES, parse_prompt
from tempflow.worlds.shapes.negatives import wrong_caption
from tempflow.worlds.shapes.prompts import random_spec
from tempflow.worlds.shapes.scenes import Obj, relation_margin, render, render_batch, scene_for
from tempflow.worlds.shapes.verifier import (
    Detection,
    constraint_values,
    constraints,
    detect,
    failure,
    score,
    score_detections,
)


def _ground_truth(n, seed, res=32):
    rng = random.Random(seed)
    specs = [random_spec(rng) for _ in range(n)]
    scenes = [scene_for(s, rng) for s in specs]
    return specs, scenes, render_batch(scenes, res)


PER_CATEGORY = {32: 300, 64: 100}  # scenes per category at each image size


@pytest.fixture(scope="module", params=sorted(PER_CATEGORY))
def scenes_by_category(request):
    """{category: (specs, scenes, detections)} for a fixed-seed set of scenes of every category."""
    res = request.param
    out = {}
    for k, cat in enumerate(CATEGORIES):
        rng = random.Random(1000 * res + k)
        specs = [random_spec(rng, (cat,)) for _ in range(PER_CATEGORY[res])]
        scenes = [scene_for(s, rng) for s in specs]
        out[cat] = (specs, scenes, detect(render_batch(scenes, res)))
    return out


def _accepted(dets, specs):
    return [s.text() for d, s in zip(dets, specs) if all(constraints(d, s))]


def test_every_true_caption_is_accepted_in_each_category(scenes_by_category):
    assert set(scenes_by_category) == set(CATEGORIES)
    for cat, (specs, _, dets) in scenes_by_category.items():
        rejected = [s.text() for d, s in zip(dets, specs) if not all(constraints(d, s))]
        assert rejected == [], (cat, rejected[:5])
        frac, strict = score_detections(dets, specs)
        assert strict.all() and np.all(frac == 1.0), cat


def test_no_wrong_caption_is_accepted_in_any_category(scenes_by_category):
    rng = random.Random(5)
    for cat, (specs, scenes, dets) in scenes_by_category.items():
        wrong = [wrong_caption(s, sc, rng) for s, sc in zip(specs, scenes)]
        assert all(w != s for w, s in zip(wrong, specs)), cat
        assert _accepted(dets, wrong) == [], cat


def test_no_other_relation_is_accepted_for_a_position_scene(scenes_by_category):
    specs, _, dets = scenes_by_category["position"]
    assert {s.relation for s in specs} == set(RELATIONS.values())
    for rel in RELATIONS.values():
        others = [replace(s, relation=rel) for s in specs]
        kept = [(d, o) for d, o, s in zip(dets, others, specs) if s.relation != rel]
        assert _accepted(*zip(*kept)) == [], rel


# Where object a stands relative to object b for each relation (x to the right, y downwards).
DIRECTION = {"left_of": (-1, 0), "right_of": (1, 0), "above": (0, -1), "below": (0, 1)}


def _offsets(relation):
    """(name, offset of a from b, relations that hold) for placements around `relation`'s axis: on
    it, diagonal (45 degrees), steeper than diagonal, and shallower, on either side of the axis."""
    u = np.asarray(DIRECTION[relation], dtype=float)
    for sign in (1, -1):
        v = sign * u[::-1]  # perpendicular to u
        perp = next(r for r, d in DIRECTION.items() if d == tuple(int(c) for c in v))
        yield f"diagonal{sign:+d}", 0.4 * (u + v), set()
        yield f"steep{sign:+d}", 0.32 * u + 0.4 * v, {perp}
        yield f"shallow{sign:+d}", 0.4 * u + 0.32 * v, {relation}
    yield "on the axis", 0.4 * u, {relation}


def _centres(offset):
    """Centres of a and b, symmetric about the image centre, with a - b = offset."""
    a = tuple(float(0.5 + c / 2) for c in offset)
    b = tuple(float(0.5 - c / 2) for c in offset)
    return a, b


@pytest.mark.parametrize("relation", list(RELATIONS.values()))
def test_relations_by_hand_reject_diagonal_placements(relation):
    """Detections placed by hand: exactly diagonal (|dx| == |dy| in floats) satisfies no relation;
    a placement a little off the diagonal satisfies the relation of its dominant axis only."""
    for name, offset, holds in _offsets(relation):
        (ax, ay), (bx, by) = _centres(offset)
        if name.startswith("diagonal"):
            assert abs(bx - ax) == abs(by - ay) > 0.3
        dets = [Detection("circle", "red", ax, ay, 60), Detection("square", "blue", bx, by, 60)]
        got = {rel for text, rel in RELATIONS.items()
               if all(constraints(dets, parse_prompt(f"a red circle {text} a blue square")))}
        assert got == holds, (relation, name, (ax, ay), (bx, by))


@pytest.mark.parametrize("res", [32, 64])
@pytest.mark.parametrize("relation", list(RELATIONS.values()))
def test_rendered_diagonal_placements_are_rejected(relation, res):
    """The same placements drawn and read back by the verifier (off-diagonal ones only: an exact
    diagonal is the boundary, where pixel centroids may tip either way)."""
    for name, offset, holds in _offsets(relation):
        if name.startswith("diagonal"):
            continue
        a, b = _centres(offset)
        scene = [Obj("circle", "red", *a, 0.2), Obj("square", "blue", *b, 0.2)]
        img = render(scene, res)[None]
        specs = [parse_prompt(f"a red circle {text} a blue square") for text in RELATIONS]
        _, strict = score(np.repeat(img, len(specs), axis=0), specs)
        got = {s.relation for s, ok in zip(specs, strict) if ok}
        assert got == holds, (relation, name, a, b, res)


def test_detection_of_a_known_scene():
    scene = [Obj("circle", "red", 0.25, 0.3, 0.3), Obj("triangle", "blue", 0.75, 0.7, 0.3)]
    dets = detect(render(scene, 32)[None])[0]
    got = sorted((d.shape, d.colour) for d in dets)
    assert got == [("circle", "red"), ("triangle", "blue")]
    red = next(d for d in dets if d.colour == "red")
    assert abs(red.cx - 0.25) < 0.03 and abs(red.cy - 0.3) < 0.03


def test_partial_credit_is_the_fraction_of_constraints():
    scene = [Obj("circle", "red", 0.25, 0.5, 0.3), Obj("square", "green", 0.75, 0.5, 0.3)]
    dets = detect(render(scene, 32)[None])[0]
    # right: red circle left of a green square
    assert all(constraints(dets, parse_prompt("a red circle to the left of a green square")))
    # wrong relation only: 1 of the constraints fails
    c = constraints(dets, parse_prompt("a red circle to the right of a green square"))
    assert c.count(False) == 1
    # wrong colours swapped: shapes right, colours right, bindings wrong
    c = constraints(dets, parse_prompt("a green circle and a red square"))
    assert c == [False, False, True, True, True, True, True]
    frac, strict = score(render(scene, 32)[None], [parse_prompt("a green circle and a red square")])
    assert frac[0] == pytest.approx(5 / 7) and not strict[0]


def test_noise_and_blur_do_not_create_objects():
    scene = [Obj("square", "yellow", 0.5, 0.5, 0.3)]
    img = render(scene, 32)[None]
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 0.05, img.shape), 0, 1)
    dets = detect(noisy)[0]
    assert [(d.shape, d.colour) for d in dets] == [("square", "yellow")]


def test_shapes_reward_registry_and_metadata():
    reward = make_reward("shapes")
    specs, _, imgs = _ground_truth(8, seed=3)
    meta = [{} for _ in specs]
    r = reward(torch.from_numpy(imgs), [s.text() for s in specs], meta)
    assert r.shape == (8,) and r.dtype == torch.float32
    assert torch.all(r == 1)
    assert all(m["strict"] for m in meta) and {m["category"] for m in meta} <= set(CATEGORIES)


def test_strict_shapes_reward_is_one_only_where_every_constraint_holds():
    specs, _, imgs = _ground_truth(6, seed=5)
    prompts = [s.text() for s in specs]
    frac = make_reward("shapes")(torch.from_numpy(imgs), prompts)
    strict = make_reward("shapes_strict")(torch.from_numpy(imgs), prompts)
    assert torch.all(frac == 1) and torch.all(strict == 1)
    blank = torch.zeros(2, 3, 32, 32)  # no objects: some constraints fail, so no strict success
    assert torch.equal(make_reward("shapes_strict")(blank, prompts[:2]), torch.zeros(2))
    both = make_reward("shapes:1,shapes_strict:1")
    meta = [{} for _ in prompts]
    assert torch.equal(both(torch.from_numpy(imgs), prompts, meta), frac + strict)
    assert meta[0]["rewards"] == {"shapes": 1.0, "shapes_strict": 1.0}


def test_graded_credit_for_near_misses_by_hand():
    # relation: a red circle at x=0.25 and a green square at x=0.75, both at y=0.5: margin 0.5 to the
    # right, so "left of" earns 0.5 + 0.5 tanh(0.5 / 0.1) and "right of" 0.5 - 0.5 tanh(5)
    scene = [Obj("circle", "red", 0.25, 0.5, 0.3), Obj("square", "green", 0.75, 0.5, 0.3)]
    dets = detect(render(scene, 32)[None])[0]
    margin = relation_margin((dets[0].cx, dets[0].cy), (dets[1].cx, dets[1].cy), "left_of")
    if dets[0].colour != "red":
        margin = relation_margin((dets[1].cx, dets[1].cy), (dets[0].cx, dets[0].cy), "left_of")
    assert margin == pytest.approx(0.5, abs=0.03)
    left = constraint_values(dets, parse_prompt("a red circle to the left of a green square"), graded=True)
    right = constraint_values(dets, parse_prompt("a red circle to the right of a green square"), graded=True)
    assert left[:-1] == right[:-1] == [1.0] * (len(left) - 1)
    assert left[-1] == pytest.approx(0.5 + 0.5 * math.tanh(margin / 0.1))
    assert right[-1] == pytest.approx(0.5 - 0.5 * math.tanh(margin / 0.1))
    assert constraint_values(dets, parse_prompt("a red circle to the right of a green square")) == [1.0] * 7 + [0.0]
    # counts: two blue circles where three were asked; graded 1 - 1/3 for the phrase and the total
    two = [Obj("circle", "blue", 0.25, 0.3, 0.25), Obj("circle", "blue", 0.7, 0.7, 0.25)]
    dets = detect(render(two, 32)[None])[0]
    spec = parse_prompt("three blue circles")
    assert constraint_values(dets, spec) == [0.0, 0.0, 0.0, 0.0]  # phrase, shape, colour, total
    like = [d.like("circle") for d in dets]  # rendered circles look like circles, not squares
    assert min(like) > 0.75 and all(d.like("square") < 0.25 for d in dets)
    graded = constraint_values(dets, spec, graded=True)
    assert graded == pytest.approx([sum(like) / 3] + [2 / 3] * 3)  # the phrase: two of three matched
    frac, strict = score(render(two, 32)[None], [spec], graded=True)
    assert frac[0] == pytest.approx(np.mean(graded)) and not strict[0]
    # a right image scores 1 graded or not, and strict success never depends on the grading
    specs, _, imgs = _ground_truth(6, seed=5)
    prompts = [s.text() for s in specs]
    graded = make_reward("shapes_graded")(torch.from_numpy(imgs), prompts)
    assert graded.shape == (6,) and torch.all(graded > 0.9)
    assert torch.all(graded <= make_reward("shapes")(torch.from_numpy(imgs), prompts) + 1e-6)
    blank = torch.zeros(2, 3, 32, 32)
    assert torch.equal(make_reward("shapes_graded")(blank, prompts[:2]), make_reward("shapes")(blank, prompts[:2]))


def test_graded_shape_credit_goes_to_distinct_look_alikes_by_hand():
    spec = parse_prompt("a green square and a green circle")  # phrases, square, circle, green, total

    def det(shape, likeness, cx):
        return Detection(shape, "green", cx, 0.5, 60, likeness)

    crisp = [det("square", (0.0, 1.0, 0.0), 0.3), det("circle", (1.0, 0.0, 0.0), 0.7)]
    assert constraint_values(crisp, spec, graded=True) == [1.0] * 6
    # two rounded squares, both classified circles: half a square each, but only one can be the
    # square and the circle phrase has one object too many
    twins = [det("circle", (0.5, 0.5, 0.0), 0.3), det("circle", (0.5, 0.5, 0.0), 0.7)]
    assert constraint_values(twins, spec) == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert constraint_values(twins, spec, graded=True) == pytest.approx([0.5, 0.0, 0.0, 0.0, 1.0, 1.0])
    # a crisp circle beside a rounded square: the square phrase gets the look-alike's 0.6
    near = [det("circle", (1.0, 0.0, 0.0), 0.3), det("circle", (0.4, 0.6, 0.0), 0.7)]
    assert constraint_values(near, spec, graded=True) == pytest.approx([0.6, 0.0, 0.0, 0.0, 1.0, 1.0])
    # a component of the wrong colour earns nothing however square it looks
    red = [Detection("square", "red", 0.3, 0.5, 60, (0.0, 1.0, 0.0)), crisp[1]]
    assert constraint_values(red, spec, graded=True)[0] == 0.0
    # likeness of drawn shapes: each sums to 1 and the classifier's shape is the most alike
    specs, _, imgs = _ground_truth(12, seed=7)
    for d in (d for ds in detect(imgs) for d in ds):
        assert sum(d.likeness) == pytest.approx(1.0)
        assert max(SHAPES, key=d.like) == d.shape


def test_failure_kinds_by_hand():
    def d(shape, colour, cx=0.5, cy=0.5):
        return Detection(shape, colour, cx, cy, 60)

    spec = parse_prompt("a red circle to the left of a green square")
    assert failure([d("circle", "red", 0.2), d("square", "green", 0.8)], spec) is None
    assert failure([d("circle", "red", 0.2)], spec) == "too few objects"
    extra = [d("circle", "red", 0.2), d("square", "green", 0.8), d("square", "blue")]
    assert failure(extra, spec) == "too many objects"
    assert failure([d("circle", "red", 0.2), d("circle", "green", 0.8)], spec) == "shape"
    assert failure([d("circle", "red", 0.2), d("square", "blue", 0.8)], spec) == "colour"
    assert failure([d("circle", "green", 0.2), d("square", "red", 0.8)], spec) == "binding"
    assert failure([d("circle", "red", 0.8), d("square", "green", 0.2)], spec) == "relation"
    # an uncoloured phrase takes any colour; extra colours where some phrase has none are no miss
    any_colour = parse_prompt("a circle and a green square")
    assert failure([d("circle", "blue"), d("square", "green", 0.8)], any_colour) is None
    assert failure([d("circle", "blue"), d("square", "blue", 0.8)], any_colour) == "colour"
    # where every phrase names a colour, each colour's count is exact: an extra red object misses red
    named = parse_prompt("a red circle and a green square")  # phrases, circle, square, red, green, total
    extra_red = [d("circle", "red", 0.2), d("square", "green", 0.8), d("square", "red", 0.5, 0.2)]
    assert constraints(extra_red, named) == [True, True, True, False, False, True, False]

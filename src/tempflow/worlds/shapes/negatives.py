"""Wrong captions for a scene: a caption of the grammar that the scene does not satisfy.

Used to measure the verifier's false-acceptance rate. Each mutation is chosen so that the caption is
false for the scene by construction (a colour or shape the scene lacks, a wrong count, the opposite
or a perpendicular relation, swapped colours).
"""

from __future__ import annotations

import random
from dataclasses import replace

from tempflow.errors import PromptError
from tempflow.worlds.shapes.grammar import COLOURS, MAX_OBJECTS, SHAPES, Spec, parse_prompt
from tempflow.worlds.shapes.scenes import Obj

OTHER_RELATIONS = {"left_of": ("right_of", "above", "below"), "right_of": ("left_of", "above", "below"),
                   "above": ("below", "left_of", "right_of"), "below": ("above", "left_of", "right_of")}


def _candidates(spec: Spec, scene: list[Obj]) -> list[Spec]:
    out: list[Spec] = []
    used_colours = {o.colour for o in scene}
    used_shapes = {o.shape for o in scene}
    for i, p in enumerate(spec.phrases):
        def put(q, i=i):
            return replace(spec, phrases=tuple(q if k == i else x for k, x in enumerate(spec.phrases)))
        out += [put(replace(p, colour=c)) for c in COLOURS if c not in used_colours]
        out += [put(replace(p, shape=s)) for s in SHAPES if s not in used_shapes]
        if spec.category == "counting":
            out += [put(replace(p, count=n)) for n in range(1, MAX_OBJECTS + 1) if n != p.count]
    if spec.relation:
        out += [replace(spec, relation=r) for r in OTHER_RELATIONS[spec.relation]]
    if len(spec.phrases) == 2 and all(p.colour for p in spec.phrases):
        a, b = spec.phrases
        if a.colour != b.colour and a.shape != b.shape:
            out.append(replace(spec, phrases=(replace(a, colour=b.colour), replace(b, colour=a.colour))))
    return out


def _valid(spec: Spec) -> bool:
    try:
        parse_prompt(spec.text())
        return True
    except PromptError:
        return False


def wrong_caption(spec: Spec, scene: list[Obj], rng: random.Random) -> Spec:
    """A random false caption for a scene drawn for `spec`, in the same category where possible."""
    options = [s for s in _candidates(spec, scene) if _valid(s)]
    if not options:
        raise ValueError(f"no wrong caption for {spec.text()!r}")
    return rng.choice(options)

"""Verifier accuracy on rendered ground truth and on wrong captions, and scoring speed.

    python benchmarks/verifier.py [--n 2000] [--res 32]

Exits with status 1 where a category misses what docs/shapes.md states: every true caption
accepted and no wrong caption accepted, in each category (a pooled rate can hide a miss in one).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import numpy as np
import torch

from tempflow.worlds.shapes.grammar import CATEGORIES
from tempflow.worlds.shapes.negatives import wrong_caption
from tempflow.worlds.shapes.prompts import random_spec
from tempflow.worlds.shapes.scenes import render_batch, scene_for
from tempflow.worlds.shapes.verifier import score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="scenes (default 2000)")
    ap.add_argument("--res", type=int, default=32, help="image size (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    specs = [random_spec(rng) for _ in range(args.n)]
    scenes = [scene_for(s, rng) for s in specs]
    wrong = [wrong_caption(s, sc, rng) for s, sc in zip(specs, scenes)]
    imgs = render_batch(scenes, args.res)
    _, ok = score(imgs, specs)
    _, fooled = score(imgs, wrong)
    rows = defaultdict(lambda: ([], []))
    for s, a, b in zip(specs, ok, fooled):
        rows[s.category][0].append(a)
        rows[s.category][1].append(b)
    print(f"{'category':<15}{'n':>6}{'true accepted':>15}{'wrong accepted':>16}")
    for cat in CATEGORIES:
        a, b = rows[cat]
        print(f"{cat:<15}{len(a):>6}{np.mean(a):>15.4f}{np.mean(b):>16.4f}")
    print(f"{'all':<15}{len(ok):>6}{ok.mean():>15.4f}{fooled.mean():>16.4f}")
    misses = [cat for cat in CATEGORIES if not all(rows[cat][0]) or any(rows[cat][1])]
    batch = imgs[:256]
    score(batch, specs[:256])  # warm-up
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        score(batch, specs[:256])
    dt = (time.perf_counter() - t0) / reps
    print(f"scoring 256 images at {args.res}x{args.res}: {dt * 1000:.1f} ms (one thread)")
    if misses:
        print(f"categories short of 1.0 true / 0.0 wrong accepted: {', '.join(misses)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()

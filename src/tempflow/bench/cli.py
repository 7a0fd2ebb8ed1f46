"""Arguments of `tempflow bench learning|gradient|system` (kept free of heavy imports).

Presets are named in --preset-dir or given as YAML paths; without --presets a benchmark runs every
training preset of that folder, in name order.
"""

from __future__ import annotations

import argparse

from tempflow.bench.presets import PRESET_DIR, Budget, training_presets
from tempflow.errors import TempflowError

SHORT_EVAL_LINES = 54  # evaluation lines in short mode: during the runs and for the final models
SHORT_OVERRIDES = ["rollout.prompts_per_iter=4", f"eval.limit={SHORT_EVAL_LINES}", "eval.every=2",
                   "eval.num_steps=10", "checkpoint_every=4"]


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TempflowError(f"{what} must be comma-separated numbers, e.g. 0.5,0.6; got {text!r}") from None


def _presets(args: argparse.Namespace) -> list[str]:
    """--presets, or every training preset of --preset-dir when it is not given."""
    if args.presets is None:
        return training_presets(args.preset_dir)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets:
        raise TempflowError("--presets needs at least one preset: a name in --preset-dir or a YAML path")
    return presets


def _config(args: argparse.Namespace) -> str:
    """--config, or the first training preset of --preset-dir when it is not given."""
    return args.config or training_presets(args.preset_dir)[0]


def _cmd_learning(args: argparse.Namespace) -> int:
    from tempflow.bench.learning import bench_learning

    presets = _presets(args)
    seeds = [int(x) for x in _floats(args.seeds, "--seeds")] if args.seeds else list(range(args.num_seeds))
    if not seeds:
        raise TempflowError("--num-seeds must be >= 1")
    budget = Budget.parse(args.budget or ("4it" if args.short else "600s"))
    overrides = [*(SHORT_OVERRIDES if args.short else []), *args.overrides]
    if args.short and not args.seeds:
        seeds = seeds[:1]
    final = None if args.final_eval < 0 else (SHORT_EVAL_LINES if args.short and not args.final_eval
                                              else args.final_eval)
    guidance = _floats(args.final_guidance, "--final-guidance") if args.final_guidance else None
    if guidance and min(guidance) < 1:
        raise TempflowError(f"--final-guidance values must be >= 1 (1: no guidance), got {args.final_guidance}")
    summary = bench_learning(presets, seeds, budget, args.out, overrides, _floats(args.thresholds, "--thresholds"),
                             baseline=args.baseline, method=args.method, final_eval=final,
                             final_samples=args.final_samples, final_seed=args.final_seed, final_guidance=guidance,
                             preset_dir=args.preset_dir)
    print(summary["table"])
    print(f"summary: {args.out}/summary.md, {args.out}/summary.json; plots: {args.out}/learning.png")
    return 0


def _cmd_gradient(args: argparse.Namespace) -> int:
    from tempflow.bench.gradient import bench_gradient

    presets = _presets(args)
    overrides = [*(SHORT_OVERRIDES if args.short else []), *args.overrides]
    summary = bench_gradient(presets, args.iterations, overrides, args.out, args.preset_dir)
    print(summary["table"])
    if args.out:
        print(f"summary: {args.out}/gradient.md, {args.out}/gradient.json")
    return 0


def _processes(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise TempflowError(f"--processes must be comma-separated counts >= 1, e.g. 1,8; got {text!r}")
    return counts


def _cmd_estimate(args: argparse.Namespace) -> int:
    import json

    from tempflow.bench.estimate import estimate, estimate_table, markdown_table
    from tempflow.bench.presets import expand_configs, load_preset

    configs = expand_configs(_config(args))
    ests = [estimate(load_preset(c, args.overrides, args.preset_dir), w, name=c)
            for c in configs for w in _processes(args.processes)]
    if args.json:
        print(json.dumps([e.to_json() for e in ests], indent=1))
    elif args.markdown:
        print(markdown_table(ests))
    else:
        print("\n\n".join(estimate_table(e) for e in ests))
    return 0


def _cmd_system(args: argparse.Namespace) -> int:
    from tempflow.bench.system import bench_system, system_table

    if args.estimate:
        return _cmd_estimate(args)
    overrides = [*(SHORT_OVERRIDES if args.short else []), *args.overrides]
    res = bench_system(_config(args), args.iterations, overrides, args.out, args.preset_dir)
    print(system_table(res))
    return 0


def _add_preset_dir(q: argparse.ArgumentParser) -> None:
    q.add_argument("--preset-dir", default=PRESET_DIR, metavar="DIR",
                   help=f"folder of the presets given by name: NAME is DIR/NAME.yaml, a name ending in .yaml is a "
                        f"path (default {PRESET_DIR}, the shapes world's presets)")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: learning efficiency and gradient signal of presets, "
                                     "system efficiency of one")
    bench = p.add_subparsers(dest="bench", required=True)

    q = bench.add_parser("learning", help="train several presets over seeds for one budget; table and plots")
    q.add_argument("--presets", help="comma-separated preset names in --preset-dir or YAML paths "
                                     "(default: every training preset in --preset-dir, in name order)")
    _add_preset_dir(q)
    q.add_argument("--num-seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    q.add_argument("--seeds", help="explicit comma-separated seeds instead of --num-seeds")
    q.add_argument("--budget", help="per run: seconds of training (600s), model calls (2e6nfe) or "
                                    "iterations (100it); default 600s (4it with --short)")
    q.add_argument("--thresholds", default="0.5,0.55,0.6", help="overall accuracies to time (default 0.5,0.55,0.6)")
    q.add_argument("--baseline", help="preset the ratios divide by (default: the first of --presets)")
    q.add_argument("--method", help="preset compared with the baseline (default: the second of --presets)")
    q.add_argument("--out", default="runs/bench/learning", help="output folder (default runs/bench/learning)")
    q.add_argument("--final-eval", type=int, default=0, metavar="LINES",
                   help="evaluate each final model on the whole evaluation set (0, the default; 54 with --short), "
                        "on an even spread of LINES, or not at all (-1)")
    q.add_argument("--final-samples", type=int, metavar="K",
                   help="samples per line in that evaluation, of the final models and of the starting model "
                        "alike (default: the runs' eval.samples); with K > 1 pass@K is reported beside")
    q.add_argument("--final-seed", type=int, metavar="SEED",
                   help="first seed of that evaluation (default: the runs' eval.seed)")
    q.add_argument("--final-guidance", metavar="G,G",
                   help="also evaluate the final models and the starting model at each of these guidances, e.g. "
                        "1,3 (default: only at each run's own eval.guidance)")
    q.add_argument("--short", action="store_true", help="a few minutes: one seed, 4 iterations, small evaluations")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every preset (repeatable)")
    q.set_defaults(fn=_cmd_learning)

    q = bench.add_parser("gradient", help="how much of one iteration's policy gradient is signal, per preset")
    q.add_argument("--presets", help="comma-separated preset names in --preset-dir or YAML paths "
                                     "(default: every training preset in --preset-dir, in name order)")
    _add_preset_dir(q)
    q.add_argument("--iterations", type=int, default=24,
                   help="independent rollouts' gradients per preset, all at the starting weights (default 24)")
    q.add_argument("--out", help="write gradient.json and gradient.md here")
    q.add_argument("--short", action="store_true", help="smaller iterations")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every preset (repeatable)")
    q.set_defaults(fn=_cmd_gradient)

    q = bench.add_parser("system", help="one preset's iteration by phase against the compute limit; or (--estimate) "
                                        "a config's memory per process at real sizes, without running it")
    q.add_argument("--config",
                   help="preset name in --preset-dir or YAML path (default: the first training preset in --preset-dir, "
                        "in name order); with --estimate also several, comma-separated, and globs such as "
                        "'configs/sd35m/*.yaml' (a glob skips base.yaml, the shared part)")
    _add_preset_dir(q)
    q.add_argument("--estimate", action="store_true",
                   help="print the estimated per-process peak memory of the config's rollout and update at its real "
                        "sizes (SD3 and FLUX pipelines, from their configurations: nothing is downloaded or run)")
    q.add_argument("--processes", default="1", help="with --estimate: comma-separated numbers of processes (default 1)")
    q.add_argument("--json", action="store_true", help="with --estimate: JSON instead of a table")
    q.add_argument("--markdown", action="store_true", help="with --estimate: one markdown table of every config")
    q.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up (default 3)")
    q.add_argument("--out", help="write system.json here")
    q.add_argument("--short", action="store_true", help="smaller iterations")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    q.set_defaults(fn=_cmd_system)

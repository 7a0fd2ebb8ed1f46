"""The `tempflow` command: pretrain | train | sample | eval | prompts | bench | serve-reward | export."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from tempflow.errors import PromptError, TempflowError

if TYPE_CHECKING:
    from tempflow.models import FlowModel


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help=f"YAML preset (default: {default or 'the world default, configs/WORLD/pretrain.yaml'})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.width=256 (repeatable)")


def _check_writable(path: str | None, flag: str, folder: bool = True) -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder is asked
    (or the other way round), a file in the way of the folders to create, or a place without write
    permission."""
    if not path:
        return
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise TempflowError(f"{flag} {path!r} is a file; give a folder (new or empty) to write into")
    if not folder and p.is_dir():
        raise TempflowError(f"{flag} {path!r} is a folder; give the path of a file to write")
    q = p if folder else p.parent
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise TempflowError(f"{flag} {path!r}: {str(q)!r} is a file, so no folder can be made there; "
                            "choose another path")
    try:  # the one sure test of a place (permissions, a read-only or special file system): write there
        os.rmdir(tempfile.mkdtemp(prefix=".tempflow-probe-", dir=q))
    except OSError as e:
        raise TempflowError(f"{flag} {path!r}: cannot write in {str(q)!r} ({e.strerror}); choose a place you "
                            "can write to") from None


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from tempflow.worlds import get_world

    world = get_world(args.world)
    _check_writable(args.out, "--out")
    model_dir = world.pretrain(args.config, args.overrides, args.out)
    print(f"model written to {model_dir}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tempflow.config import load_config
    from tempflow.training.config import TrainConfig

    _import_plugins(args.imports)

    if args.resume:
        from tempflow.training.run import resume_config

        run_dir = Path(args.resume)
        cfg = resume_config(run_dir, args.overrides)
    else:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        _check_writable(args.out, "--out")
        run_dir = Path(args.out)
    from tempflow.training.run import before_after, read_metrics, train

    final = train(cfg, run_dir, resume=bool(args.resume))
    if _launched_rank() != 0:  # one report, from the main process
        return 0
    table = before_after(read_metrics(run_dir / "metrics.jsonl"))
    if table:
        print(table)
    print(f"final model: {final}\ncurve: {run_dir / 'curve.png'}\nmetrics: {run_dir / 'metrics.jsonl'}")
    return 0


def _prompts_from(args: argparse.Namespace) -> list[str]:
    from tempflow.prompts import load_prompts

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += load_prompts(args.prompts)
    if not prompts:
        raise PromptError("no prompts: give --prompt \"a red circle\" or --prompts FILE")
    return prompts


def _load_sampling_model(args: argparse.Namespace) -> FlowModel:
    """The model of `sample` and `eval`, compiled with --compile (a run's stored options stay as they are)."""
    from tempflow.models import compile_flow, load_model

    model = load_model(args.model)
    if args.compile:
        compile_flow(model)  # type: ignore[arg-type]
    return model


def _cmd_sample(args: argparse.Namespace) -> int:
    from tempflow.images import save_grid, save_pngs
    from tempflow.sampling import generate

    _check_writable(args.out, "--out")
    _import_plugins(args.imports)
    prompts = _prompts_from(args)
    model = _load_sampling_model(args)
    model.check_prompts(prompts)
    rows = [(p, k) for p in prompts for k in range(args.num)]
    texts = [p for p, _ in rows]
    seeds = [args.seed + i for i in range(len(rows))]
    images = generate(model, texts, seeds, args.steps, args.guidance, solver=args.solver)
    names = [f"{i:04d}_{p.replace(' ', '_')}" for i, p in enumerate(texts)]
    save_pngs(images, args.out, names)
    grid = save_grid(images, Path(args.out) / "grid.png", texts, cols=min(8, len(rows)))
    print(f"{len(rows)} images and {grid} written to {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tempflow.evaluate import evaluate, format_failures, format_table, prompt_sets_scoring
    from tempflow.images import save_grid
    from tempflow.io import write_json
    from tempflow.prompts import spread

    _check_writable(args.out, "--out", folder=False)
    _check_writable(args.grid, "--grid", folder=False)
    _import_plugins(args.imports)
    reward = None
    if args.reward:
        from tempflow.rewards import make_reward

        reward = make_reward(args.reward)
    sets = [s.strip() for s in args.prompts.split(",") if s.strip()]
    if not sets:
        raise PromptError("--prompts names no prompt set; give a set name or a file, e.g. --prompts shapes-eval")
    lines, scoring = prompt_sets_scoring(sets, reward, args.limit)
    if args.failures and not scoring.failure_kinds:
        raise PromptError("--failures needs a world with a verifier; a reward has no kinds of miss: drop --failures")
    model = _load_sampling_model(args)
    model.check_prompts(lines)
    summary, images = evaluate(model, lines, scoring, args.steps, args.guidance, args.seed, samples=args.samples,
                               solver=args.solver)
    summary.update({"model": args.model, "prompts": args.prompts, "reward": args.reward, "steps": args.steps,
                    "guidance": args.guidance, "seed": args.seed, "solver": args.solver})
    print(format_table(summary))
    if args.failures:
        print(format_failures(summary))
    if args.out:
        write_json(args.out, summary)
        print(f"metrics written to {args.out}")
    if args.grid:
        rows = spread(len(lines), args.grid_size)
        save_grid(images[rows], args.grid, [lines[i] for i in rows], cols=8)
        print(f"sample grid written to {args.grid}")
    return 0


def _cmd_prompts(args: argparse.Namespace) -> int:
    from tempflow.prompts import load_prompts
    from tempflow.worlds import world_of

    _import_plugins(args.imports)
    lines = load_prompts(args.set)
    world = world_of(lines, [args.set])
    if (args.category is not None or args.show_category) and (world is None or not world.categories):
        raise PromptError(f"the prompts of {args.set!r} are not of a world with categories; drop --category and "
                          "--show-category")
    if args.category is not None and args.category not in world.categories:  # type: ignore[union-attr]
        raise PromptError(f"unknown category {args.category!r}; choose one of "
                          f"{', '.join(world.categories)}")  # type: ignore[union-attr]
    for p in lines:
        category = world.category(p) if world is not None else None
        if args.category in (None, category):
            print(f"{category}\t{p}" if args.show_category else p)
    return 0


def _import_plugins(modules: list[str]) -> None:
    """Import the user's modules (which register rewards, for example) before anything is built."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or an error inside the module: one line, no traceback
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TempflowError(f"cannot import --import module {name!r}: {first}; it must be importable "
                                "(on PYTHONPATH or in the current folder)") from None


def _add_import_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this module first, e.g. one that registers your own rewards (repeatable)")


def _cmd_serve_reward(args: argparse.Namespace) -> int:
    from tempflow.rewards import server

    _import_plugins(args.imports)

    defaults = {"max_batch": server.MAX_BATCH, "workers": server.WORKERS, "max_decodes": server.MAX_DECODES}
    limits = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}
    return server.run_server(args.reward, args.host, args.port, args.token, quiet=args.quiet,
                             max_bytes=args.max_bytes, max_pixels=args.max_pixels,
                             max_image_pixels=args.max_image_pixels, **limits)


def _add_serve_reward_parser(sub: argparse._SubParsersAction) -> None:
    # the defaults live in tempflow.rewards.server (which imports torch: not imported here, to keep --help fast)
    p = sub.add_parser("serve-reward", help="serve a reward over HTTP to the 'remote' reward of other processes",
                       description="Serve a reward over HTTP. Pass the token in the environment: "
                                   "TEMPFLOW_REWARD_TOKEN=... tempflow serve-reward --reward NAME (the trainer's "
                                   "'remote' reward reads the same variable); a --token on the command line is "
                                   "visible to every user of the machine in the process list.")
    p.add_argument("--reward", required=True, help="reward spec, e.g. shapes or pickscore:1,aesthetic:0.5")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (default: $TEMPFLOW_REWARD_TOKEN if set; "
                                   "prefer the variable: a token given here shows in the process list)")
    p.add_argument("--max-batch", type=int, help="images per request (default 256)")
    p.add_argument("--max-pixels", type=int,
                   help="pixels per request, all images together (default: max-batch images of the size the "
                        "reward declares, 64x64 for shapes, else 2^26)")
    p.add_argument("--max-image-pixels", type=int,
                   help="pixels per image, checked in each PNG's header before decoding (default 2048x2048 = "
                        "2^22, at most --max-pixels)")
    p.add_argument("--max-bytes", type=int,
                   help="request body size in bytes (default: what a raw request of --max-pixels needs, at most "
                        "128 MiB)")
    p.add_argument("--workers", type=int, help="connections served at once; more wait (default 8)")
    p.add_argument("--max-decodes", type=int,
                   help="requests decoded or scored at once, each holding its decoded images (default 2)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    _add_import_arg(p)
    p.set_defaults(fn=_cmd_serve_reward)


def _cmd_export(args: argparse.Namespace) -> int:
    from tempflow.models.export import export_run

    _check_writable(args.out, "--out")
    out = export_run(args.run_dir, args.out, merged=args.merged)
    what = "model folder with the LoRA fused in" if args.merged else "LoRA (load it with pipe.load_lora_weights)"
    print(f"{what} written to {out}")
    return 0


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's trained (EMA) LoRA in diffusers' format, or a merged model")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder (its final/ model is exported)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--merged", action="store_true",
                   help="write a whole model folder (diffusers: save_pretrained) with the LoRA fused into the weights")
    p.set_defaults(fn=_cmd_export)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `tempflow: error: PROG: MESSAGE (see PROG --help)`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tempflow: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tempflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a world's built-in model from scratch (the shapes model)")
    _add_config_args(p, None)
    p.add_argument("--world", default="shapes", help="the world whose model is pretrained (default shapes)")
    p.add_argument("--out", default="runs/pretrain", help="run folder (default: runs/pretrain)")
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser("train", help="fine-tune with TempFlow-GRPO, Flow-GRPO or an ablation preset")
    _add_config_args(p, "configs/shapes/tempflow.yaml")
    p.add_argument("--out", default="runs/train", help="run folder (default: runs/train)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")
    _add_import_arg(p)
    p.set_defaults(fn=_cmd_train)

    def sampling_args(q: argparse.ArgumentParser, steps: int) -> None:
        q.add_argument("--model", default="shapes-base", help="shapes-base or a model folder")
        q.add_argument("--steps", type=int, default=steps, help=f"ODE steps (default {steps})")
        q.add_argument("--guidance", type=float, default=3.0,
                       help="classifier-free guidance (default 3.0, the best for shapes-base)")
        q.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
        q.add_argument("--solver", choices=("euler", "dpm2"), default="euler",
                       help="ODE solver: euler (default) or dpm2 (diffusers' DPM-Solver++, second order)")
        q.add_argument("--compile", action="store_true",
                       help="torch.compile the flow transformer: faster calls after a warm-up of a minute or so")

    p = sub.add_parser("sample", help="draw images for prompts; writes PNGs and a labelled grid")
    sampling_args(p, 40)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="shapes-train, shapes-eval or a text file with one prompt per line")
    p.add_argument("--num", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    _add_import_arg(p)
    p.set_defaults(fn=_cmd_sample)

    p = sub.add_parser("eval", help="accuracy per category by a world's verifier, or a reward's mean per prompt set")
    sampling_args(p, 40)
    p.add_argument("--prompts", default="shapes-eval",
                   help="comma-separated prompt sets: shapes-eval (default), shapes-train or text files")
    p.add_argument("--reward", help="score with this reward spec (e.g. pickscore) and report its mean per prompt "
                                    "set, instead of the verifier of the prompts' world")
    _add_import_arg(p)
    p.add_argument("--limit", type=int, default=0, help="evaluate an even spread of this many lines")
    p.add_argument("--samples", type=int, default=1,
                   help="samples per line (default 1); with K > 1 the accuracy is the mean over the samples and "
                        "pass@K (a line counts when any of its samples is right) is reported beside it")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--grid", help="write a labelled sample grid (PNG) here")
    p.add_argument("--grid-size", type=int, default=48, help="images in the grid (default 48)")
    p.add_argument("--failures", action="store_true",
                   help="also print why samples miss: per category, the share that has too few or too many "
                        "objects, the wrong shapes, the wrong colours, shapes and colours paired wrongly, or "
                        "only the relation wrong")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("prompts", help="print a prompt set, optionally one category")
    p.add_argument("--set", default="shapes-eval", help="shapes-eval, shapes-train or a file")
    p.add_argument("--category", help="only this category")
    p.add_argument("--show-category", action="store_true", help="print the category before each prompt")
    _add_import_arg(p)
    p.set_defaults(fn=_cmd_prompts)

    from tempflow.bench.cli import add_bench_parser

    add_bench_parser(sub)
    _add_serve_reward_parser(sub)
    _add_export_parser(sub)
    return parser


def _check_counts(args: argparse.Namespace) -> None:
    """The numeric flags' ranges, and a bench --out that cannot be written, before any work."""
    for name in ("steps", "num", "limit", "grid_size", "samples", "iterations"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "limit" else 1):
            raise TempflowError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    seed = getattr(args, "seed", None)
    if isinstance(seed, int) and not 0 <= seed < 2**62:
        raise TempflowError(f"--seed must be between 0 and 2**62 - 1, got {seed}")
    guidance = getattr(args, "guidance", None)
    if isinstance(guidance, float) and not (math.isfinite(guidance) and guidance >= 1.0):
        raise TempflowError(f"--guidance must be a finite number >= 1 (1 disables guidance), got {guidance}")
    if args.command == "bench" and getattr(args, "out", None):
        _check_writable(args.out, "--out")


def _launched_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate, mpirun) announced it; 0 without one."""
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def _leave_process_group() -> None:
    """After an error in a launched run: leave the process group (if one was set up) before exiting,
    rather than at interpreter shutdown, where gloo may abort."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_counts(args)
        return args.fn(args)
    except TempflowError as e:
        _leave_process_group()
        # in a launched run every process meets the same error (configuration, checkpoint, a reward
        # failure that all processes agree on): the main process reports it
        if _launched_rank() == 0:
            print(f"tempflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tempflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`tempflow prompts | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, as the shell's own tools exit


if __name__ == "__main__":
    raise SystemExit(main())

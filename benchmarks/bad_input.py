"""Bad input, as a hostile new user types it: is every mistake refused with one clear line?

    .venv/bin/python benchmarks/bad_input.py [--jobs 2] [--only SUBSTRING] [--timeout 120] [--keep]

Runs `python -m tempflow ...` once per case (about 130 cases: configuration, presets, algorithms, prompts,
models, rewards, run folders, export, numeric flags, serve-reward, bench, pretrain), each in a fresh temp
folder with the repository root as the working directory, `--jobs` at a time. A case may first write
something broken (a prompt file, a model folder with a truncated safetensors file, a run whose every
checkpoint is corrupt, a file where a folder should be, a busy port, ...). Cases that need a model use one
tiny shapes model built once at the start; cases that need a finished run use one tiny run trained once.

A case is *refused cleanly* when the command exits with code 2 (not 0, not 1, not a signal, within the
timeout), prints no "Traceback", and its stderr, without tqdm progress bars and `tempflow: warning:` lines,
is exactly one non-empty line starting `tempflow: error: `; and, where the case protects files that were
there before (a run in the way of --out, a file given as --out), they are unchanged afterwards (no work
lost). Prints a table (case, exit code, verdict, the error line), then for each case not refused cleanly
its command line and the tail of its stderr, then "N of M refused cleanly". Exit code 0 only if every case
is refused cleanly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "tempflow: error: "
TINY_MODEL = dict(image_size=16, patch_size=4, width=32, depth=1, heads=2, text_width=16, text_depth=1)
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
WEIGHTS = "model/" + TRANSFORMER  # the transformer weights of a case's copy of the model
_TQDM = re.compile(r"\d+%\|")  # a tqdm progress bar: "train:  40%|####      | 2/5it [...]"


# ---- the context a case runs in --------------------------------------------------------------------------


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (or of path itself), by path relative to it."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)) if p != path else ".": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@dataclass
class Ctx:
    """What a case's setup may use and change: its own temp folder, the shared tiny model and run,
    placeholder values for its command line, files it protects, sockets held open while it runs."""

    tmp: Path
    model: Path
    run: Path | None
    values: dict[str, str] = field(default_factory=dict)
    protected: dict[Path, dict[str, str]] = field(default_factory=dict)
    sockets: list[socket.socket] = field(default_factory=list)

    def protect(self, path: Path) -> None:
        """Record path's files: the case fails if any of them is changed or deleted by the command."""
        self.protected[path] = _digest(path)

    def lost_work(self) -> str | None:
        for path, before in self.protected.items():
            after = _digest(path) if path.exists() else {}
            changed = [k for k, v in before.items() if after.get(k) != v]
            if changed:
                return f"lost work: {path.name}/{changed[0]} changed or deleted"
        return None


Setup = Callable[[Ctx], None]


@dataclass
class Case:
    name: str
    args: list[str]  # after `python -m tempflow`; {tmp}, {model}, {run} and setup's values are filled in
    setup: Setup | None = None
    timeout: float | None = None  # seconds; None: --timeout
    needs_run: bool = False  # uses the shared finished run


@dataclass
class Result:
    case: Case
    cmd: list[str]
    rc: int | None
    ok: bool
    verdict: str
    line: str
    tail: list[str]
    seconds: float


# ---- setups --------------------------------------------------------------------------------------------


def chain(*steps: Setup) -> Setup:
    def setup(ctx: Ctx) -> None:
        for step in steps:
            step(ctx)

    return setup


def write(rel: str, data: str | bytes) -> Setup:
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def mkdir(rel: str) -> Setup:
    return lambda ctx: (ctx.tmp / rel).mkdir(parents=True, exist_ok=True)


def protect(rel: str) -> Setup:
    return lambda ctx: ctx.protect(ctx.tmp / rel)


def copy_model(rel: str = "model") -> Setup:
    return lambda ctx: shutil.copytree(ctx.model, ctx.tmp / rel)


def copy_run(rel: str = "run_in") -> Setup:
    def setup(ctx: Ctx) -> None:
        assert ctx.run is not None
        shutil.copytree(ctx.run, ctx.tmp / rel, ignore=shutil.ignore_patterns(".lock"))

    return setup


def remove(rel: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    return setup


def truncate(rel: str, keep: float = 0.5) -> Setup:
    """Cut a file (or every file matching a glob) to a fraction of its size, as a torn write leaves it."""

    def setup(ctx: Ctx) -> None:
        for path in ctx.tmp.glob(rel):
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * keep)])

    return setup


def poison(rel: str) -> Setup:
    """Set every value of the first floating tensor of a safetensors file (or of every match of a glob) to NaN."""

    def setup(ctx: Ctx) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        for path in ctx.tmp.glob(rel):
            state = load_file(str(path))
            key = next(k for k, v in state.items() if v.is_floating_point())
            state[key] = torch.full_like(state[key], float("nan"))
            save_file(state, str(path))

    return setup


def edit_json(rel: str, **changes: object) -> Setup:
    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / rel
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))

    return setup


def replace_text(rel: str, old: str, new: str) -> Setup:
    """Replace text in a file; "{model}" in `old` stands for the shared tiny model's path."""

    def setup(ctx: Ctx) -> None:
        path = ctx.tmp / rel
        path.write_text(path.read_text().replace(old.format(model=ctx.model), new))

    return setup


def free_port(ctx: Ctx) -> None:
    """A port on which nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ctx.values["port"] = str(s.getsockname()[1])


def busy_port(ctx: Ctx) -> None:
    """A port on which this script listens while the case runs."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    ctx.sockets.append(s)
    ctx.values["port"] = str(s.getsockname()[1])


# ---- the cases -----------------------------------------------------------------------------------------


def sets(*pairs: str) -> list[str]:
    return [a for kv in pairs for a in ("--set", kv)]


TINY = sets("model={model}", "iterations=1", "rollout.prompts_per_iter=2", "rollout.num_steps=4", "eval.every=0")
PRESETS = {"tempflow": [], "nft": sets("algorithm.timesteps=2"), "awm": sets("algorithm.timesteps=2"),
           "flow_grpo": [], "tempflow_nft": []}


def train(*extra: str, preset: str = "tempflow", out: str = "{tmp}/run") -> list[str]:
    """`train` of a preset at tiny sizes (a few seconds, were the bad input accepted) with `extra` last."""
    return ["train", "--config", f"configs/shapes/{preset}.yaml", *TINY, *PRESETS[preset], *extra, "--out", out]


def bad_set(*pairs: str, preset: str = "tempflow") -> list[str]:
    return train(*sets(*pairs), preset=preset)


def sample(*extra: str, model: str = "{model}", out: str = "{tmp}/samples") -> list[str]:
    return ["sample", "--model", model, "--steps", "4", "--num", "1", *extra, "--out", out]


def evaluate(*extra: str) -> list[str]:
    return ["eval", "--model", "{model}", "--steps", "4", "--limit", "6", *extra]


RED = "--prompt", "a red circle"
BENCH_TINY = sets("model={model}", "rollout.prompts_per_iter=2", "rollout.num_steps=4", "eval.every=0")


def learning(*extra: str, out: str = "{tmp}/bench") -> list[str]:
    return ["bench", "learning", "--presets", "tempflow", "--num-seeds", "1", "--budget", "1it", "--final-eval",
            "-1", *BENCH_TINY, *extra, "--out", out]


PRETRAIN_TINY = sets("steps=1", "vae_steps=1", "preview.every=0")


def cases(cuda: bool) -> list[Case]:
    c: list[Case] = []

    def add(name: str, args: list[str], setup: Setup | None = None, timeout: float | None = None,
            needs_run: bool = False) -> None:
        c.append(Case(name, args, setup, timeout, needs_run))

    # configuration: unknown keys at every level
    add("config/unknown top-level key", bad_set("bogus=1"))
    add("config/unknown optim key (typo lrr)", bad_set("optim.lrr=1e-4"))
    add("config/unknown guard key", bad_set("guard.bogus=1"))
    add("config/key under a scalar", bad_set("eval.prompts.x=1"))
    add("config/moved key rollout.children", bad_set("rollout.children=4"))
    add("config/unknown key in a preset", ["train", "--config", "{tmp}/p.yaml", *TINY, "--out", "{tmp}/run"],
        write("p.yaml", "extends: " + str(ROOT / "configs/shapes/tempflow.yaml") + "\nrollout:\n  foo: 1\n"))
    # wrong types
    add("config/type iterations=abc", bad_set("iterations=abc"))
    add("config/type rollout.num_steps=4.5", bad_set("rollout.num_steps=4.5"))
    add("config/type section rollout=5", bad_set("rollout=5"))
    add("config/type guard.rollback=3", bad_set("guard.rollback=3"))
    # out of range, every section
    for kv in ["iterations=0", "rollout.guidance=0.5", "advantage.std=median", "optim.lr=-1e-4", "lora.rank=0",
               "ema.decay=1", "eval.num_steps=0", "guard.max_bad_steps=0", "guard.window=1", "guard.spike=0.5",
               "model_options.device=tpu"]:
        add(f"config/range {kv}", bad_set(kv))
    add("config/range nft algorithm.beta=2", bad_set("algorithm.beta=2", preset="nft"))
    add("config/range awm algorithm.power=0", bad_set("algorithm.power=0", preset="awm"))
    add("config/range flow_grpo algorithm.window=weird", bad_set("algorithm.window=weird", preset="flow_grpo"))
    # NaN and infinity
    add("config/nan optim.lr=nan", bad_set("optim.lr=nan"))
    add("config/inf rollout.guidance=inf", bad_set("rollout.guidance=inf"))
    add("config/nan in a preset file", ["train", "--config", "{tmp}/p.yaml", *TINY, "--out", "{tmp}/run"],
        write("p.yaml", "extends: " + str(ROOT / "configs/shapes/tempflow.yaml") + "\neval:\n  guidance: .nan\n"))
    # malformed --set
    add("set/unclosed list a.b=[1,2", train("--set", "algorithm.branch_points=[1,2"))
    add("set/without =", train("--set", "iterations"))
    add("set/empty value rollout.num_steps=", train("--set", "rollout.num_steps="))
    add("set/empty model=", train("--set", "model="))
    # preset files
    add("preset/missing file", ["train", "--config", "configs/shapes/nope.yaml", *TINY, "--out", "{tmp}/run"])
    add("preset/not YAML", ["train", "--config", "{tmp}/p.yaml", "--out", "{tmp}/run"],
        write("p.yaml", "rollout: [1, 2\n  num_steps: : 3\n"))
    add("preset/a YAML list", ["train", "--config", "{tmp}/p.yaml", "--out", "{tmp}/run"],
        write("p.yaml", "- 1\n- 2\n"))
    add("preset/extends nowhere", ["train", "--config", "{tmp}/p.yaml", "--out", "{tmp}/run"],
        write("p.yaml", "extends: no_such_base.yaml\niterations: 1\n"))
    add("preset/extends cycle", ["train", "--config", "{tmp}/a.yaml", "--out", "{tmp}/run"],
        chain(write("a.yaml", "extends: b.yaml\n"), write("b.yaml", "extends: a.yaml\n")))
    add("preset/not UTF-8", ["train", "--config", "{tmp}/p.yaml", "--out", "{tmp}/run"],
        write("p.yaml", b"iterations: 1\nreward: \xff\xfe\x80\n"))
    add("preset/empty file", ["train", "--config", "{tmp}/p.yaml", *TINY, "--out", "{tmp}/run"], write("p.yaml", ""))
    # algorithms
    add("algo/unknown name", bad_set("algorithm.name=bogus"))
    add("algo/dotted path to nothing", bad_set("algorithm.name=no_such_module_xyz:Algo"))
    add("algo/nft option given to tempflow_grpo", bad_set("algorithm.beta=0.5"))
    add("algo/name=nft over the tempflow preset", bad_set("algorithm.name=nft"))
    add("algo/--import missing module", train("--import", "no_such_module_xyz"))
    # prompts
    add("prompts/sample missing file", sample("--prompts", "{tmp}/missing.txt"))
    add("prompts/sample empty file", sample("--prompts", "{tmp}/p.txt"), write("p.txt", ""))
    add("prompts/sample not UTF-8", sample("--prompts", "{tmp}/p.txt"),
        write("p.txt", b"a red circle\n\xff\xfe\x80 a blue square\n"))
    add("prompts/sample outside grammar", sample("--prompt", "a purple elephant"))
    add("prompts/sample empty --prompt", sample("--prompt", ""))
    add("prompts/sample a directory", sample("--prompts", "{tmp}"))
    add("prompts/sample no prompt at all", sample())
    add("prompts/eval file with one bad line", evaluate("--prompts", "{tmp}/p.txt"),
        write("p.txt", "a red circle\na blue square below a dragon\n"))
    add("prompts/list --category bogus", ["prompts", "--category", "bogus"])
    add("prompts/list --set missing", ["prompts", "--set", "{tmp}/missing.txt"])
    add("prompts/list --set not UTF-8", ["prompts", "--set", "{tmp}/p.txt"], write("p.txt", b"\xff\xfe\x00a\x00"))
    add("prompts/train prompts outside grammar", bad_set("prompts={tmp}/p.txt"),
        write("p.txt", "a red circle\nthree green hexagons\n"))
    add("prompts/train eval.prompts missing", bad_set("eval.prompts={tmp}/missing.txt", "eval.every=1"))
    # models
    add("model/unknown name", sample(*RED, model="shapes-large"))
    add("model/empty folder", sample(*RED, model="{tmp}/m"), mkdir("m"))
    add("model/a file", sample(*RED, model="{tmp}/m.txt"), write("m.txt", "not a model\n"))
    add("model/truncated safetensors", sample(*RED, model="{tmp}/model"), chain(copy_model(), truncate(WEIGHTS)))
    add("model/garbage safetensors", sample(*RED, model="{tmp}/model"),
        chain(copy_model(), write(WEIGHTS, b"\x00not a safetensors file")))
    add("model/model_index.json not JSON", sample(*RED, model="{tmp}/model"),
        chain(copy_model(), write("model/model_index.json", "{not json")))
    add("model/unknown _class_name", sample(*RED, model="{tmp}/model"),
        chain(copy_model(), edit_json("model/model_index.json", _class_name="NoSuchModel")))
    add("model/config that does not fit the weights", sample(*RED, model="{tmp}/model"),
        chain(copy_model(), edit_json("model/transformer/config.json", num_layers=2)))
    add("model/NaN weights (sample)", sample(*RED, model="{tmp}/model"), chain(copy_model(), poison(WEIGHTS)))
    add("model/NaN weights (train)", bad_set("model={tmp}/model"), chain(copy_model(), poison(WEIGHTS)))
    add("model/hub id that does not exist", sample(*RED, model="nobody-xyz/no-such-model"), timeout=90)
    if not cuda:
        add("model/device=cuda without a GPU", bad_set("model_options.device=cuda"))
    # rewards
    add("reward/unknown name", bad_set("reward=bogus"))
    add("reward/bad weight shapes:abc", bad_set("reward=shapes:abc"))
    add("reward/unbalanced pickscore(", bad_set("reward=pickscore("))
    add("reward/unknown option shapes(foo=1)", bad_set("reward=shapes(foo=1)"))
    add("reward/empty spec", train("--set", "reward="))
    add("reward/aesthetic without weights", bad_set("reward=aesthetic"), timeout=90)
    add("reward/remote, nothing listening", bad_set("reward=remote(url=http://127.0.0.1:{port}, retries=0, timeout=2)"),
        free_port)
    add("reward/remote@ not a URL", bad_set("reward=remote@notaurl"))
    # run folders
    add("run/--resume a folder that is not a run", ["train", "--resume", "{tmp}/d"], mkdir("d"))
    add("run/--resume a missing path", ["train", "--resume", "{tmp}/missing"])
    add("run/--resume every checkpoint truncated", ["train", "--resume", "{tmp}/run_in"],
        chain(copy_run(), truncate("run_in/checkpoints/*/state.safetensors", 0.3), protect("run_in/metrics.jsonl"),
              protect("run_in/final")), needs_run=True)
    add("run/--resume every meta.json corrupt", ["train", "--resume", "{tmp}/run_in"],
        chain(copy_run(), truncate("run_in/checkpoints/*/meta.json", 0.5), protect("run_in/metrics.jsonl")),
        needs_run=True)
    add("run/--resume every checkpoint NaN", ["train", "--resume", "{tmp}/run_in"],
        chain(copy_run(), poison("run_in/checkpoints/*/state.safetensors"), protect("run_in/metrics.jsonl")),
        needs_run=True)
    add("run/--resume config.yaml not YAML", ["train", "--resume", "{tmp}/run_in"],
        chain(copy_run(), write("run_in/config.yaml", "model: [\n  : :\n")), needs_run=True)
    add("run/--resume without checkpoints/", ["train", "--resume", "{tmp}/run_in"],
        chain(copy_run(), remove("run_in/checkpoints"), protect("run_in/metrics.jsonl")), needs_run=True)
    add("run/--resume whose model is gone", ["train", "--resume", "{tmp}/run_in"],
        chain(copy_run(), replace_text("run_in/config.yaml", "model: {model}", "model: /no/such/model")),
        needs_run=True)
    add("run/--out an existing file", train(out="{tmp}/f"), chain(write("f", "keep me"), protect("f")))
    add("run/--out holds a run, no --resume", train(out="{tmp}/run_in"), chain(copy_run(), protect("run_in")),
        needs_run=True)
    # export
    add("export/run without final/", ["export", "{tmp}/run_in", "--out", "{tmp}/x"],
        chain(copy_run(), remove("run_in/final")), needs_run=True)
    add("export/full fine-tune (no LoRA)", ["export", "{run}", "--out", "{tmp}/x"], needs_run=True)
    add("export/a folder that is not a run", ["export", "{tmp}/d", "--out", "{tmp}/x"], mkdir("d"))
    add("export/--out an existing file", ["export", "{run}", "--merged", "--out", "{tmp}/f"],
        chain(write("f", "keep me"), protect("f")), needs_run=True)
    add("export/--out a non-empty folder", ["export", "{run}", "--merged", "--out", "{tmp}/x"],
        chain(write("x/keep.txt", "keep me"), protect("x")), needs_run=True)
    add("export/NaN final model", ["export", "{tmp}/run_in", "--out", "{tmp}/x"],
        chain(copy_run(), poison("run_in/final/" + TRANSFORMER)), needs_run=True)
    # sample / eval outputs and numeric flags
    add("flags/sample --out an existing file", sample(*RED, out="{tmp}/f"), chain(write("f", "keep me"), protect("f")))
    add("flags/eval --out a folder", evaluate("--out", "{tmp}/d"), chain(write("d/keep.txt", "keep"), protect("d")))
    add("flags/eval --out under a file", evaluate("--out", "{tmp}/f/m.json"), write("f", "keep me"))
    add("flags/eval --grid a folder", evaluate("--grid", "{tmp}/d"), mkdir("d"))
    add("flags/sample --steps 0", sample(*RED, "--steps", "0"))
    add("flags/sample --steps -1", sample(*RED, "--steps", "-1"))
    add("flags/sample --num 0", sample(*RED, "--num", "0"))
    add("flags/sample --guidance nan", sample(*RED, "--guidance", "nan"))
    add("flags/sample --guidance inf", sample(*RED, "--guidance", "inf"))
    add("flags/sample --seed abc", sample(*RED, "--seed", "abc"))
    add("flags/sample --seed 2**64", sample(*RED, "--seed", str(2**64)))
    add("flags/sample --solver bogus", sample(*RED, "--solver", "bogus"))
    add("flags/eval --samples 0", evaluate("--samples", "0"))
    add("flags/eval --limit -1", evaluate("--limit", "-1"))
    add("flags/eval --grid-size 0", evaluate("--grid-size", "0", "--grid", "{tmp}/g.png"))
    add("flags/eval --guidance nan", evaluate("--guidance", "nan"))
    add("flags/eval --steps abc", evaluate("--steps", "abc"))
    # serve-reward (a server that starts is stopped at the timeout: the input was accepted)
    serve = ["serve-reward", "--quiet"]
    add("serve/--port 99999", [*serve, "--reward", "shapes", "--port", "99999"], timeout=30)
    add("serve/--port -1", [*serve, "--reward", "shapes", "--port", "-1"], timeout=30)
    add("serve/port in use", [*serve, "--reward", "shapes", "--port", "{port}"], busy_port, timeout=30)
    add("serve/unknown reward", [*serve, "--reward", "bogus", "--port", "0"], timeout=30)
    add("serve/malformed reward shapes:abc", [*serve, "--reward", "shapes:abc", "--port", "0"], timeout=30)
    add("serve/empty --token", [*serve, "--reward", "shapes", "--port", "0", "--token", ""], timeout=30)
    add("serve/--host not an address", [*serve, "--reward", "shapes", "--port", "0", "--host", "999.1.1.1"],
        timeout=30)
    add("serve/--max-batch 0", [*serve, "--reward", "shapes", "--port", "0", "--max-batch", "0"], timeout=30)
    add("serve/--workers 0", [*serve, "--reward", "shapes", "--port", "0", "--workers", "0"], timeout=30)
    add("serve/--max-bytes -1", [*serve, "--reward", "shapes", "--port", "0", "--max-bytes", "-1"], timeout=30)
    add("serve/--import missing module", [*serve, "--reward", "shapes", "--port", "0", "--import", "no_such_xyz"],
        timeout=30)
    # bench
    add("bench/learning unknown preset", learning("--presets", "nosuch"))
    add("bench/learning --budget 10parsecs", learning("--budget", "10parsecs"))
    add("bench/learning --seeds a,b", learning("--seeds", "a,b"))
    add("bench/learning --final-guidance 0.5", learning("--final-guidance", "0.5"))
    add("bench/learning --out an existing file", learning(out="{tmp}/f"), chain(write("f", "keep me"), protect("f")))
    add("bench/gradient --presets ,", ["bench", "gradient", "--presets", ",", *BENCH_TINY])
    add("bench/gradient --iterations 0", ["bench", "gradient", "--presets", "tempflow", "--iterations", "0",
                                          *BENCH_TINY])
    add("bench/system unknown preset", ["bench", "system", "--config", "nosuch", *BENCH_TINY])
    add("bench/system --iterations -1", ["bench", "system", "--config", "tempflow", "--iterations", "-1",
                                         *BENCH_TINY])
    # pretrain
    pre = ["pretrain", "--config", "configs/shapes/pretrain.yaml", *PRETRAIN_TINY]
    add("pretrain/unknown key", [*pre, "--set", "bogus=1", "--out", "{tmp}/pre"])
    add("pretrain/width not a multiple of heads", [*pre, "--set", "model.width=30", "--out", "{tmp}/pre"])
    add("pretrain/--out an existing file", [*pre, "--out", "{tmp}/f"], chain(write("f", "keep me"), protect("f")))
    return c


# ---- running and judging -------------------------------------------------------------------------------


def stderr_lines(err: str) -> list[str]:
    """stderr's non-empty lines without tqdm progress bars and `tempflow: warning:` lines."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", err)]
    return [ln for ln in lines if ln and not _TQDM.search(ln) and not ln.startswith("tempflow: warning:")]


def judge(rc: int | None, out: str, err: str, timeout: float) -> tuple[bool, str]:
    lines = stderr_lines(err)
    if rc is None:
        return False, f"timeout ({timeout:g} s)"
    if rc < 0:
        return False, f"signal {-rc}"
    if "Traceback" in out or "Traceback" in err:
        return False, "traceback"
    if rc == 0:
        return False, "accepted (exit 0)"
    if rc != 2:
        return False, f"exit {rc}"
    if lines and lines[0].startswith("usage:"):
        return False, "argparse usage"
    if len(lines) != 1:
        return False, f"{len(lines)} stderr lines"
    if not lines[0].startswith(PREFIX):
        return False, "no 'tempflow: error: '"
    return True, "clean"


def fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def run_case(case: Case, index: int, root: Path, model: Path, run: Path | None, default_timeout: float) -> Result:
    tmp = root / f"case{index:03d}"
    tmp.mkdir()
    ctx = Ctx(tmp, model, run)
    timeout = case.timeout or default_timeout
    cmd = [sys.executable, "-m", "tempflow"]
    t0 = time.perf_counter()
    try:
        if case.setup is not None:
            try:
                case.setup(ctx)
            except Exception as e:  # a bug of this script, not of tempflow: say so and go on
                return Result(case, cmd + case.args, None, False, "setup failed", f"{type(e).__name__}: {e}", [],
                              time.perf_counter() - t0)
        values = {"tmp": str(tmp), "model": str(model), "run": str(run), **ctx.values}
        cmd += [fill(a, values) for a in case.args]
        env = {k: v for k, v in os.environ.items() if k != "TEMPFLOW_REWARD_TOKEN"}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the case's own process group, started above
            out, err = proc.communicate()
            rc = None
    finally:
        for s in ctx.sockets:
            s.close()
    ok, verdict = judge(rc, out, err, timeout)
    lost = ctx.lost_work()
    if lost:
        ok, verdict = False, lost
    lines = stderr_lines(err)
    errors = [ln for ln in lines if ln.startswith(PREFIX) or re.match(r"tempflow( \w+)*: error:", ln)]
    line = errors[0] if errors else (lines[-1] if lines else "")
    tail = [ln for ln in re.split(r"[\r\n]+", err) if ln.strip() and not _TQDM.search(ln)][-12:]
    return Result(case, cmd, rc, ok, verdict, line, tail, time.perf_counter() - t0)


def build_model(root: Path) -> Path:
    """The tiny shapes model every case that needs a model uses."""
    import torch

    from tempflow.worlds.shapes.model import ShapesFlowModel, ShapesModelConfig

    torch.manual_seed(0)
    model = root / "fixtures" / "model"
    ShapesFlowModel(ShapesModelConfig(**TINY_MODEL)).save(model)
    return model


def build_run(root: Path, model: Path) -> Path:
    """One finished tiny run of the tiny model (full fine-tuning, no LoRA), trained by the CLI."""
    run = root / "fixtures" / "run"
    args = [fill(a, {"model": str(model)}) for a in train(out=str(run))]
    proc = subprocess.run([sys.executable, "-m", "tempflow", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0 or not (run / "final").is_dir():
        raise RuntimeError(f"could not train the fixture run (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return run


def short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--only", default="", metavar="SUBSTRING", help="only the cases whose name contains this")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds per case unless it sets its own (default 120)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder of the cases (its path is printed)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    import torch

    selected = [c for c in cases(torch.cuda.is_available()) if args.only in c.name]
    if not selected:
        sys.exit(f"no case name contains {args.only!r}")
    root = Path(tempfile.mkdtemp(prefix="tempflow-bad-input-"))
    t0 = time.perf_counter()
    selected.sort(key=lambda case: case.needs_run)  # the run is trained while the other cases start
    try:
        model = build_model(root)
        print(f"{len(selected)} cases, {args.jobs} at a time", file=sys.stderr, flush=True)
        results: dict[int, Result] = {}
        with ThreadPoolExecutor(1) as builder, ThreadPoolExecutor(args.jobs) as pool:
            run = builder.submit(build_run, root, model) if any(c.needs_run for c in selected) else None

            def job(case: Case, index: int) -> Result:
                return run_case(case, index, root, model, run.result() if case.needs_run and run else None,
                                args.timeout)

            futures = {pool.submit(job, c, i): i for i, c in enumerate(selected)}
            for fut in as_completed(futures):
                r = fut.result()
                results[futures[fut]] = r
                print(f"[{len(results):3d}/{len(selected)}] {r.seconds:5.1f} s  {r.verdict:<22} {r.case.name}",
                      file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"temp folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    ordered = [results[i] for i in range(len(selected))]
    width = max(len(r.case.name) for r in ordered)
    print(f"{'case':<{width}}  {'exit':>4}  {'verdict':<22}  error line")
    for r in ordered:
        rc = "-" if r.rc is None else str(r.rc)
        print(f"{r.case.name:<{width}}  {rc:>4}  {r.verdict:<22}  {short(r.line, 100)}")
    bad = [r for r in ordered if not r.ok]
    if bad:
        print(f"\n{len(bad)} not refused cleanly:")
        for r in bad:
            print(f"\n## {r.case.name}: {r.verdict}, exit {'-' if r.rc is None else r.rc}")
            print("$ " + shlex.join(["python", *r.cmd[1:]]))
            for ln in r.tail:
                print("    " + short(ln.rstrip(), 300))
    clean = len(ordered) - len(bad)
    print(f"\n{clean} of {len(ordered)} refused cleanly ({time.perf_counter() - t0:.0f} s)")
    sys.exit(0 if not bad else 1)


if __name__ == "__main__":
    main()

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tempflow.cli import main


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    path = tmp_path / "model"
    tiny_model.save(path)
    return str(path)


def test_sample_writes_pngs_and_a_grid(model_dir, tmp_path):
    out = tmp_path / "samples"
    rc = main(["sample", "--model", model_dir, "--prompt", "a red circle", "--prompt", "two blue squares",
               "--num", "2", "--steps", "3", "--out", str(out)])
    assert rc == 0
    assert len(list(out.glob("0*.png"))) == 4
    assert (out / "grid.png").is_file()


def test_sample_with_compile_draws_the_eager_images(model_dir, tmp_path):
    from PIL import Image

    args = ["sample", "--model", model_dir, "--prompt", "a red circle", "--num", "2", "--steps", "2", "--out"]
    assert main([*args, str(tmp_path / "compiled"), "--compile"]) == 0
    assert main([*args, str(tmp_path / "eager")]) == 0
    pairs = list(zip(sorted((tmp_path / "compiled").glob("0*.png")), sorted((tmp_path / "eager").glob("0*.png"))))
    assert len(pairs) == 2
    for a, b in pairs:  # the same images up to float rounding
        diff = np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int)
        assert np.abs(diff).max() <= 2


def test_compile_without_a_compiler_is_one_line(model_dir, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no g++, c++ or clang++ to be found
    r = subprocess.run([sys.executable, "-m", "tempflow", "sample", "--model", model_dir, "--prompt", "a circle",
                        "--compile", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "needs a C++ compiler" in lines[0], r.stderr


def test_eval_writes_metrics(model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\nthree squares\na blue circle above a red square\n")
    out = tmp_path / "m.json"
    rc = main(["eval", "--model", model_dir, "--prompts", str(prompts), "--steps", "3", "--out", str(out),
               "--grid", str(tmp_path / "g.png")])
    assert rc == 0
    m = json.loads(out.read_text())
    assert set(m) >= {"overall", "per_category", "reward_mean", "n"}
    assert m["n"] == 3 and set(m["per_category"]) == {"colors", "counting", "position"}
    assert (tmp_path / "g.png").is_file()


def test_eval_with_several_samples_reports_pass_at_k(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\nthree squares\n")
    out = tmp_path / "m.json"
    assert main(["eval", "--model", model_dir, "--prompts", str(prompts), "--steps", "2", "--samples", "3",
                 "--out", str(out)]) == 0
    assert "pass@3" in capsys.readouterr().out
    m = json.loads(out.read_text())
    assert m["samples"] == 3 and m["n"] == 2
    assert all(m["pass_at_k"][c] >= m["per_category"][c] for c in m["per_category"])
    # every sample is either right or misses for exactly one reason
    for cat, shares in m["failures"].items():
        assert m["per_category"][cat] + sum(shares.values()) == pytest.approx(1.0)
    assert main(["eval", "--model", model_dir, "--prompts", str(prompts), "--steps", "2", "--failures"]) == 0
    text = capsys.readouterr().out
    assert "misses" in text and "too many objects" in text and "relation" in text


def test_summary_of_several_samples_per_line():
    from tempflow.evaluate import summarise, verifier_scoring
    from tempflow.worlds import get_world

    lines = ["a red circle", "a blue square", "a blue circle above a red square"]
    specs = verifier_scoring(get_world("shapes"), lines)
    strict = np.array([[1, 0], [0, 0], [0, 1]], dtype=bool)
    s = summarise(specs, strict.astype("float32"), strict)
    assert s["metric"] == "accuracy" and s["group"] == "category"
    assert s["per_category"] == {"colors": 0.25, "position": 0.5} and s["overall"] == 0.375
    assert s["pass_at_k"] == {"colors": 0.5, "position": 1.0} and s["pass_at_k_overall"] == 0.75
    assert "pass_at_k" not in summarise(specs, strict[:, 0].astype("float32"), strict[:, 0])
    kinds = np.array([[None, "shape"], ["colour", "too few objects"], ["relation", None]], dtype=object)
    f = summarise(specs, strict.astype("float32"), strict, kinds)["failures"]
    assert f["colors"]["shape"] == 0.25 and f["colors"]["colour"] == 0.25 and f["colors"]["too few objects"] == 0.25
    assert f["position"]["relation"] == 0.5 and f["position"]["binding"] == 0.0


def test_eval_of_the_shipped_base_on_a_few_prompts(tmp_path, capsys):
    rc = main(["eval", "--model", "shapes-base", "--limit", "12", "--steps", "10", "--out", str(tmp_path / "m.json")])
    assert rc == 0
    assert "overall" in capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 12 and 0 <= m["overall"] <= 1


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tempflow", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["sample", "--prompt", "a photo of a cat", "--steps", "2"], "'photo' after 'a' is neither a colour"),
        (["eval", "--prompts", "/no/such/file.txt"], "does not exist"),
        (["eval", "--model", "/no/such/model"], "neither a shipped model"),
        (["pretrain", "--set", "model.widht=3"], "unknown config key 'model.widht'"),
        (["pretrain", "--set", "optim.lr=0"], "optim.lr must be > 0"),
        (["sample", "--steps", "0", "--prompt", "a circle"], "--steps must be a positive number"),
        (["eval", "--samples", "0"], "--samples must be a positive number"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args, needle, tmp_path):
    r = _run(*args, *(["--out", str(tmp_path / "o")] if args[0] != "eval" else []))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_a_closed_pipe_ends_output_quietly():
    """`tempflow prompts | head -1`: the reader leaves after one line, and tempflow stops without a traceback."""
    p = subprocess.Popen([sys.executable, "-m", "tempflow", "prompts", "--set", "shapes-train", "--show-category"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141
    assert first.decode().startswith(("position\t", "two_object\t", "color_attr\t", "counting\t", "colors\t"))
    assert err == "", err


def test_model_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    r = _run("eval", "--model", str(tmp_path / "m"), "--limit", "2")
    assert r.returncode == 2 and "no model_index.json" in r.stderr and "Traceback" not in r.stderr


def test_empty_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n\n")
    r = _run("sample", "--prompts", str(f), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "holds no prompts" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["prompts", "--set", "{bad}"],
        ["sample", "--prompts", "{bad}", "--out", "{out}"],
        ["eval", "--prompts", "{bad}"],
        ["train", "--config", "configs/shapes/awm.yaml", "--set", "prompts={bad}", "--out", "{out}"],
        ["train", "--config", "configs/shapes/awm.yaml", "--set", "eval.prompts={bad}", "--out", "{out}"],
    ],
)
def test_a_prompt_file_that_is_not_utf8_is_one_line(args, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a red circle\nun cercle rouge \xe0 gauche\n".encode("latin-1"))
    r = _run(*[a.format(bad=bad, out=tmp_path / "o") for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "is not UTF-8 text" in lines[0], r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["prompts", "--category", "bogus"], "unknown category 'bogus'; choose one of single_object"),
        (["train", "--config", "configs/shapes/tempflow.yaml", "--set", "algorithm.branch_points=[1,2"],
         "bad override"),
        (["train", "--config", "configs/shapes/awm.yaml", "--set", "optim.lr=inf"],
         "config key 'optim.lr' must be a finite number, got inf"),
        (["train", "--config", "configs/shapes/tempflow.yaml", "--set", "algorithm.noise_level=inf"],
         "config key 'algorithm.noise_level' must be a finite number, got inf"),
    ],
)
def test_more_bad_input_is_one_line(args, needle, tmp_path):
    r = _run(*args, *(["--out", str(tmp_path / "o")] if args[0] == "train" else []))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,flag",
    [
        (["train", "--config", "configs/shapes/awm.yaml", "--set", "iterations=1", "--out", "{path}"], "--out"),
        (["pretrain", "--set", "steps=1", "--out", "{path}"], "--out"),
        (["sample", "--prompt", "a circle", "--num", "1", "--steps", "2", "--out", "{path}"], "--out"),
        (["eval", "--limit", "2", "--steps", "2", "--out", "{path}/m.json"], "--out"),
        (["eval", "--limit", "2", "--steps", "2", "--grid", "{path}/g.png"], "--grid"),
        (["export", "{run}", "--out", "{path}"], "--out"),
    ],
)
@pytest.mark.parametrize("where", ["a file", "a read-only place"])
def test_an_output_that_cannot_be_written_is_one_line(args, flag, where, tmp_path):
    if where == "a file":
        path = tmp_path / "taken"
        path.write_text("not a folder")
        needle = "is a file"
    else:
        if not Path("/proc").is_dir():
            pytest.skip("needs /proc, a file system no one can create folders in")
        path = Path("/proc/tempflow-out")
        needle = "cannot write in '/proc'"
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    r = _run(*[a.format(path=path, run=run) for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"tempflow: error: {flag} ") and needle in lines[0], r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--config", "configs/shapes/tempflow.yaml", "--set", "guard.rollback=3"],
         "config key 'guard.rollback' (--set) must be true or false, got 3"),
        (["train", "--config", "configs/shapes/tempflow.yaml", "--set", "rollout=5"],
         "config key 'rollout' (--set) is a section, not a value"),
        (["train", "--config", "{empty}"], "is empty; give a preset from configs/"),
        (["train", "--config", "configs/shapes/tempflow.yaml", "--set", "model_options.device=cuda:7"],
         "model_options.device is 'cuda:7' but this torch sees no CUDA GPU"),
        (["prompts", "--set", "{folder}"], "is a folder, not a prompt file"),
        (["sample", "--prompt", "a circle", "--seed", "18446744073709551616"], "--seed must be between 0 and 2**62"),
        (["sample", "--prompt", "a circle", "--seed", "abc"], "tempflow sample: argument --seed: invalid int value"),
        (["sample", "--prompt", "a circle", "--guidance", "nan"], "--guidance must be a finite number >= 1"),
        (["eval", "--guidance", "inf"], "--guidance must be a finite number >= 1"),
        (["bench", "system", "--iterations", "-1"], "--iterations must be a positive number, got -1"),
        (["bench", "learning", "--presets", "awm", "--out", "{file}"], "is a file"),
    ],
)
def test_bad_flags_and_values_are_one_line_in_process(args, needle, tmp_path, capsys):
    """The same promise, checked in this process (fast): argparse's own errors included."""
    import torch

    if torch.cuda.is_available() and "cuda:7" in " ".join(args):
        pytest.skip("this machine has a GPU")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    args = [a.format(empty=tmp_path / "empty.yaml", file=tmp_path / "file", folder=tmp_path / "folder") for a in args]
    args += ["--out", str(tmp_path / "o")] if args[0] == "train" else []
    try:
        code = main(args)
    except SystemExit as e:  # argparse's errors leave through exit
        code = e.code
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tempflow: error: "), lines
    assert needle in lines[0]
    assert not (tmp_path / "o").exists()

"""docs/extending.md's worked example, run as the page writes it: an algorithm in one module and a
preset, registered by --import or named by its dotted path."""

import re
import sys
from pathlib import Path

import pytest

from tempflow.algorithms import ALGORITHMS
from tempflow.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
TINY = ["iterations=2", "rollout.prompts_per_iter=2", "rollout.num_steps=4", "eval.every=2", "eval.limit=4",
        "eval.num_steps=2", "threads=1"]


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The page's module (rwr.py) and preset (rwr.yaml), written into tmp_path, which is on sys.path."""
    blocks = dict(re.findall(r"```(python|yaml)\n(.*?)```", PAGE.read_text(), re.S))
    (tmp_path / "rwr.py").write_text(blocks["python"])
    (tmp_path / "rwr.yaml").write_text(blocks["yaml"])
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    ALGORITHMS.pop("rwr", None)
    sys.modules.pop("rwr", None)  # the next test imports the page's module afresh


def _sets(model: str) -> list[str]:
    return [a for s in [f"model={model}", *TINY] for a in ("--set", s)]


def test_the_example_trains_by_import_and_resumes_by_dotted_path(example, tiny_model_dir, capsys):
    run = example / "run"
    assert main(["train", "--import", "rwr", "--config", str(example / "rwr.yaml"), "--out", str(run),
                 *_sets(tiny_model_dir)]) == 0
    rows = [r for r in (run / "metrics.jsonl").read_text().splitlines() if "fm_error" in r]
    assert len(rows) == 2 and (run / "final").is_dir()
    ALGORITHMS.pop("rwr")
    dotted = example / "run_dotted"
    assert main(["train", "--config", str(example / "rwr.yaml"), "--out", str(dotted), *_sets(tiny_model_dir),
                 "--set", "algorithm.name=rwr:RewardWeighted", "--set", "iterations=1"]) == 0
    assert main(["train", "--resume", str(dotted), "--set", "iterations=2"]) == 0
    assert "fm_error" in (dotted / "metrics.jsonl").read_text().splitlines()[-2]


def test_the_examples_options_are_checked(example, tiny_model_dir, capsys):
    args = ["train", "--import", "rwr", "--config", str(example / "rwr.yaml"), "--out", str(example / "bad"),
            *_sets(tiny_model_dir)]
    assert main([*args, "--set", "algorithm.temperature=0"]) == 2
    assert "algorithm.temperature must be > 0" in capsys.readouterr().err
    assert main([*args, "--set", "algorithm.children=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'algorithm.children'" in err and "tempflow_grpo" in err
    assert main(["train", "--config", str(example / "rwr.yaml"), "--out", str(example / "bad2"),
                 "--set", "algorithm.name=rwr:Missing"]) == 2
    assert "cannot be imported" in capsys.readouterr().err

from collections import Counter
from importlib import resources

import pytest

from tempflow.errors import PromptError
from tempflow.prompts import load_prompts, read_prompt_file
from tempflow.worlds.shapes.grammar import CATEGORIES, parse_prompt
from tempflow.worlds.shapes.prompts import build_prompt_sets


def test_shipped_files_are_the_generator_output():
    train, evals = build_prompt_sets()
    data = resources.files("tempflow.worlds.shapes") / "data"
    assert (data / "train.txt").read_text().splitlines() == train
    assert (data / "eval.txt").read_text().splitlines() == evals


def test_sets_are_large_disjoint_and_balanced():
    train, evals = load_prompts("shapes-train"), load_prompts("shapes-eval")
    assert len(set(train)) >= 1000 and len(train) == len(set(train))
    assert len(evals) >= 300
    assert not set(train) & set(evals)
    cats = Counter(parse_prompt(p).category for p in evals)
    assert set(cats) == set(CATEGORIES)
    assert len(set(cats.values())) == 1  # the same number of lines in every category


def test_prompt_file_errors(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        read_prompt_file(empty)
    ok = tmp_path / "ok.txt"
    ok.write_text("a red circle\n\n# comment\n  two squares  \n")
    assert read_prompt_file(ok) == ["a red circle", "two squares"]

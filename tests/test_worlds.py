"""The world registry: finding worlds, their one-line errors, and evaluation without a verifier."""

from __future__ import annotations

import pytest

from tempflow.cli import main
from tempflow.errors import TempflowError
from tempflow.worlds import World, _registered, get_world, names, register_world, world_of


class Plain(World):
    """A world with prompts and categories but no verifier, models or pretraining."""

    name = "plain"
    categories = ("one",)

    def category(self, prompt: str) -> str | None:
        return "one" if prompt.startswith("plain ") else None


@pytest.fixture
def plain():
    world = register_world(Plain())
    yield world
    _registered.pop("plain", None)


def test_the_built_in_world_is_found_and_unknown_names_are_one_line():
    assert "shapes" in names() and get_world("shapes").has_verifier
    with pytest.raises(TempflowError, match="unknown world 'nowhere'; known: .*shapes"):
        get_world("nowhere")
    with pytest.raises(TempflowError, match="needs a name"):
        register_world(World())


def test_prompts_belong_to_the_world_that_knows_them_all(plain):
    assert world_of(["plain a", "plain b"]) is plain
    assert world_of(["a red circle", "two squares"]) is get_world("shapes")
    assert world_of(["plain a", "a red circle"]) is None and world_of([]) is None
    assert world_of(["plain a"], ["shapes-eval"]) is plain  # a set's owner never claims a line it does not know


def test_the_owner_of_the_named_set_decides_among_the_worlds_that_know_the_prompts(plain):
    class Everything(World):
        name = "everything"
        categories = ("any",)

        def category(self, prompt: str) -> str | None:
            return "any"

    everything = register_world(Everything())
    try:
        assert world_of(["a red circle"]) is everything  # registered worlds come first
        assert world_of(["a red circle"], ["shapes-eval"]) is get_world("shapes")
    finally:
        _registered.pop("everything", None)


def test_a_line_its_sets_world_does_not_know_is_refused_not_dropped(tmp_path):
    from pathlib import Path

    from tempflow.errors import ConfigError
    from tempflow.prompts import load_prompts, prompt_strata

    own = tmp_path / "own.txt"
    own.write_text("plain a\nplain b\nzzz\n")

    class Owner(Plain):
        name = "owner"

        def prompt_sets(self) -> dict[str, Path]:
            return {"own": own}

    register_world(Owner())
    try:
        lines = load_prompts("own")
        with pytest.raises(ConfigError, match="'zzz' is not one: set prompt_balance=none"):
            prompt_strata(lines, "category", "own")
        assert prompt_strata(lines[:2], "category", "own") == [[0, 1]]
    finally:
        _registered.pop("owner", None)


def test_a_world_without_a_verifier_or_pretraining_says_what_to_do(plain, tmp_path, tiny_model_dir, capsys):
    assert not plain.has_verifier
    with pytest.raises(TempflowError, match="--reward"):
        plain.judge(None, [])
    assert main(["pretrain", "--world", "plain", "--out", str(tmp_path / "p")]) == 2
    assert "world 'plain' has no pretraining" in capsys.readouterr().err
    assert main(["pretrain", "--world", "nowhere", "--out", str(tmp_path / "p")]) == 2
    assert "unknown world 'nowhere'" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("plain a\n")
    assert main(["eval", "--model", tiny_model_dir, "--prompts", str(prompts), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert main(["eval", "--model", tiny_model_dir, "--prompts", f"shapes-eval,{prompts}", "--steps", "2"]) == 2
    err += capsys.readouterr().err
    assert "'plain a' is not: fix it" in err and err.count("\n") == 2
    assert "not of a world with a verifier" in err and "--reward" in err


def test_a_broken_entry_point_is_one_line(monkeypatch):
    import tempflow.worlds as worlds

    monkeypatch.setitem(worlds.BUILTIN, "broken", "no_such_module_xyz:WORLD")
    with pytest.raises(TempflowError, match="cannot load world 'broken' from 'no_such_module_xyz:WORLD'"):
        get_world("broken")
    monkeypatch.setitem(worlds.BUILTIN, "notaworld", "tempflow.errors:TempflowError")
    with pytest.raises(TempflowError, match="is not a tempflow.worlds.World"):
        get_world("notaworld")


def test_balance_by_category_needs_a_world_with_categories():
    from tempflow.errors import ConfigError
    from tempflow.prompts import prompt_strata

    with pytest.raises(ConfigError, match="'a photo of a cat' is not one: set prompt_balance=none"):
        prompt_strata(["a circle", "a photo of a cat"], "category")


def test_a_typo_in_a_prompt_file_of_a_world_is_named(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue sqare\n")
    assert main(["eval", "--model", tiny_model_dir, "--prompts", str(prompts), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 prompts" in err and "shapes world" in err and "'a blue sqare' is not" in err

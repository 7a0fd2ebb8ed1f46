"""Prompt sets: a world's named set or a text file, an even spread of them, and their strata.

A prompt set is a world's named set (``shapes-eval``) or a UTF-8 text file with one prompt per
line (blank lines and ``#`` comments skipped). Training's ``prompt_balance: category`` stratifies
the prompts by their world's categories; evaluation reports per category (a world with a verifier)
or per prompt set (a reward model).
"""

from __future__ import annotations

from pathlib import Path

from tempflow.errors import ConfigError, PromptError
from tempflow.worlds import all_worlds, world_of


def spread(n: int, k: int) -> list[int]:
    """Indices of an even spread of (at most) k of n items: every (n // k)-th, the first k of them."""
    return list(range(0, n, max(1, n // k)))[:k]


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file, one per line; blank lines and '#' comments are skipped."""
    p = Path(path)
    if p.is_dir():
        raise PromptError(f"{str(p)!r} is a folder, not a prompt file; give a text file with one prompt per line")
    if not p.is_file():
        raise PromptError(f"prompt file {str(p)!r} does not exist; give a text file with one prompt per line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"prompt file {str(p)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8, "
                          "one prompt per line") from None
    lines = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise PromptError(f"prompt file {str(p)!r} holds no prompts; write one prompt per line")
    return prompts


def named_sets() -> dict[str, Path]:
    """Every world's named prompt sets (name -> file)."""
    return {name: path for world in all_worlds() for name, path in world.prompt_sets().items()}


def load_prompts(name_or_path: str, limit: int = 0) -> list[str]:
    """A world's named set (shapes-train, shapes-eval) or a text file; with limit > 0, an even spread of
    that many of its lines (`spread`)."""
    name_or_path = str(named_sets().get(name_or_path, name_or_path))
    lines = read_prompt_file(name_or_path)
    return [lines[i] for i in spread(len(lines), limit)] if limit else lines


def set_name(name_or_path: str) -> str:
    """How a prompt set is labelled in tables: its name, or the file's name without its suffix."""
    return name_or_path if name_or_path in named_sets() else Path(name_or_path).stem


def prompt_strata(prompts: list[str], balance: str, source: str = "") -> list[list[int]] | None:
    """Indices of the prompts per stratum for `prompt_balance` (None: one stratum, plain passes):
    with "category", one stratum per category of the prompts' world (`world_of`; `source` is the set
    they came from), in the world's order."""
    if balance == "none":
        return None
    world = world_of(prompts, [source] if source else [])
    if world is None or not world.categories:
        bad = next((p for p in prompts if all(w.category(p) is None for w in all_worlds())), prompts[0])
        raise ConfigError(f"prompt_balance=category needs prompts of a world with categories, and {bad!r} is "
                          "not one: set prompt_balance=none")
    by_category: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_category.setdefault(str(world.category(p)), []).append(i)
    return [by_category[c] for c in world.categories if c in by_category]

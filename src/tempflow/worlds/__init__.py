"""Worlds: a domain of prompts with the pieces that make it trainable and measurable on its own.

A world brings, through one small protocol (`World`):

- **prompt sets** by name (``shapes-train``, ``shapes-eval``) and a **category** per prompt, the
  strata of ``prompt_balance: category`` and the rows of the evaluation table;
- a **verifier** (`World.judge`): per image, the fraction of the prompt's constraints that hold,
  whether all hold, and the kind of miss; evaluation reports accuracy per category from it;
- **shipped models** by name and **model loaders** keyed by the class name in ``model_index.json``;
- **rewards** for the reward registry;
- **pretraining** of its own base model (`tempflow pretrain --world NAME`).

Every piece is optional: a world without a verifier is evaluated with a reward model, one without
models trains a diffusers pipeline. The core (the loop, algorithms, models, rewards, the config
loader) reaches a world only through this module, never by importing it.

Worlds are found in three places: the built-in ``shapes`` world, the ``tempflow.worlds`` entry-point
group of installed packages (``name = "package.module:WORLD"``) and `register_world` (for a module
given to ``--import``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tempflow.errors import TempflowError

if TYPE_CHECKING:
    import torch

    from tempflow.models.base import FlowModel, ModelOptions

__all__ = ["Verdict", "World", "all_worlds", "get_world", "register_world", "world_of"]

ENTRY_POINT_GROUP = "tempflow.worlds"
BUILTIN: dict[str, str] = {"shapes": "tempflow.worlds.shapes:WORLD"}  # name -> "module:attribute"


@dataclass
class Verdict:
    """A verifier's judgement of n images, each against its own prompt.

    frac: (n,) the fraction of the prompt's constraints that hold, in [0, 1];
    strict: (n,) bool, every constraint holds (the accuracy of an evaluation);
    failures: n kinds of miss (one of the world's `failure_kinds`, None where the image is right)."""

    frac: np.ndarray
    strict: np.ndarray
    failures: list[str | None]


class World:
    """The protocol of a world; a subclass overrides what it provides (see the module docstring)."""

    name: str = ""
    categories: tuple[str, ...] = ()  # the order of evaluation tables
    failure_kinds: tuple[str, ...] = ()  # the kinds of miss `judge` names, in the order of tables

    def prompt_sets(self) -> dict[str, Path]:
        """Named prompt files shipped with the world (name -> text file, one prompt per line)."""
        return {}

    def category(self, prompt: str) -> str | None:
        """The prompt's category, or None when the prompt is not one of this world's."""
        return None

    def judge(self, images: torch.Tensor, prompts: list[str]) -> Verdict:
        """Verify each image (B, 3, H, W) in [0, 1] against its prompt. Only for a world with a verifier."""
        raise TempflowError(f"world {self.name!r} has no verifier; evaluate with a reward: --reward SPEC")

    @property
    def has_verifier(self) -> bool:
        return type(self).judge is not World.judge

    def models(self) -> dict[str, Path]:
        """Shipped model folders by name (name -> folder holding model_index.json)."""
        return {}

    def model_loaders(self) -> dict[str, Callable[[str, ModelOptions], FlowModel]]:
        """Loaders by the ``_class_name`` a model folder's model_index.json names."""
        return {}

    def rewards(self) -> dict[str, Callable[..., Any]]:
        """Reward factories by name, as in ``tempflow.rewards.REWARDS``."""
        return {}

    def pretrain(self, config: str | None, overrides: list[str], out: str) -> Path:
        """Train the world's base model from scratch with `config` (a YAML path; None: the world's
        default) and dotted overrides; returns the model folder written under `out`."""
        raise TempflowError(f"world {self.name!r} has no pretraining")


_registered: dict[str, World] = {}
_loaded: dict[str, World] = {}


def register_world(world: World) -> World:
    """Make `world` known by its name (a later registration of the same name replaces it)."""
    if not world.name:
        raise TempflowError("a world needs a name")
    _registered[world.name] = world
    return world


def _resolve(name: str, target: str) -> World:
    module, _, attr = target.partition(":")
    try:
        world = getattr(importlib.import_module(module), attr or "WORLD")
    except Exception as e:  # an entry point of a broken package: one line, naming it
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TempflowError(f"cannot load world {name!r} from {target!r}: {first}") from None
    if not isinstance(world, World):
        raise TempflowError(f"world {name!r} ({target!r}) is not a tempflow.worlds.World")
    return world


@functools.cache
def _installed() -> dict[str, str]:
    """The entry points of installed packages (name -> "module:attribute"), read once per process."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _sources() -> dict[str, str]:
    return {**_installed(), **BUILTIN}


def names() -> list[str]:
    """Every known world's name."""
    return sorted({*_sources(), *_registered})


def get_world(name: str) -> World:
    """The world of this name; an unknown name is one line that lists the known ones."""
    if name in _registered:
        return _registered[name]
    if name not in _loaded:
        sources = _sources()
        if name not in sources:
            raise TempflowError(f"unknown world {name!r}; known: {', '.join(names())}")
        _loaded[name] = _resolve(name, sources[name])
    return _loaded[name]


def all_worlds() -> list[World]:
    """Every known world, loaded: registered ones first, then the installed ones by name."""
    return [*_registered.values(), *(get_world(n) for n in names() if n not in _registered)]


def world_of(prompts: Iterable[str], sets: Iterable[str] = ()) -> World | None:
    """The world of these prompts: among the worlds whose `World.category` knows every prompt, the one
    that ships every named set in `sets` (the set names or files they came from), else the first;
    None when no world knows them all (a set's owner never claims a line it does not know)."""
    prompts, sets = list(prompts), list(sets)
    if not prompts:
        return None
    knowing = [w for w in all_worlds() if all(w.category(p) is not None for p in prompts)]
    owners = [w for w in knowing if sets and all(s in w.prompt_sets() for s in sets)]
    return (owners or knowing or [None])[0]

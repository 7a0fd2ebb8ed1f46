"""Reward registry. A reward is ``fn(images, prompts, metadata) -> scores``.

images: (B, 3, H, W) float in [0, 1]; prompts: B strings; metadata: B dicts; scores: (B,) float32.
Factories import what they need inside, so ``import tempflow`` stays light.

``make_reward(spec)`` takes a single name (``"shapes"``) or a weighted, per-reward normalised
combination (``"pickscore(norm=running):1,jpeg_compressibility:0.5"``); the spec syntax and the
normalisations are described in ``tempflow.rewards.spec``. Built-in rewards:

==========================  ==========================================================================
``jpeg_compressibility``    minus the JPEG size in kB (``tempflow.rewards.jpeg``)
``jpeg_incompressibility``  the JPEG size in kB
``pickscore``               PickScore: exp(logit_scale) * cosine, about 100 * cosine (``.clip``)
``clipscore``               CLIP-S: 2.5 * max(cosine, 0) with CLIP ViT-L/14 (``.clip``)
``aesthetic``               LAION improved aesthetic predictor on CLIP ViT-L/14 (``.clip``)
``hpsv2``                   HPSv2 / v2.1: cosine of an open_clip ViT-H-14 run as a CLIPModel (``.hps``)
``imagereward``             ImageReward (BLIP ViT-L + cross-attention text encoder + MLP)
``remote``                  a ``tempflow serve-reward`` server: ``remote@http://host:port`` (``.remote``)
==========================  ==========================================================================

Worlds add their own rewards (`tempflow.worlds.World.rewards`): the shapes world's verifier as
``shapes`` (the fraction of satisfied constraints), ``shapes_strict`` (1 where every constraint
holds) and ``shapes_graded`` (partial credit for near misses). `available_rewards` lists them all.

Every reward built here scores an image with a NaN or infinite pixel as NaN without being shown it
(``WeightedReward`` applies ``tempflow.rewards.spec.FiniteRows`` to every term).

A reward may declare ``image_size``, the side in pixels of the images it is made for (an attribute
of the reward function; the shapes world's rewards declare 64). ``tempflow serve-reward`` then accepts at most
``--max-batch`` such images' worth of pixels per request by default. Rewards that resize whatever
they get (the CLIP family, ImageReward) declare none: they take generator outputs of any size.

The model-based rewards need ``pip install tempflow[rewards]`` and take ``model=`` (a local path or
a hub id), ``device=`` (default: the GPU if there is one), ``dtype=`` and ``batch_size=``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from tempflow.errors import TempflowError
from tempflow.rewards.spec import NORMS, RewardFn, RewardSpec, WeightedReward, parse_reward_spec

__all__ = ["NORMS", "REWARDS", "RewardFn", "RewardSpec", "WeightedReward", "available_rewards", "lazy_reward",
           "make_reward", "parse_reward_spec"]


def _check_options(fn: Callable[..., Any], name: str, options: dict[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    bad = sorted(set(options) - set(params))
    if bad:
        raise TempflowError(f"reward {name!r} has no option {bad[0]!r}; its options: {', '.join(params) or 'none'}")


def lazy_reward(name: str, module: str, attr: str, image_size: int | None = None) -> Callable[..., RewardFn]:
    """A factory that imports ``module`` only when the reward is built, and checks option names.

    ``image_size``: the side in pixels of the images the reward is made for, set on the built reward
    as its ``image_size`` attribute (the reward server sizes its default request limits by it).
    """

    def factory(**kwargs: Any) -> RewardFn:
        fn = getattr(importlib.import_module(module), attr)
        _check_options(fn, name, kwargs)
        reward = fn(**kwargs)
        if image_size is not None and getattr(reward, "image_size", None) is None:
            reward.image_size = image_size  # type: ignore[attr-defined]
        return reward

    factory.__name__ = factory.__qualname__ = attr
    factory.__doc__ = f"Build the {name!r} reward ({module}.{attr}; see its docstring for the options)."
    return factory



REWARDS: dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": lazy_reward("jpeg_compressibility", "tempflow.rewards.jpeg", "make_jpeg_compressibility"),
    "jpeg_incompressibility": lazy_reward("jpeg_incompressibility", "tempflow.rewards.jpeg",
                                          "make_jpeg_incompressibility"),
    "pickscore": lazy_reward("pickscore", "tempflow.rewards.clip", "make_pickscore"),
    "clipscore": lazy_reward("clipscore", "tempflow.rewards.clip", "make_clipscore"),
    "aesthetic": lazy_reward("aesthetic", "tempflow.rewards.clip", "make_aesthetic"),
    "hpsv2": lazy_reward("hpsv2", "tempflow.rewards.hps", "make_hpsv2"),
    "imagereward": lazy_reward("imagereward", "tempflow.rewards.imagereward", "make_imagereward"),
    "remote": lazy_reward("remote", "tempflow.rewards.remote", "make_remote_reward"),
}


def available_rewards() -> dict[str, Callable[..., RewardFn]]:
    """Every reward factory by name: the worlds' rewards, then the registry's (``REWARDS``, which a
    user's module extends and which wins on a clash)."""
    from tempflow.worlds import all_worlds

    return {**{k: v for w in all_worlds() for k, v in w.rewards().items()}, **REWARDS}


def _per_term_kwargs(terms: list[RewardSpec], kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One term: kwargs are its factory's arguments. Several: kwargs map reward name -> dict of arguments."""
    if len(terms) == 1:
        return {terms[0].name: kwargs}
    names = {t.name for t in terms}
    for key, value in kwargs.items():
        if key not in names or not isinstance(value, dict):
            raise TempflowError(f"with several rewards, pass options per reward as name={{...}} for one of "
                                f"{', '.join(sorted(names))}; got {key}={value!r}")
    return kwargs


def make_reward(spec: str, **kwargs: Any) -> WeightedReward:
    """Build a reward from a spec: one registered name or a weighted combination (see ``tempflow.rewards.spec``).

    With a single term, ``kwargs`` are passed to its factory (``make_reward("aesthetic", weights=p)``);
    with several, each keyword is a reward name and its value a dict of that factory's arguments
    (``make_reward("pickscore,aesthetic:0.5", aesthetic={"weights": p})``). Options written in the
    spec come first and keyword arguments override them. The result is a ``WeightedReward``.
    """
    if isinstance(spec, str) and "remote@" in spec:  # the URL form remote@http://host:port
        from tempflow.rewards.remote import expand_url_form

        spec = expand_url_form(spec)
    terms = parse_reward_spec(spec)
    factories = available_rewards()
    for t in terms:
        if t.name not in factories:
            raise TempflowError(f"unknown reward {t.name!r}; available: {', '.join(sorted(factories))}")
    per = _per_term_kwargs(terms, kwargs)
    return WeightedReward([(t, factories[t.name](**{**t.options, **per.get(t.name, {})})) for t in terms])

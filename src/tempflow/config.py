"""Typed configuration: dataclasses are the schema, YAML presets fill them, --set overrides them.

Unknown keys and values of the wrong type fail before any work starts, with a message that names
the key and what is allowed; range checks live in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import BooleanNode, DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from tempflow.errors import ConfigError

T = TypeVar("T")


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`: the range checks of every config section."""
    if not ok:
        raise ConfigError(message)


def _allowed(node: Any) -> str:
    if isinstance(node, DictConfig):
        return ", ".join(str(k) for k in node.keys())
    return "(none)"


def _key_error(e: oc_errors.OmegaConfBaseException, schema: Any, where: str, hint: str = "") -> ConfigError:
    full = str(getattr(e, "full_key", "") or getattr(e, "key", ""))
    parent_path = full.rsplit(".", 1)[0] if "." in full else ""
    parent = OmegaConf.select(schema, parent_path) if parent_path else schema
    scope = f" under '{parent_path}'" if parent_path else ""
    return ConfigError(f"unknown config key '{full}' ({where}){'; ' + hint if hint else ''}; "
                       f"allowed{scope}: {_allowed(parent)}")


def _value_error(e: oc_errors.OmegaConfBaseException, where: str) -> ConfigError:
    full = str(getattr(e, "full_key", "") or "")
    msg = str(e).splitlines()[0]
    return ConfigError(f"bad value for config key '{full}' ({where}): {msg}")


def _merge(schema: DictConfig, other: DictConfig, where: str, hints: Any = None) -> DictConfig:
    try:
        return OmegaConf.merge(schema, other)
    except (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError) as e:
        full = str(getattr(e, "full_key", "") or getattr(e, "key", ""))
        raise _key_error(e, schema, where, hints(full) if hints else "") from None
    except oc_errors.OmegaConfBaseException as e:
        raise _value_error(e, where) from None


def find_preset(path: str | Path) -> Path:
    """A config path as given, or else relative to the project folder (presets live in configs/)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    in_project = Path(__file__).resolve().parents[2] / p
    return in_project if in_project.is_file() else p


def _read_yaml(p: Path) -> DictConfig:
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; presets live under configs/")
    try:
        data = OmegaConf.load(p)
    except Exception as e:  # YAML syntax errors and the like
        raise ConfigError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file '{p}' must hold a mapping of keys to values")
    if not data:
        raise ConfigError(f"config file '{p}' is empty; give a preset from configs/ or leave --config out")
    return data


def _read_chain(p: Path, depth: int = 0) -> list[tuple[Path, DictConfig]]:
    """A preset and the presets it extends (`extends: other.yaml`, relative to it), base first."""
    if depth > 8:
        raise ConfigError(f"config file '{p}': 'extends' goes deeper than 8 files (a cycle?)")
    data = _read_yaml(p)
    parent = data.pop("extends", None) if "extends" in data else None
    chain = _read_chain(p.parent / str(parent), depth + 1) if parent else []
    return chain + [(p, data)]


_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off")


def _check_kinds(schema: DictConfig, data: Any, where: str, prefix: str = "") -> None:
    """Refuse what OmegaConf would coerce without a word: a value where the schema has a section
    (`rollout=5`), and anything but true / false for a yes-or-no key (`guard.rollback=3`)."""
    if not isinstance(data, DictConfig | dict):
        return
    for key, value in (data.items() if isinstance(data, dict) else data.items_ex(resolve=False)):
        full = f"{prefix}{key}"
        node = schema._get_node(str(key)) if isinstance(schema, DictConfig) and key in schema else None
        if node is None:
            continue  # unknown keys are the merge's to report
        if isinstance(node, DictConfig):
            if not isinstance(value, DictConfig | dict):
                raise ConfigError(f"config key '{full}' ({where}) is a section, not a value: set its keys, e.g. "
                                  f"{full}.{next(iter(node.keys()), 'key')}=...")
            _check_kinds(node, value, where, full + ".")
        elif isinstance(node, BooleanNode) and not (
                isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_WORDS)):
            raise ConfigError(f"config key '{full}' ({where}) must be true or false, got {value!r}")


def _first_non_finite(node: Any, prefix: str = "") -> tuple[str, float] | None:
    """The dotted key and value of the first NaN or infinite number in a config tree, or None."""
    if isinstance(node, dict):
        items = ((f"{prefix}{k}", v) for k, v in node.items())
    elif isinstance(node, list):
        items = ((f"{prefix[:-1]}[{i}]", v) for i, v in enumerate(node))
    else:
        return (prefix[:-1], node) if isinstance(node, float) and not math.isfinite(node) else None
    for key, value in items:
        found = _first_non_finite(value, key + ".")
        if found is not None:
            return found
    return None


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `schema`, then the YAML file (after any file it `extends`), then ``key.sub=value``
    overrides; validated.

    A schema may define `select_sections(cfg, layers)`, which sets the schema of sections whose options
    depend on a value the layers hold (the algorithm's section, say), and `key_hint(key)`, which says
    what to write instead of an unknown key."""
    layers = [(str(p), data) for p, data in _read_chain(find_preset(path))] if path is not None else []
    bad = [o for o in overrides or [] if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} must look like key.sub=value, e.g. --set model.width=256")
    if overrides:
        try:
            layers.append(("--set", OmegaConf.from_dotlist(list(overrides))))
        except (oc_errors.OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None
    cfg = OmegaConf.structured(schema)
    if hasattr(schema, "select_sections"):
        schema.select_sections(cfg, [data for _, data in layers])
    for where, data in layers:
        _check_kinds(cfg, data, where)
        cfg = _merge(cfg, data, where, getattr(schema, "key_hint", None))
    where = _first_non_finite(OmegaConf.to_container(cfg))
    if where is not None:
        raise ConfigError(f"config key '{where[0]}' must be a finite number, got {where[1]}")
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except oc_errors.OmegaConfBaseException as e:
        raise _value_error(e, "config") from None


def to_dict(cfg: Any) -> dict:
    """A config dataclass as plain data (for saving next to results)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

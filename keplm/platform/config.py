"""Typed config loading: YAML -> pydantic models, with `section.key=value` overrides.

Each layer declares the pydantic model of its own section (subclassing :class:`Section`, which
forbids unknown keys); :mod:`keplm.config` composes them into the root tree. This module only
knows how to load, override, validate and dump such a tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from keplm.platform.errors import ConfigError

T = TypeVar("T", bound=BaseModel)

PACKAGE_SCHEME = "keplm://"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def resolve_path(path: str | Path) -> Path:
    """Resolve `keplm://rel/path` to a file shipped inside the installed package; others as given."""
    text = str(path)
    if text.startswith(PACKAGE_SCHEME):
        import keplm

        return Path(keplm.__file__).parent / text[len(PACKAGE_SCHEME):]
    return Path(text).expanduser()


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value) with the value parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"config override {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"config override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"config override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(err: ValidationError) -> str:
    """The first problem as one line naming the dotted key."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"config error: {key}: unknown key"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"config error: {key}: {first['msg']}{shown}{more}"


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_tree(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config; a top-level ``extends: other.yaml`` (relative to this file, or keplm://) is read
    first and this file's sections are deep-merged over it."""
    p = resolve_path(path)
    if p.resolve() in seen:
        raise ConfigError(f"config error: {p}: extends itself (cycle)")
    data = _read_yaml(p)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = str(parent) if str(parent).startswith(PACKAGE_SCHEME) else p.parent / str(parent)
    return deep_merge(read_yaml_tree(parent_path, (*seen, p.resolve())), data)


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load YAML at `path` (may be None: defaults only), apply overrides, validate against `schema`."""
    data = read_yaml_tree(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise ConfigError(f"config error: file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"config error: {p}{where}: not valid YAML") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config error: {p}: top level must be a mapping of sections")
    return loaded


def dump_config(cfg: BaseModel) -> dict:
    """The whole resolved config as plain JSON-able data (logged to manifests and MLflow)."""
    return cfg.model_dump(mode="json")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out

"""Typed plugin options: every setting is a dataclass field with a type, a default and a help string.

Config validation, ``graft describe`` and the docs all read these fields, so a setting is declared once.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from .errors import GraftError, did_you_mean


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           path: bool = False):
    """A dataclass field carrying a help string (shown by ``graft describe``).

    ``path=True`` marks a file or folder: a relative path is made absolute (against the working directory) when
    the config is read, and ``pkg:NAME/sub/path`` names a path inside the installed package NAME (found without
    importing it), so a run's saved config.toml works from anywhere."""
    metadata = {"help": help, "path": path}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def resolve_path(value: str, where: str) -> str:
    import importlib.util
    from pathlib import Path

    if value.startswith("pkg:"):
        name, _, rest = value[4:].partition("/")
        try:
            spec = importlib.util.find_spec(name) if name and "." not in name else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            raise GraftError(f"{where}: {value!r} names package {name!r}, which is not installed. Install it "
                             f"(pip install --no-deps ...) or give a plain path.")
        return str(Path(spec.origin).parent / rest)
    return str(Path(value).expanduser().absolute())


@dataclasses.dataclass
class NoOptions:
    """For plugins that take no options."""


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict or tp is dict:
        return "table"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def describe(cls) -> list[dict]:
    """One row per option: name, type, default, help."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append({"name": f.name, "type": type_name(hints[f.name]), "default": default,
                     "help": f.metadata.get("help", "")})
    return rows


def _check(value, tp, where: str):
    """Return value converted to tp, or raise GraftError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, where)
            except GraftError as e:
                errors.append(e)
        raise GraftError(f"{where} must be {type_name(tp)}, got {value!r} ({type(value).__name__}).")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise GraftError(f"{where} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}."
                             + did_you_mean(value, choices))
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise GraftError(f"{where} must be a list ({type_name(tp)}), got {value!r}.")
        args = typing.get_args(tp)
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise GraftError(f"{where} must be a table, got {value!r}.")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise GraftError(f"{where} must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise GraftError(f"{where} must be an integer, got {value!r} ({type(value).__name__}).")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GraftError(f"{where} must be a number, got {value!r} ({type(value).__name__}).")
        if not math.isfinite(value):  # TOML has nan and inf literals; no setting means either
            raise GraftError(f"{where} must be a finite number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise GraftError(f"{where} must be a string, got {value!r} ({type(value).__name__}).")
        return value
    return value


def build(cls, values: dict, where: str):
    """Instantiate options dataclass ``cls`` from a config table, naming ``where`` in every error."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise GraftError(f"{where}: unknown key {key!r}.{did_you_mean(key, fields)} "
                             f"Valid keys: {', '.join(fields) or '(none)'}.")
        kwargs[key] = _check(value, hints[key], f"{where}.{key}")
        if fields[key].metadata.get("path") and isinstance(kwargs[key], str) and kwargs[key]:
            kwargs[key] = resolve_path(kwargs[key], f"{where}.{key}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise GraftError(f"{where}: missing required key(s) {', '.join(missing)}.")
    obj = cls(**kwargs)
    post = getattr(obj, "validate", None)
    if post is not None:
        try:
            post()
        except (ValueError, GraftError) as e:
            raise GraftError(f"{where}: {e}") from None
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)

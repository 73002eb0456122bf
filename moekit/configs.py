"""Helpers shared by every config dataclass: validation messages, dict round-trips, dotted overrides.

Configs are frozen, keyword-only dataclasses that validate themselves in ``__post_init__``. Errors name the
field, the value received, what is allowed and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = ["check", "check_choice", "check_types", "to_dict", "from_dict", "apply_overrides", "ConfigError"]

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says how to fix it."""


def check(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{owner}.{name}={value!r} is not one of {list(allowed)}{hint}")


def _fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` is of the declared type ``tp`` (strictly: a bool is no int, a float no int)."""
    origin = get_origin(tp)
    if tp is Any or isinstance(tp, (str, TypeVar)):
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return not args or all(_fits(args[0], v) for v in value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # anything more elaborate is the config's own business


def check_types(cfg: Any, owner: str) -> None:
    """Raise :class:`ConfigError` naming the first field whose value is not of its declared type.

    Configs call it first in ``__post_init__``, so ``top_k=True`` or ``num_shared_experts=1.5`` given from
    Python fail as clearly as from a TOML file or the command line (where :func:`from_dict` coerces).
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        tp = hints.get(f.name, Any)
        if not _fits(tp, value):
            if get_origin(tp) is Literal:
                check_choice(owner, f.name, value, get_args(tp))  # names the allowed values
            shown = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            raise ConfigError(f"{owner}.{f.name}={value!r} is a {type(value).__name__}, not {shown}; give a value "
                              f"of that type")


def literal_values(owner: type, name: str) -> tuple:
    """The allowed values of a ``Literal`` field."""
    hints = typing.get_type_hints(owner)
    return get_args(hints[name])


def to_dict(cfg: Any) -> dict:
    """A JSON/TOML-friendly nested dict of a config dataclass."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} expects a table of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}={value!r} is not one of {list(allowed)}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error is the clearest message
            return _coerce(options[0], value, where)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except (ConfigError, ValueError, TypeError) as e:
                errors.append(str(e))
        raise ConfigError(f"{where}={value!r} does not fit {tp}: " + "; ".join(errors))
    if origin in (tuple, list):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        return tuple(_coerce(inner, v, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}={value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}={value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} is not an integer") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} is not a number") from None
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[C], data: dict, prefix: str = "") -> C:
    """Build a config dataclass from a nested dict, coercing values to the declared field types.

    Unknown keys raise :class:`ConfigError` that suggests the nearest valid key.
    """
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # C is any config dataclass
    names = [f.name for f in fields]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {where!r}{hint} (valid keys here: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, where)
    missing = [f.name for f in fields if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        where = ", ".join(repr(f"{prefix}.{m}" if prefix else m) for m in missing)
        first = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"missing required config key {where}; set it in the TOML file or with --{first}=...")
    return cls(**kwargs)


def apply_overrides(cfg: C, overrides: dict[str, Any]) -> C:
    """Return ``cfg`` with dotted-path overrides applied, e.g. ``{"model.moe.top_k": "4"}``."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], dict):
                if part in node and node[part] is None:
                    node[part] = {}
                else:
                    prefix = ".".join(parts[:i])
                    names = [k for k in node]
                    close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
                    hint = f"; did you mean {'.'.join(parts[:i] + [close[0]])!r}?" if close else ""
                    raise ConfigError(f"unknown config key {dotted!r}: no section {part!r}"
                                      f"{' under ' + repr(prefix) if prefix else ''}{hint}")
            node = node[part]
        node[parts[-1]] = value
    return from_dict(type(cfg), data)

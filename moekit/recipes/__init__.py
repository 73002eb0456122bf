"""Presets: TOML files shipped inside the package, each mapping onto a :class:`~moekit.training.RunConfig`.

A preset holds a top-level ``description`` (one line, shown by ``moekit presets``) and the tables
``[model]``, ``[model.moe]``, ``[data]``, ``[train]`` and ``[parallel]``. Other packages add presets by
dropping ``NAME.toml`` files here.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

from ..configs import ConfigError

__all__ = ["load_preset", "list_presets", "load_config_file", "read_toml", "merge"]


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    return tomllib


def read_toml(path: str | Path, text: str | None = None) -> dict[str, Any]:
    """Parse a TOML file; syntax errors become a :class:`ConfigError` naming the file and line."""
    tomllib = _toml()
    try:
        return tomllib.loads(Path(path).read_text() if text is None else text)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None


def _preset_files() -> dict[str, Any]:
    root = resources.files(__package__)
    return {entry.name[:-5]: entry for entry in root.iterdir() if entry.name.endswith(".toml")}


def list_presets() -> list[tuple[str, str]]:
    """``(name, description)`` of every shipped preset, sorted by name."""
    out = []
    for name, entry in sorted(_preset_files().items()):
        out.append((name, str(read_toml(entry, entry.read_text()).get("description", ""))))
    return out


def merge(base: dict, update: dict) -> dict:
    """Nested dict ``update`` laid over ``base`` (tables merge, other values replace)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset_dict(name: str, resolve_base: bool = True) -> dict[str, Any]:
    """The preset's settings as a nested dict; with ``resolve_base=False`` only the keys the preset file itself
    sets (a variant preset's overrides, without the preset it names as ``base``)."""
    files = _preset_files()
    if name not in files:
        close = difflib.get_close_matches(name, list(files), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(sorted(files))}")
    data = read_toml(files[name], files[name].read_text())
    base = data.pop("base", None)
    if base is not None and resolve_base:  # a preset may be written as overrides of another one
        if base == name:
            raise ConfigError(f"preset {name!r} names itself as its base")
        data = merge({k: v for k, v in preset_dict(base).items() if k != "description"}, data)
    return {**data, "name": name}


def load_preset(name: str):
    """The :class:`~moekit.training.RunConfig` of the shipped preset ``name``."""
    from ..training.config import run_config_from_dict
    return run_config_from_dict(preset_dict(name))


def load_config_file(path: str | Path, preset: str | None = None):
    """A TOML config file, laid over ``preset`` when given (else the file must be complete)."""
    from ..training.config import run_config_from_dict
    data = read_toml(path)
    base = data.pop("base", None)
    preset = preset or base
    if preset is not None:
        data = merge(preset_dict(preset), data)
    return run_config_from_dict(data)

"""The application registry: ``@register_app(name)`` on a module's ``run(config, out_dir)``.

Each application is a module of :mod:`moekit.apps` with a frozen keyword-only config dataclass and a
``run(config, out_dir) -> dict`` that writes the usual run folder through :class:`moekit.apps.common.AppRun`.
Field libraries (river, scikit-learn, torch-geometric) are imported inside ``run`` only, so listing the
applications never needs them; :func:`require` turns a missing one into a one-line :class:`MissingExtra`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..configs import ConfigError

__all__ = ["APP_MODULES", "AppSpec", "MissingExtra", "get_app", "list_apps", "register_app", "require"]

# Modules that define applications (imported lazily by list_apps / get_app).
APP_MODULES: tuple[str, ...] = ("driftmoe", "advmoe", "mowst", "adaptdhm", "scaling_mlps", "semm", "vdd", "coe")
APP_MODULES += ("robust_qa", "mot", "t2mir")  # issue 18 part A
APP_MODULES += ("mixer", "cmoe", "netmamba", "erw")  # issue 18 part B

_REGISTRY: dict[str, AppSpec] = {}


class MissingExtra(ConfigError):
    """A field library an application needs is not installed; the message names the ``pip install``."""


@dataclass(frozen=True)
class AppSpec:
    name: str
    summary: str
    config_cls: type
    run: Callable[[Any, Path], dict]
    requires: tuple[str, ...]


def register_app(name: str, *, config: type, summary: str, requires: tuple[str, ...] = ()):
    """Decorator: register ``run(config, out_dir) -> summary dict`` as application ``name``."""
    def wrap(fn: Callable[[Any, Path], dict]) -> Callable[[Any, Path], dict]:
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise ValueError(f"application {name!r} is registered twice")
        _REGISTRY[name] = AppSpec(name, summary, config, fn, tuple(requires))
        return fn
    return wrap


def _load_all() -> None:
    for mod in APP_MODULES:
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise  # only an application module not written yet is skipped


def list_apps() -> list[AppSpec]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_app(name: str) -> AppSpec:
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown application {name!r}; choose one of {', '.join(sorted(_REGISTRY))} "
                          f"(moekit app --list)")
    return _REGISTRY[name]


def require(*modules: str, extra: str = "apps") -> None:
    """Raise :class:`MissingExtra` naming the ``pip install`` when any of ``modules`` cannot be imported."""
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if missing:
        raise MissingExtra(f"this application needs {', '.join(missing)}: pip install 'moekit[{extra}]'")

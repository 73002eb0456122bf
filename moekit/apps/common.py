"""What every application shares: config parsing from ``key=value`` strings and the run folder writer.

A run folder holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON record per line),
``summary.json`` and one or more PNG plots; every file is written atomically (temporary file + ``os.replace``,
:func:`moekit.training.checkpoint.write_atomic`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from ..configs import ConfigError
from ..training.checkpoint import write_atomic, write_json

__all__ = ["AppRun", "check_field", "config_from_strings", "config_to_dict", "median"]


def check_field(ok: bool, cls_name: str, field: str, value: Any, allowed: str, fix: str = "") -> None:
    """Raise ``ConfigError`` naming field, value, what is allowed and the fix, unless ``ok``."""
    if not ok:
        tail = f"; {fix}" if fix else ""
        raise ConfigError(f"{cls_name}.{field}={value!r} is not allowed: {allowed}{tail}")


def _convert(name: str, text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    try:
        if tp is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is typing.Literal:
            if text not in [str(a) for a in args]:
                raise ValueError(text)
            return text
        if origin is tuple:
            items = [s.strip() for s in text.split(",") if s.strip()]
            return tuple(_convert(name, s, args[0]) for s in items)
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            if text.strip().lower() == "none":
                return None
            return _convert(name, text, next(a for a in args if a is not type(None)))
    except ValueError:
        raise ConfigError(f"--{name}={text!r} is not a valid {getattr(tp, '__name__', tp)}; "
                          f"give e.g. --{name}={_example(tp)}") from None
    raise ConfigError(f"--{name} cannot be set from the command line")


def _example(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, args))
    return {int: "3", float: "0.5", bool: "true", str: "text"}.get(tp, "a,b")


def config_from_strings(cls: type, values: dict[str, str]) -> Any:
    """Build config ``cls`` from ``{"field": "text"}``; unknown fields and bad values raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, text in values.items():
        if key not in fields:
            raise ConfigError(f"unknown setting --{key}; {cls.__name__} has {', '.join(sorted(fields))}")
        kwargs[key] = _convert(key, text, hints[key])
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


class AppRun:
    """The run folder of one application run: records metrics in memory, writes every file atomically."""

    def __init__(self, out_dir: str | Path, app: str, config: Any) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        write_json(self.dir / "config.json", {"app": app, "config": config_to_dict(config)})

    def log(self, record: dict) -> None:
        self.records.append(record)

    def flush_metrics(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        write_atomic(self.dir / "metrics.jsonl", lambda tmp: tmp.write_text(text))

    def finish(self, summary: dict) -> dict:
        self.flush_metrics()
        write_json(self.dir / "summary.json", summary)
        return summary

    def plot(self, name: str, draw) -> Path | None:
        """``draw(fig, ax)`` into ``NAME.png`` (skipped, returning None, when matplotlib is missing)."""
        try:
            import matplotlib
        except ImportError:
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        draw(fig, ax)
        path = self.dir / f"{name}.png"
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
        plt.close(fig)
        return path

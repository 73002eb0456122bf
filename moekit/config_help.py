"""Every key of a config tree with its value and meaning, read from the config dataclasses' docstrings.

``describe_config(cfg)`` walks a (nested) frozen dataclass config and returns ``(dotted key, value, meaning)``
rows; the meaning is the entry for that field in its class's ``Attributes:`` section (Google style; an entry
may name several fields, ``beta1, beta2:`` or ``num_groups / topk_groups:``). ``moekit config`` prints them.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from typing import Any

__all__ = ["describe_config", "field_docs", "format_config"]

_ENTRY = re.compile(r"^(?P<names>[A-Za-z_][\w]*(?:\s*(?:,|/)\s*[A-Za-z_][\w]*)*)\s*:\s*(?P<text>.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """``field name -> meaning`` from the ``Attributes:`` section of ``cls``'s docstring (``{}`` without one)."""
    doc = textwrap.dedent("\n".join((cls.__doc__ or "").splitlines()[1:]))
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    current: list[str] = []
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break  # the next section
        match = _ENTRY.match(line.strip()) if width == indent else None
        if match:
            current = re.split(r"\s*(?:,|/)\s*", match["names"])
            for name in current:
                out[name] = match["text"].strip()
        else:
            for name in current:
                out[name] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in out.items()}


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def describe_config(cfg: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, value as written on the command line, meaning)`` of every leaf field of ``cfg``."""
    rows: list[tuple[str, str, str]] = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            rows.append((key, "", docs.get(f.name, "")))
            rows += describe_config(value, key + ".")
        else:
            rows.append((key, _show(value), docs.get(f.name, "")))
    return rows


def format_config(rows: list[tuple[str, str, str]], width: int = 110) -> str:
    """Rows as text: ``key = value`` then the meaning, wrapped and indented; a table's own line as ``[key]``."""
    lines = []
    for key, value, meaning in rows:
        head = f"[{key}]" if value == "" else f"{key} = {value}"
        if value == "":
            lines.append("")
        lines.append(head)
        if meaning:
            lines += textwrap.wrap(meaning, width=width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines).lstrip("\n")

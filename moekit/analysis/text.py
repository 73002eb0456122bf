"""Real text that needs no download: sentences from the docstrings of the Python standard library."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Iterable, Iterator

__all__ = ["module_docstrings", "stdlib_sentences"]

_MODULES = ("argparse", "collections", "json", "re", "os", "pathlib", "functools", "itertools", "textwrap",
            "string", "datetime", "decimal", "fractions", "statistics", "random", "csv", "logging", "heapq",
            "bisect", "shutil", "tempfile", "subprocess", "threading", "queue", "socket", "email", "http.client",
            "urllib.parse", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "unittest", "doctest",
            "typing", "dataclasses", "enum", "inspect", "ast", "dis", "pickle", "copy", "pprint", "calendar",
            "contextlib", "abc", "operator", "difflib", "sqlite3", "xml.dom.minidom", "configparser", "uuid")


def module_docstrings(modules: Iterable[str]) -> Iterator[str]:
    """The docstring of each importable module in ``modules``, each followed by those of the functions and
    classes it defines (by sorted name); modules that fail to import are skipped and import warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError:  # pragma: no cover - stripped-down Pythons
                continue
            yield inspect.getdoc(module) or ""
            for _, obj in sorted(vars(module).items()):
                if ((inspect.isfunction(obj) or inspect.isclass(obj))
                        and getattr(obj, "__module__", "") == module.__name__):
                    yield inspect.getdoc(obj) or ""


def stdlib_sentences(limit: int = 400, min_chars: int = 30, max_chars: int = 240) -> list[str]:
    """Up to ``limit`` distinct sentences from standard-library docstrings, in a fixed, reproducible order."""
    seen: dict[str, None] = {}
    for doc in module_docstrings(_MODULES):
        text = re.sub(r"\s+", " ", doc)
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if min_chars <= len(sentence) <= max_chars and ">>>" not in sentence:
                seen.setdefault(sentence.strip(), None)
        if len(seen) >= limit:
            return list(seen)[:limit]
    return list(seen)

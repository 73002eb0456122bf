"""Text corpora read from files: the Python standard library's own source, or the user's files.

Files are split into training and validation by a hash of their relative path, so the split is the same on
every machine and in every run, and no file contributes to both (a model cannot score well on validation by
having memorised the same file during training).
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from pathlib import Path

from ..configs import ConfigError

__all__ = ["stdlib_root", "stdlib_files", "text_files", "split_files", "read_files", "EXCLUDED_DIRS"]

# Test suites are excluded: they are large, repetitive and not what the corpus is meant to model.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _spread(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spread over the (sorted) list."""
    if limit is None or limit >= len(items):
        return items
    return [items[(i * len(items)) // limit] for i in range(limit)]


def stdlib_files(max_files: int | None = None) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the standard library's ``.py`` files without tests, sorted."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(dirpath) / name
                out.append((path.relative_to(root).as_posix(), path))
    if not out:
        raise ConfigError(f"no Python sources found under {root}; use data.source=text with data.path=...")
    return _spread(sorted(out), max_files)


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(4096)


def text_files(path: str | os.PathLike, max_files: int | None = None) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the text files under a folder (hidden entries and binaries skipped)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"data.path={str(path)!r} does not exist; give a text file or a folder of them")
    if root.is_file():
        return [(root.name, root)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and p.is_file() and _is_text(p):
                out.append((p.relative_to(root).as_posix(), p))
    if not out:
        raise ConfigError(f"data.path={str(path)!r} holds no text files")
    return _spread(sorted(out), max_files)


def _split_hash(rel: str) -> int:
    return zlib.crc32(rel.encode("utf-8")) % 10_000


def split_files(files: list[tuple[str, Path]], val_fraction: float) -> tuple[list, list]:
    """Deterministic split by file; both parts are non-empty when there are at least two files."""
    threshold = round(val_fraction * 10_000)
    train = [f for f in files if _split_hash(f[0]) >= threshold]
    val = [f for f in files if _split_hash(f[0]) < threshold]
    if len(files) >= 2 and (not train or not val):
        # Too few files for the hash to land in both parts: move the file nearest the threshold across.
        pool = val if not train else train
        moved = min(pool, key=lambda f: abs(_split_hash(f[0]) - threshold))
        pool.remove(moved)
        (train if not train else val).append(moved)
    return train, val


def read_files(files: list[tuple[str, Path]], max_bytes: int | None = None) -> bytes:
    """The files' bytes joined by newlines, stopping once ``max_bytes`` is reached."""
    parts, total = [], 0
    for _, path in files:
        data = path.read_bytes()
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        parts.append(data)
        total += len(data) + 1
        if max_bytes is not None and total >= max_bytes:
            break
    return b"\n".join(parts)

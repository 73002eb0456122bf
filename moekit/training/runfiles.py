"""Single files of a run folder: their names, atomic writes, checked JSON reads, and :class:`CheckpointError`.

Single files (``config.json``, ``summary.json``, plots) are written by :func:`write_atomic`: a new temporary
file in the same folder, then ``os.replace``, which also replaces a planted symlink instead of writing
through it. A leftover temporary file (``.tmp-*``, from a process killed mid-write) is removed by the next
checkpoint writer (:func:`moekit.training.checkpoint_sets.clean_checkpoints`).

Everything here is re-exported by :mod:`moekit.training.checkpoint`, the one module callers import.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..configs import ConfigError

__all__ = ["CONFIG_FILE", "CheckpointError", "adapters_path", "hf_base_path", "loop_report_path", "read_json",
           "write_atomic", "write_json"]

CONFIG_FILE = "config.json"


def adapters_path(run_dir: str | os.PathLike) -> Path:
    """The adapter file of a fine-tuning run (``moekit finetune``): its header says which adapters the model has."""
    return Path(run_dir) / "adapters.safetensors"


def loop_report_path(run_dir: str | os.PathLike) -> Path:
    """The report of a ``moekit finetune --loop sema|mome`` run (per-task or per-step records, JSON)."""
    return Path(run_dir) / "loop_report.json"


def hf_base_path(run_dir: str | os.PathLike) -> Path:
    """The file of a ``moekit finetune --hf`` run naming the transformers model folder its frozen base comes from."""
    return Path(run_dir) / "hf_base.json"


class CheckpointError(ConfigError):
    """A run folder or checkpoint that is missing, incomplete or corrupt; the message says which file."""


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some platforms cannot open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a new temporary file beside ``path``, then replace ``path`` with it.

    The temporary name is random and created exclusively, and ``os.replace`` swaps a symlink at ``path``
    for the file rather than writing through it. On any failure the temporary file is removed.
    """
    path = Path(path)
    # The suffix is kept (a plot's format follows it); a leftover ".tmp-*" is removed by the next writer.
    tmp = path.parent / f".tmp-{path.stem}-{secrets.token_hex(6)}{path.suffix}"
    # Created exclusively, with the umask's permissions (mkstemp's 0600 would hide the run from its group).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    write_atomic(Path(path), write)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a missing, corrupt or non-object file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is {path.parent} a moekit run folder (moekit train --out)?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-run training or restore the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt (a JSON {type(data).__name__}, not an object); re-run "
                              f"training or restore the file")
    return data

"""Checkpoint sets: the ``ckpt/step_*`` folders of a run, which one is current, and committing a new one.

A checkpoint set is one folder ``ckpt/step_<step>`` holding ``model.safetensors``, ``optimizer.safetensors``
and ``state.json`` (what goes in them: :mod:`moekit.training.checkpoint`).

**Atomicity.** A set is written whole into a fresh temporary folder ``ckpt/.tmp-*`` (each file fsynced), which
is then renamed to ``ckpt/step_<step>`` in one ``os.rename``: a ``step_*`` folder exists only once complete.
The current checkpoint is the ``step_*`` folder with the highest ``(step, revision)``; a second save of the
same step becomes ``step_<step>_r<n>`` (revision ``n``), so no save ever renames over the current set. Older
sets are deleted only after the new one is in place, and leftovers of an interrupted save
(``.tmp-*``/``.trash-*``) are removed by the next writer (:func:`clean_checkpoints`). Whatever moment a
process dies at (``kill -9``, a second Ctrl-C, a full disk), the folder holds the previous complete set or
the new one.

**Old layout.** Folders written before checkpoint sets (the three files at the top of the run folder) are
still read; the first new save writes ``ckpt/`` beside them, which then wins.

Everything public here is re-exported by :mod:`moekit.training.checkpoint`, the one module callers import.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from .runfiles import CheckpointError, fsync_dir, fsync_file

__all__ = ["CKPT_DIR", "MODEL_FILE", "OPTIM_FILE", "STATE_FILE", "checkpoint_dir", "clean_checkpoints",
           "has_checkpoint", "read_current", "weights_path", "write_set"]

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
CKPT_DIR = "ckpt"
_SET_RE = re.compile(r"^step_(\d+)(?:_r(\d+))?$")
T = TypeVar("T")


def _set_key(path: Path) -> tuple[int, int] | None:
    m = _SET_RE.match(path.name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m and path.is_dir() and not path.is_symlink() else None


def _sets(run_dir: Path) -> list[tuple[tuple[int, int], Path]]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(_set_key(p), p) for p in root.iterdir()]
    return sorted((k, p) for k, p in found if k is not None)


def checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The folder of the current complete checkpoint (``ckpt/step_*``, or the run folder itself for the old
    layout), or ``None`` when there is none yet."""
    run_dir = Path(run_dir)
    sets = _sets(run_dir)
    if sets:
        return sets[-1][1]
    if (run_dir / STATE_FILE).is_file():  # the old layout, files at the top
        return run_dir
    return None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume from or load."""
    return checkpoint_dir(run_dir) is not None


def _current(run_dir: Path) -> Path:
    found = checkpoint_dir(run_dir)
    if found is None:
        if not run_dir.is_dir():
            raise CheckpointError(f"run folder {str(run_dir)!r} does not exist; give the --out folder of a "
                                  f"moekit train run")
        raise CheckpointError(f"{run_dir} holds no checkpoint yet (no {CKPT_DIR}/step_* folder): the run stopped "
                              f"before its first one; start it again without --resume")
    return found


def weights_path(run_dir: str | Path) -> Path:
    """The weights file (``model.safetensors``) of the current checkpoint, e.g. to memory-map it."""
    return _current(Path(run_dir)) / MODEL_FILE


def read_current(run_dir: Path, read: Callable[[Path], T]) -> T:
    """``read(current checkpoint folder)``, retried when a writer replaced the set while it was being read."""
    for _ in range(3):
        folder = _current(run_dir)
        try:
            return read(folder)
        except (CheckpointError, FileNotFoundError):
            if folder.exists() or _current(run_dir) == folder:
                raise
    return read(_current(run_dir))


def clean_checkpoints(run_dir: str | Path) -> None:
    """Remove what interrupted saves left (``ckpt/.tmp-*``, ``.trash-*``, temporary files of single-file
    writes) and every set older than the current one. Only the process that holds the run folder's lock
    calls this."""
    run_dir = Path(run_dir)
    root = run_dir / CKPT_DIR
    for folder in (run_dir, root):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                _remove(p)
    for _, old in _sets(run_dir)[:-1]:
        trash = old.with_name(f".trash-{old.name}-{os.getpid()}")
        os.rename(old, trash)  # one rename takes it out of the candidates; deleting can then be interrupted
        _remove(trash)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_set(run_dir: Path, state: dict, files: Mapping[str, Callable[[Path], object]]) -> Path:
    """Write ``files`` (name -> writer) and ``state.json`` into a new set, switched to in one rename."""
    run_dir = Path(run_dir)
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"state['step']={step!r} must be a non-negative integer")
    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:08d}-{secrets.token_hex(6)}"
    tmp.mkdir()  # exclusive, with the umask's permissions
    try:
        for name, write in files.items():
            write(tmp / name)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        mode = 0o666 & ~_umask()  # safetensors creates its files 0600; give them the usual permissions
        for name in (*files, STATE_FILE):
            os.chmod(tmp / name, mode)
            fsync_file(tmp / name)
        sets = _sets(run_dir)
        revision = max((k[1] + 1 for k, _ in sets if k[0] == step), default=0)
        final = root / (f"step_{step:08d}" + (f"_r{revision}" if revision else ""))
        os.rename(tmp, final)  # the commit: the set appears complete or not at all
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(root)
    clean_checkpoints(run_dir)
    return final

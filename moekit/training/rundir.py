"""Guarding a run folder: one writer at a time, never someone else's folder, nothing written before a run
is known to start.

- :class:`RunLock`: an exclusive ``fcntl.flock`` on ``<run>/.lock``, taken by the one process that writes the
  folder (rank 0) for the whole of :func:`moekit.training.train`. The kernel releases it when the process
  exits, however it dies, so a crash never leaves a stale lock; a second trainer on the same folder is
  refused with a message naming the holder's pid. (On platforms without ``fcntl`` the lock is skipped.)
- :func:`check_run_dir`: a new run goes only into a missing folder, an empty one, or a moekit run folder
  that holds no checkpoint yet; ``--resume`` needs a checkpoint. Nothing is written by the check.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .checkpoint import CONFIG_FILE, CheckpointError, has_checkpoint

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunLock", "check_run_dir"]

LOCK_FILE = ".lock"
# What a run folder may hold besides its own files when a new run starts in it.
_IGNORED = {LOCK_FILE}


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder exclusively (creating the folder if needed)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CheckpointError(f"{path} is a symlink; remove it (a run folder's lock is a plain file)") \
                    from None
            raise
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(f"run folder {self.run_dir} is in use by another moekit process (pid "
                                      f"{holder}); wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _has_any_checkpoint(run_dir: Path) -> bool:
    """A complete single-file checkpoint set, or a complete sharded (torch.distributed.checkpoint) one."""
    if has_checkpoint(run_dir):
        return True
    from ..parallel.dcp import has_sharded
    return has_sharded(run_dir)


def check_run_dir(run_dir: str | Path, resume: bool) -> None:
    """Refuse a folder a run must not write into (see the module docstring); writes nothing."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() and not run_dir.is_dir():
        raise CheckpointError(f"--out {run_dir} is a symlink to nothing; give a real folder")
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out {run_dir} is a file, not a folder; choose another --out")
    if resume:
        if not run_dir.is_dir():
            raise CheckpointError(f"run folder {str(run_dir)!r} does not exist; --resume continues the --out "
                                  f"folder of an earlier moekit train run")
        if not _has_any_checkpoint(run_dir):
            raise CheckpointError(f"{run_dir} holds no checkpoint yet (the run stopped before its first one); "
                                  f"start it again without --resume")
        return
    if not run_dir.is_dir():
        return
    if _has_any_checkpoint(run_dir):
        raise CheckpointError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    others = [p.name for p in run_dir.iterdir() if p.name not in _IGNORED]
    if others and not (run_dir / CONFIG_FILE).is_file():
        shown = ", ".join(sorted(others)[:3]) + (", ..." if len(others) > 3 else "")
        raise CheckpointError(f"--out {run_dir} is not empty and is not a moekit run folder (it holds {shown}); "
                              f"choose a new or empty folder")

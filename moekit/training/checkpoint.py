"""Checkpoints as atomic sets: safetensors for tensors, JSON for the rest. Never pickle.

A run folder holds::

    config.json                 the fully resolved RunConfig
    metrics.jsonl, summary.json the run's records (see the trainer)
    ckpt/step_00000040/         the current checkpoint, one complete set:
        model.safetensors       weights and persistent buffers (the expert biases among them)
        optimizer.safetensors   AdamW moments per parameter name, and the RNG states
        state.json              step, tokens, elapsed time

**Atomicity.** A checkpoint set is written whole into a fresh temporary folder ``ckpt/.tmp-*`` (each file
fsynced), which is then renamed to ``ckpt/step_<step>`` in one ``os.rename``: a ``step_*`` folder exists only
once complete. The current checkpoint is the ``step_*`` folder with the highest ``(step, revision)``; a second
save of the same step becomes ``step_<step>_r<n>`` (revision ``n``), so no save ever renames over the current
set. Older sets are deleted only after the new one is in place, and leftovers of an interrupted save
(``.tmp-*``/``.trash-*``) are removed by the next writer (:func:`clean_checkpoints`). Whatever moment a
process dies at (``kill -9``, a second Ctrl-C, a full disk), the folder holds the previous complete set or
the new one. Non-finite tensors are refused before anything is written.

Single files (``config.json``, ``summary.json``, plots) are written by :func:`write_atomic`: a new temporary
file in the same folder, then ``os.replace``, which also replaces a planted symlink instead of writing
through it.

**Old layout.** Folders written before checkpoint sets (``model.safetensors``, ``optimizer.safetensors`` and
``state.json`` at the top) are still read; the first new save writes ``ckpt/`` beside them, which then wins.

The tensors are always those of the full, unsharded model: an expert-parallel run gathers its experts and
writes them through :func:`write_checkpoint` (see :mod:`moekit.training.distributed`), and
:func:`read_checkpoint` gives them back for loading into any layout.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from ..configs import ConfigError

__all__ = [
    "CKPT_DIR",
    "CONFIG_FILE",
    "MODEL_FILE",
    "OPTIM_FILE",
    "STATE_FILE",
    "adapters_path",
    "CheckpointError",
    "checkpoint_dir",
    "clean_checkpoints",
    "has_checkpoint",
    "hf_base_path",
    "load_checkpoint",
    "loop_report_path",
    "optimizer_state_by_name",
    "read_checkpoint",
    "read_json",
    "read_state",
    "save_checkpoint",
    "set_rng_states",
    "weights_path",
    "write_atomic",
    "write_checkpoint",
    "write_json",
]

MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE = ("model.safetensors", "optimizer.safetensors", "state.json",
                                                   "config.json")
CKPT_DIR = "ckpt"
_SET_RE = re.compile(r"^step_(\d+)(?:_r(\d+))?$")
T = TypeVar("T")


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


# ---------------------------------------------------------------------------------------------- single files

def _fsync_dir(path: Path) -> None:
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


def _fsync_file(path: Path) -> None:
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
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


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


# ------------------------------------------------------------------------------------------ checkpoint sets

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


def _read_current(run_dir: Path, read: Callable[[Path], T]) -> T:
    """``read(current checkpoint folder)``, retried when a writer replaced the set while it was being read."""
    for _ in range(3):
        folder = _current(run_dir)
        try:
            return read(folder)
        except (CheckpointError, FileNotFoundError):
            if folder.exists() or _current(run_dir) == folder:
                raise
    return read(_current(run_dir))


def _check_finite(tensors: Mapping[str, torch.Tensor], what: str, step: int | None) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"refusing to save step {step}: {what} tensor {name!r} holds NaN or inf; the "
                                  f"previous checkpoint is kept (lower train.lr, or see train.on_nonfinite)")


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


def _write_set(run_dir: Path, state: dict, files: Mapping[str, Callable[[Path], object]]) -> Path:
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
            _fsync_file(tmp / name)
        sets = _sets(run_dir)
        revision = max((k[1] + 1 for k, _ in sets if k[0] == step), default=0)
        final = root / (f"step_{step:08d}" + (f"_r{revision}" if revision else ""))
        os.rename(tmp, final)  # the commit: the set appears complete or not at all
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(root)
    clean_checkpoints(run_dir)
    return final


# --------------------------------------------------------------------------------------------------- writing

def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def _optimizer_file(optimizer_state: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    tensors = _rng_tensors()
    for name, fields in optimizer_state.items():
        for key, value in fields.items():
            tensors[f"adam.{name}.{key}"] = value.detach().contiguous()
    return tensors


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """``{parameter name: optimizer state}`` for every parameter that has state, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: dict(optimizer.state[p]) for group in optimizer.param_groups for p in group["params"]
            if optimizer.state.get(p)}


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write model, optimizer (+ RNG) and ``state`` (must hold ``step``) as one atomic checkpoint set."""
    write_checkpoint(out_dir, model.state_dict(), optimizer_state_by_name(model, optimizer), state)


def _deduplicate(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors with one entry per shared storage, and ``{dropped name: kept name}`` (as ``save_model`` does)."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name in sorted(tensors):
        t = tensors[name]
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key], kept[name] = name, t.detach().contiguous()
    return kept, aliases


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.save_file``, with its I/O failures (a full disk) raised as the ``OSError`` they are."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        number = int(code.group(1)) if code else 0
        raise OSError(number, f"cannot write {path.name} ({os.strerror(number) if number else e}); the "
                      f"previous checkpoint is kept") from None


def write_checkpoint(out_dir: Path, model_state: Mapping[str, torch.Tensor],
                     optimizer_state: Mapping[str, Mapping[str, torch.Tensor]], state: dict) -> None:
    """:func:`save_checkpoint` from tensors: a full state dict and ``{parameter name: optimizer state}`` (what
    rank 0 writes for an expert-parallel model, whose experts it has gathered). Same set, same format."""
    step = state.get("step")
    meta = {"step": str(step)}
    tensors, aliases = _deduplicate(model_state)
    optim = _optimizer_file(optimizer_state)
    _check_finite(tensors, "model", step)
    _check_finite(optim, "optimizer", step)
    _write_set(Path(out_dir), state, {
        MODEL_FILE: lambda p: _save_tensors(tensors, p, {**aliases, **meta}),
        OPTIM_FILE: lambda p: _save_tensors(optim, p, meta)})


# --------------------------------------------------------------------------------------------------- reading

def _read_state_in(folder: Path) -> dict:
    path = folder / STATE_FILE
    state = read_json(path)
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} has no valid step (got {step!r}); the checkpoint is incomplete or corrupt")
    return state


def read_state(out_dir: Path) -> dict:
    """The ``state.json`` of the current checkpoint (``step``, ``tokens``, ``elapsed``, ...)."""
    return _read_current(Path(out_dir), _read_state_in)


def _load_tensors(path: Path, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the run folder holds no complete checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-run training or restore the file") from None
    if meta.get("step") != str(step):
        raise CheckpointError(f"{path} is from step {meta.get('step')} but state.json says step {step}; the "
                              f"checkpoint was interrupted while being written; re-run training")
    return tensors, meta


def load_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = False) -> dict:
    """Load weights (and optimizer moments, RNG states) into already-built objects; return ``state``."""
    return _read_current(Path(out_dir), lambda folder: _load_into(folder, model, optimizer, restore_rng))


def _load_into(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, restore_rng: bool) -> dict:
    state = _read_state_in(folder)
    _load_tensors(folder / MODEL_FILE, state["step"])  # validates file and step before loading
    try:
        missing, unexpected = load_model(model, str(folder / MODEL_FILE), strict=False)
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{folder / MODEL_FILE} does not fit the model in config.json ({e})") from None
    if missing or unexpected:
        raise CheckpointError(f"{folder / MODEL_FILE} does not fit the model in config.json: missing "
                              f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    if optimizer is not None or restore_rng:
        tensors, _ = _load_tensors(folder / OPTIM_FILE, state["step"])
        if optimizer is not None:
            _load_optimizer(optimizer, model, tensors)
        if restore_rng:
            set_rng_states(tensors)
    return state


def _load_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("adam."):
            name, field = key[len("adam."):].rsplit(".", 1)
            if name not in params:
                raise CheckpointError(f"optimizer state names an unknown parameter {name!r}; the checkpoint "
                                      f"does not belong to this model")
            p = params[name]
            optimizer.state[p][field] = value if field == "step" else value.to(p.device)


def read_checkpoint(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, dict], dict[str, torch.Tensor]]:
    """The checkpoint's tensors, for loading into a model of another layout (an expert-parallel one).

    Returns:
        ``(state, full model state dict, {parameter name: optimizer state}, RNG states)``; names that shared a
        tensor with another when written are restored from the file's metadata.
    """
    return _read_current(Path(out_dir), _read_set)


def _read_set(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, dict], dict[str, torch.Tensor]]:
    state = _read_state_in(folder)
    model_state, meta = _load_tensors(folder / MODEL_FILE, state["step"])
    for alias, name in meta.items():
        if alias not in model_state and name in model_state:
            model_state[alias] = model_state[name]
    tensors, _ = _load_tensors(folder / OPTIM_FILE, state["step"])
    optimizer_state: dict[str, dict] = {}
    rng = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            name, field = key[len("adam."):].rsplit(".", 1)
            optimizer_state.setdefault(name, {})[field] = value
        elif key.startswith("rng."):
            rng[key] = value
    return state, model_state, optimizer_state, rng


def set_rng_states(rng: Mapping[str, torch.Tensor]) -> None:
    """Set the RNG states saved in a checkpoint."""
    if "rng.torch" not in rng:
        raise CheckpointError("the checkpoint's optimizer file holds no RNG state (rng.torch); it is incomplete")
    torch.set_rng_state(rng["rng.torch"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])

"""Checkpoints as atomic sets: safetensors for tensors, JSON for the rest. Never pickle.

A run folder holds::

    config.json                 the fully resolved RunConfig
    metrics.jsonl, summary.json the run's records (see the trainer)
    ckpt/step_00000040/         the current checkpoint, one complete set:
        model.safetensors       weights and persistent buffers (the expert biases among them)
        optimizer.safetensors   AdamW moments per parameter name, and the RNG states
        state.json              step, tokens, elapsed time

This module is the one callers import: it writes and reads the set's tensors and re-exports the rest.
:mod:`moekit.training.checkpoint_sets` finds the current set and commits a new one in one rename (a process
killed at any moment leaves the previous complete set or the new one; the old layout, files at the top of the
run folder, is still read); :mod:`moekit.training.runfiles` writes single files atomically
(:func:`write_atomic`, :func:`write_json`) and reads JSON (:func:`read_json`). Non-finite tensors are refused
before anything is written.

The tensors are always those of the full, unsharded model: an expert-parallel run gathers its experts and
writes them through :func:`write_checkpoint` (see :mod:`moekit.training.distributed`), and
:func:`read_checkpoint` gives them back for loading into any layout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from .checkpoint_sets import (
    CKPT_DIR,
    MODEL_FILE,
    OPTIM_FILE,
    STATE_FILE,
    checkpoint_dir,
    clean_checkpoints,
    has_checkpoint,
    read_current,
    weights_path,
    write_set,
)
from .runfiles import (
    CONFIG_FILE,
    CheckpointError,
    adapters_path,
    hf_base_path,
    loop_report_path,
    read_json,
    write_atomic,
    write_json,
)

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


def _check_finite(tensors: Mapping[str, torch.Tensor], what: str, step: int | None) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"refusing to save step {step}: {what} tensor {name!r} holds NaN or inf; the "
                                  f"previous checkpoint is kept (lower train.lr, or see train.on_nonfinite)")


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
    write_set(Path(out_dir), state, {
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
    return read_current(Path(out_dir), _read_state_in)


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
    return read_current(Path(out_dir), lambda folder: _load_into(folder, model, optimizer, restore_rng))


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
    return read_current(Path(out_dir), _read_set)


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

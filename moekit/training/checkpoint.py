"""Checkpoints: safetensors for tensors, JSON for the rest, each file written atomically. Never pickle.

A run folder holds::

    config.json             the fully resolved RunConfig
    model.safetensors       weights and persistent buffers (the expert biases among them)
    optimizer.safetensors   AdamW moments per parameter name, and the RNG states
    state.json              step, tokens, elapsed time, written last: it names the step of the other files

Every file is written under a temporary name and renamed into place. Both safetensors files carry the step in
their metadata; a mismatch with ``state.json`` (a crash between renames) is reported, not silently loaded.

The tensors are always those of the full, unsharded model: an expert-parallel run gathers its experts and
writes them through :func:`write_checkpoint` (see :mod:`moekit.training.distributed`), and
:func:`read_checkpoint` gives them back for loading into any layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..configs import ConfigError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "write_checkpoint", "read_checkpoint",
           "optimizer_state_by_name", "set_rng_states", "read_state", "write_json", "read_json", "MODEL_FILE",
           "OPTIM_FILE", "STATE_FILE", "CONFIG_FILE", "weights_path"]

MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE = ("model.safetensors", "optimizer.safetensors", "state.json",
                                                   "config.json")


class CheckpointError(ConfigError):
    """A run folder or checkpoint that is missing, incomplete or corrupt; the message says which file."""


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def weights_path(run_dir: str | Path) -> Path:
    """The safetensors file holding a run's model weights (for readers that memory-map it)."""
    return Path(run_dir) / MODEL_FILE


def write_json(path: Path, data: Any) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    _atomic(Path(path), write)


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is {path.parent} a moekit run folder (moekit train --out)?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-run training or restore the file") from None


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
    """Write model, optimizer (+ RNG) and ``state`` (must hold ``step``) atomically, ``state.json`` last."""
    out_dir = Path(out_dir)
    meta = {"step": str(state["step"])}
    _atomic(out_dir / MODEL_FILE, lambda tmp: save_model(model, str(tmp), metadata=meta))
    tensors = _optimizer_file(optimizer_state_by_name(model, optimizer))
    _atomic(out_dir / OPTIM_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    write_json(out_dir / STATE_FILE, state)


def _deduplicate(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors with one entry per shared storage, and ``{dropped name: kept name}`` (as ``save_model`` does)."""
    kept, aliases, seen = {}, {}, {}
    for name in sorted(tensors):
        t = tensors[name]
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key], kept[name] = name, t.detach().contiguous()
    return kept, aliases


def write_checkpoint(out_dir: Path, model_state: Mapping[str, torch.Tensor],
                     optimizer_state: Mapping[str, Mapping[str, torch.Tensor]], state: dict) -> None:
    """:func:`save_checkpoint` from tensors: a full state dict and ``{parameter name: optimizer state}`` (what
    rank 0 writes for an expert-parallel model, whose experts it has gathered). Same files, same format."""
    out_dir = Path(out_dir)
    meta = {"step": str(state["step"])}
    tensors, aliases = _deduplicate(model_state)
    _atomic(out_dir / MODEL_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={**aliases, **meta}))
    optim = _optimizer_file(optimizer_state)
    _atomic(out_dir / OPTIM_FILE, lambda tmp: save_file(optim, str(tmp), metadata=meta))
    write_json(out_dir / STATE_FILE, state)


def read_state(out_dir: Path) -> dict:
    state = read_json(Path(out_dir) / STATE_FILE)
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"{Path(out_dir) / STATE_FILE} has no step; the checkpoint is incomplete")
    return state


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
    out_dir = Path(out_dir)
    state = read_state(out_dir)
    _load_tensors(out_dir / MODEL_FILE, state["step"])  # validates file and step before loading
    try:
        missing, unexpected = load_model(model, str(out_dir / MODEL_FILE), strict=False)
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{out_dir / MODEL_FILE} does not fit the model in config.json ({e})") from None
    if missing or unexpected:
        raise CheckpointError(f"{out_dir / MODEL_FILE} does not fit the model in config.json: missing "
                              f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    if optimizer is not None or restore_rng:
        tensors, _ = _load_tensors(out_dir / OPTIM_FILE, state["step"])
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
    out_dir = Path(out_dir)
    state = read_state(out_dir)
    model_state, meta = _load_tensors(out_dir / MODEL_FILE, state["step"])
    for alias, name in meta.items():
        if alias not in model_state and name in model_state:
            model_state[alias] = model_state[name]
    tensors, _ = _load_tensors(out_dir / OPTIM_FILE, state["step"])
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
    torch.set_rng_state(rng["rng.torch"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])

"""Checkpoints: safetensors for tensors, JSON for the rest, each file written atomically. Never pickle.

A run folder holds::

    config.json             the fully resolved RunConfig
    model.safetensors       weights and persistent buffers (the expert biases among them)
    optimizer.safetensors   AdamW moments per parameter name, and the RNG states
    state.json              step, tokens, elapsed time, written last: it names the step of the other files

Every file is written under a temporary name and renamed into place. Both safetensors files carry the step in
their metadata; a mismatch with ``state.json`` (a crash between renames) is reported, not silently loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..configs import ConfigError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_state", "write_json", "read_json",
           "MODEL_FILE", "OPTIM_FILE", "STATE_FILE", "CONFIG_FILE"]

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


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write model, optimizer (+ RNG) and ``state`` (must hold ``step``) atomically, ``state.json`` last."""
    out_dir = Path(out_dir)
    meta = {"step": str(state["step"])}
    _atomic(out_dir / MODEL_FILE, lambda tmp: save_model(model, str(tmp), metadata=meta))
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"adam.{names[id(p)]}.{key}"] = value.detach().contiguous()
    _atomic(out_dir / OPTIM_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
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
            torch.set_rng_state(tensors["rng.torch"])
            if "rng.cuda" in tensors and torch.cuda.is_available():
                torch.cuda.set_rng_state(tensors["rng.cuda"])
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

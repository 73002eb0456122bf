"""The compressed artefact: a run folder that ``moekit eval``, ``sample`` and ``analyze`` open through
:func:`moekit.training.load_run` like any other.

It holds the source run's ``config.json``, a checkpoint written by :func:`~moekit.training.checkpoint.write_checkpoint`
(safetensors only: packed low-bit codes, scales, slot maps and codebooks are all tensors), and ``compression.json``,
the header::

    {"format": "moekit-compressed-experts", "version": 1, "method": ..., "options": {...},
     "layers": {"layers.0.ffn": {"num_experts": E', "top_k": K', "bank": BankSpec fields}}, "report": {...}}

Loading rebuilds the model from ``config.json``, applies each layer's structure from the header (router rows,
compressed bank of the declared format), then checks every tensor's presence, shape and dtype before loading,
and says which one is wrong. The whole folder is written under a temporary name beside ``--out`` and renamed
into place, so ``--out`` appears only once everything succeeded.

A patched transformers model is saved to one ``.safetensors`` file with the same header in its metadata
(:func:`save_compressed_state`, :func:`load_compressed_state`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..configs import to_dict
from ..training.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    read_checkpoint,
    read_json,
    write_checkpoint,
    write_json,
)
from .bank import BankSpec, CompressedBank
from .calibrate import find_moe_layers
from .surgery import install_bank, prune_router

__all__ = [
    "CODEBOOK_KEY",
    "FORMAT",
    "HEADER_FILE",
    "VERSION",
    "header_of",
    "is_compressed_run",
    "load_compressed_into",
    "load_compressed_state",
    "save_compressed_run",
    "save_compressed_state",
]

FORMAT, VERSION, HEADER_FILE = "moekit-compressed-experts", 1, "compression.json"
CODEBOOK_KEY = "compression.codebook"


def header_of(model: nn.Module, method: str, options: dict, report: dict | None = None) -> dict:
    layers = {}
    for name, moe in find_moe_layers(model):
        if isinstance(moe.experts, CompressedBank):
            layers[name] = {"num_experts": moe.config.num_experts, "top_k": moe.config.top_k,
                            "bank": moe.experts.spec.to_dict()}
    return {"format": FORMAT, "version": VERSION, "method": method, "options": options, "layers": layers,
            "report": report or {}}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.state_dict())
    for _, moe in find_moe_layers(model):
        book = getattr(moe.experts, "codebook", None)
        if book is not None:
            tensors[CODEBOOK_KEY] = book
    return tensors


def save_compressed_run(out_dir: str | Path, run_config, model: nn.Module, header: dict, state: dict) -> Path:
    """Write the compressed run folder ``out_dir`` (which must not exist yet, or be empty) all at once."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} already exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_json(tmp / CONFIG_FILE, to_dict(run_config))
        write_json(tmp / HEADER_FILE, header)
        write_checkpoint(tmp, _tensors(model), {}, {"step": int(state.get("step", 0)),
                                                     "compressed_from": state.get("compressed_from")})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_compressed_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / HEADER_FILE).is_file()


def _check_header(header: dict, where: str) -> None:
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{where} names format {header.get('format')!r}, not {FORMAT!r}; it was not written "
                              f"by moekit compress")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{where} is version {header.get('version')!r}; this moekit reads version {VERSION}; "
                              f"upgrade moekit or re-run moekit compress")


def apply_structure(model: nn.Module, header: dict, where: str) -> None:
    """Give each layer named in the header its compressed structure (empty buffers of the declared shapes)."""
    layers = dict(find_moe_layers(model))
    for name, entry in header.get("layers", {}).items():
        if name not in layers:
            raise CheckpointError(f"{where} names MoE layer {name!r}, which the model built from its config lacks")
        moe = layers[name]
        try:
            spec = BankSpec(**entry["bank"])
            if entry["num_experts"] != moe.config.num_experts:
                prune_router(moe, list(range(entry["num_experts"])))
            install_bank(moe, CompressedBank.empty(spec))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: layer {name!r} has an invalid entry ({e}); re-run moekit compress") from None
        if moe.config.top_k != entry["top_k"]:
            raise CheckpointError(f"{where}: layer {name!r} expects top_k={entry['top_k']} but the model has "
                                  f"{moe.config.top_k}")


def load_checked(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load ``tensors`` into ``model`` after checking every name, shape and dtype; set shared codebooks."""
    book = tensors.pop(CODEBOOK_KEY, None)
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit the compressed model: missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}")
    for key, t in want.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(t.shape) or got.dtype != t.dtype:
            raise CheckpointError(f"{where}: tensor {key!r} is {tuple(got.shape)} {got.dtype} but the header "
                                  f"implies {tuple(t.shape)} {t.dtype}; the file is corrupt or from another model")
    model.load_state_dict(tensors, strict=True)
    banks = [moe.experts for _, moe in find_moe_layers(model) if isinstance(moe.experts, CompressedBank)]
    for b in banks:
        try:
            b.check_buffers(where)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if any(b.spec.format == "tunstall" for b in banks):
        if book is None:
            raise CheckpointError(f"{where} holds entropy-coded experts but no {CODEBOOK_KEY!r} tensor")
        from .codec import check_codebook
        check_codebook(book, where)
        for b in banks:
            b.codebook = book


def load_compressed_into(run_dir: str | Path, model: nn.Module) -> dict:
    """Load a compressed run folder into ``model`` (built from its ``config.json``); return the state."""
    run_dir = Path(run_dir)
    header = read_json(run_dir / HEADER_FILE)
    _check_header(header, str(run_dir / HEADER_FILE))
    apply_structure(model, header, str(run_dir / HEADER_FILE))
    state, tensors, _, _ = read_checkpoint(run_dir)
    load_checked(model, dict(tensors), str(run_dir))
    return state


def save_compressed_state(model: nn.Module, path: str | Path, header: dict) -> None:
    """One ``.safetensors`` file (header in its metadata) for a compressed, patched transformers model."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in _tensors(model).items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"moekit_compression": json.dumps(header)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_compressed_state(model: nn.Module, path: str | Path) -> dict:
    """Load :func:`save_compressed_state`'s file into a freshly patched model of the same architecture."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read ({e})") from None
    if "moekit_compression" not in meta:
        raise CheckpointError(f"{path} has no moekit compression header; save it with save_compressed_state")
    header = json.loads(meta["moekit_compression"])
    _check_header(header, str(path))
    apply_structure(model, header, str(path))
    load_checked(model, tensors, str(path))
    return header

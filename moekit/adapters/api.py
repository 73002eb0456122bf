"""Injecting adapters into a frozen model, and saving, loading, merging and converting them.

``apply(model, method, targets=..., **config)`` validates everything first, then wraps every target module in
place (``AdaptedLinear`` / ``AdaptedFFN``) and freezes every other parameter of the model. It returns the
:class:`~moekit.adapters.handle.Adapters` handle, also kept on the model (``adapters_of(model)``), so the
module-level ``state_dict``, ``save``, ``load`` and ``merge`` take either. Applying another method to other
modules of the same model adds a group to the same handle (MixLoRA's companion LoRA, spec §15).

An adapter file is a safetensors file holding only adapter and router tensors (named ``<module>.<tensor>``), with
a header naming the format, the method(s), config(s), targets and the adapted modules' shapes, so that a file
for another model or method is refused with a message that says which. Nothing is pickled.

The pieces live in :mod:`.registry` (methods), :mod:`.targets` (module selection, wrapper building) and
:mod:`.handle` (the handle); their public names are re-exported here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..configs import from_dict, to_dict
from .core import AdaptedFFN, AdaptedLinear, AdapterError, Session, ffn_weights
from .handle import ATTR, FORMAT, AdapterGroup, Adapters, adapters_of
from .lora import LoRAConfig
from .mhr import MHRConfig, mhr_mu_from
from .registry import METHODS, available, make_config, method_spec
from .targets import build, parent, resolve_targets, shape

__all__ = [
    "FORMAT",
    "METHODS",
    "AdapterError",
    "AdapterGroup",
    "Adapters",
    "adapters_of",
    "apply",
    "available",
    "convert",
    "load",
    "merge",
    "read_header",
    "save",
    "state_dict",
]


def apply(model: nn.Module, method: str, targets: Iterable[str] | None = None, *, collect_stats: bool = False,
          **config: Any) -> Adapters:
    """Inject ``method`` adapters into ``model`` in place and freeze every other parameter.

    Args:
        model: any ``nn.Module`` (moekit's language model, a transformers model, ...). A model that already has
            adapters gets a second group on modules the first does not touch (e.g. ``mixlora`` on the FFNs, then
            ``lora`` on the attention projections); a module already adapted is refused.
        method: one of :func:`available`.
        targets: module names, name suffixes (``"w_qkv"``, ``"q_proj"``) or glob patterns (``"layers.*.ffn"``);
            ``None`` uses the method's defaults (attention projections; the feed-forwards for ``mixlora``).
        collect_stats: the adapter layers record routing statistics when the model creates the context.
        **config: the method's config fields (e.g. ``rank=8, alpha=16``).
    """
    spec = method_spec(method)
    cfg = make_config(method, dict(config))
    existing = getattr(model, ATTR, None)
    names = resolve_targets(model, method, spec.kind, targets, existing.adapted() if existing else None)
    return _apply_resolved(model, method, cfg, names, collect_stats)


def _apply_resolved(model: nn.Module, method: str, cfg: Any, names: list[str], collect_stats: bool) -> Adapters:
    existing: Adapters | None = getattr(model, ATTR, None)
    session = existing.session if existing is not None else Session(collect_stats)
    wrappers = build(model, method, cfg, names, session)  # every check passes before the model changes
    if existing is None:
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
    for name, w in wrappers.items():
        owner, child = parent(model, name)
        setattr(owner, child, w)
    handle = existing if existing is not None else Adapters(model, session, requires_grad)
    handle.groups.append(AdapterGroup(method, cfg, names, wrappers))
    setattr(model, ATTR, handle)
    return handle


def state_dict(model: nn.Module | Adapters) -> dict[str, torch.Tensor]:
    """Adapter and router tensors only."""
    return adapters_of(model).state_dict()


def save(model: nn.Module | Adapters, path: str | os.PathLike) -> Path:
    """Write the adapters of ``model`` to a safetensors file (atomically)."""
    return adapters_of(model).save(path)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed header of an adapter file: ``method`` (``a+b`` for several groups), ``config`` (the first
    group's), ``targets``, ``shapes``, ``structure`` (of every group) and ``groups`` (each group's own)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {str(path)!r} does not exist; give a file written by adapters.save or "
                           f"moekit finetune")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a moekit adapter file (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        header = {"method": meta["method"], "config": json.loads(meta["config"]),
                  "targets": json.loads(meta["targets"]), "shapes": json.loads(meta["shapes"]),
                  "structure": json.loads(meta.get("structure", "{}"))}
        groups = json.loads(meta["groups"]) if "groups" in meta else [dict(header)]
        for g in groups:
            missing = [k for k in ("method", "config", "targets", "shapes") if k not in g]
            if missing:
                raise KeyError(f"group without {missing}")
            g.setdefault("structure", {})
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path} has a damaged adapter header ({e})") from None
    return {**header, "groups": groups}


def _check_shapes(model: nn.Module, header: dict, path: Path) -> None:
    for name, want in header["shapes"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{path} adapts module {name!r}, which this model does not have; the file belongs "
                               f"to another model") from None
        module = module.base if isinstance(module, (AdaptedLinear, AdaptedFFN)) else module
        actual = shape(module) if (isinstance(module, nn.Linear) or ffn_weights(module) is not None) else None
        if actual != want:
            raise AdapterError(f"{path} was saved for {name!r} of shape {want}, but this model's {name!r} has "
                               f"shape {actual}; the file belongs to another model")


def load(model: nn.Module, path: str | os.PathLike, *, method: str | None = None, load_tensors: bool = True,
         collect_stats: bool = False) -> Adapters:
    """Load an adapter file into ``model``: applies the file's method(s), config(s) and targets when the model has
    no adapters yet, or checks that they are those already applied. ``method`` (optional) is what the caller
    expects (the file's method, or one of its groups'); a file of another method is refused."""
    path = Path(path)
    header = read_header(path)
    groups = header["groups"]
    if method is not None and method != header["method"] and method not in [g["method"] for g in groups]:
        raise AdapterError(f"{path} holds {header['method']!r} adapters, not {method!r}; pass the matching "
                           f"--method or file")
    _check_shapes(model, header, path)
    existing: Adapters | None = getattr(model, ATTR, None)
    if existing is None:
        for g in groups:
            cfg: Any = from_dict(method_spec(g["method"]).config, g["config"], prefix=g["method"])
            handle = _apply_resolved(model, g["method"], cfg, g["targets"], collect_stats)
    else:
        handle = existing
        have = [(g.method, to_dict(g.config), g.names) for g in handle.groups]
        if have != [(g["method"], g["config"], g["targets"]) for g in groups]:
            raise AdapterError(f"{path} holds {header['method']} adapters with config {header['config']} on "
                               f"{len(header['targets'])} modules, but the model has {handle.method} adapters with "
                               f"config {to_dict(handle.config)} on {len(handle.names)}; load into a fresh model")
    wrappers = handle.wrappers
    for name, structure in header["structure"].items():
        wrappers[name].adapter.restructure(structure)
    if load_tensors:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        handle.load_tensors(tensors, str(path))
    return handle


def merge(model: nn.Module | Adapters, method: str | None = None) -> nn.Module:
    """Fold single-adapter updates (LoRA, MHR-μ, MoS) into the base weights and remove their wrappers; returns
    the model. ``method`` folds only that group of a model with several (the others stay)."""
    return adapters_of(model).merge(method)


def convert(model: nn.Module | Adapters, to: str) -> Adapters:
    """From applied Poly/MHR adapters: ``mhr_z`` (skills frozen, only the routing logits train) or ``mhr_mu``
    (one LoRA per layer, the uniform average of the skills)."""
    handle = adapters_of(model)
    groups = [g for g in handle.groups if g.method in ("poly", "mhr", "mhr_z")]
    if not groups or to not in ("mhr_z", "mhr_mu"):
        raise AdapterError(f"convert goes from poly/mhr adapters to 'mhr_z' or 'mhr_mu'; got {handle.method!r} -> "
                           f"{to!r}")
    for g in groups:
        if to == "mhr_z":
            for w in g.wrappers.values():
                w.adapter.skills_A.requires_grad_(False)
                w.adapter.skills_B.requires_grad_(False)
            g.method = "mhr_z"
            g.config = MHRConfig(**{**to_dict(g.config), "train_skills": False})
            continue
        for w in g.wrappers.values():
            w.adapter = mhr_mu_from(w.adapter).to(w.adapter.skills_A.device)
        g.method = "mhr_mu"
        g.config = LoRAConfig(rank=g.config.rank, alpha=g.config.alpha)
    return handle

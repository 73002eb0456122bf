"""The handle of the adapters injected into one model: one group per applied method, their tensors and file.

A model may carry several methods on disjoint modules (MixLoRA on the feed-forwards plus a companion LoRA on the
attention projections, spec §15): each :func:`moekit.adapters.apply` adds an :class:`AdapterGroup` to the one
:class:`Adapters` kept on the model (``adapters_of(model)``). The groups share one :class:`Session` (routing
context, task id), so every adapter's losses and statistics land in the same ``RoutingContext``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..configs import to_dict
from ..types import RoutingContext
from .core import AdapterError, LinearAdapter, Session
from .registry import mergeable_methods, method_spec
from .targets import parent, shape

__all__ = ["ATTR", "FORMAT", "AdapterGroup", "Adapters", "adapters_of"]

FORMAT = "moekit-adapters/1"
ATTR = "_moekit_adapters"


@dataclass(eq=False)
class AdapterGroup:
    """The adapters of one method: its config, the adapted module names, their wrappers."""

    method: str
    config: Any
    names: list[str]
    wrappers: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """What a file records of this group: method, config, targets, shapes, structure."""
        return {"method": self.method, "config": to_dict(self.config), "targets": self.names,
                "shapes": {n: shape(w.base) for n, w in self.wrappers.items()},
                "structure": {n: w.adapter.structure() for n, w in self.wrappers.items()
                              if isinstance(w.adapter, LinearAdapter) and w.adapter.structure()}}


class Adapters:
    """The adapters injected into one model: their tensors, files, task, routing context, merge.

    ``method``, ``config``: of the only group; with several groups ``method`` joins their names with ``+`` and
    ``config`` is the first group's. ``names`` and ``wrappers`` cover every group.
    """

    def __init__(self, model: nn.Module, session: Session, requires_grad: dict[str, bool]) -> None:
        self.model, self.session, self._requires_grad = model, session, requires_grad
        self.groups: list[AdapterGroup] = []
        self._hook = model.register_forward_pre_hook(session.pre_hook, with_kwargs=True)

    @property
    def method(self) -> str:
        return "+".join(g.method for g in self.groups)

    @property
    def config(self) -> Any:
        return self.groups[0].config

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g.names]

    @property
    def wrappers(self) -> dict[str, Any]:
        return {n: w for g in self.groups for n, w in g.wrappers.items()}

    def adapted(self) -> dict[str, str]:
        """``{module name: method}`` of every adapted module."""
        return {n: g.method for g in self.groups for n in g.names}

    @property
    def context(self) -> RoutingContext | None:
        """The routing context of the last forward (add ``context.total_loss()`` to a transformers loss)."""
        return self.session.ctx

    def set_task(self, task: int) -> None:
        """The task id the task-routed methods (Poly, MHR, MHR-z) use for the next forwards."""
        self.session.task = int(task)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable adapter parameters (a tensor shared by several layers once)."""
        seen: dict[int, nn.Parameter] = {}
        for w in self.wrappers.values():
            for p in w.adapter.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only adapter and router tensors (persistent buffers included), named ``<module>.<tensor>``; a tensor
        shared by several layers (MoS pools) appears once, under the first layer's name."""
        out, seen = {}, set()
        for name, w in self.wrappers.items():
            for key, value in w.adapter.state_dict(keep_vars=True).items():
                if id(value) in seen:
                    continue
                seen.add(id(value))
                out[f"{name}.{key}"] = value.detach()
        return out

    def header(self) -> dict[str, str]:
        """The file header: the first group's fields as in a one-method file, and ``groups`` listing them all."""
        groups = [g.describe() for g in self.groups]
        shapes = {n: s for g in groups for n, s in g["shapes"].items()}
        structure = {n: s for g in groups for n, s in g["structure"].items()}
        return {"format": FORMAT, "method": self.method, "config": json.dumps(groups[0]["config"]),
                "targets": json.dumps(self.names), "shapes": json.dumps(shapes), "structure": json.dumps(structure),
                "groups": json.dumps(groups)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the adapter file atomically (a temporary file in the same folder, then a rename)."""
        path = Path(path)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=self.header())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise AdapterError(f"{source} does not fit these adapters: missing {missing[:4]}, unexpected "
                               f"{unexpected[:4]}")
        for key, value in tensors.items():
            if own[key].shape != value.shape:
                raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(value.shape)} but the model's adapter "
                                   f"has {tuple(own[key].shape)}; the file was saved for another model or config")
        with torch.no_grad():
            for name, w in self.wrappers.items():
                prefix = name + "."
                sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                w.adapter.load_state_dict(sub, strict=False)  # shared tensors: loaded under their first name

    def merge(self, method: str | None = None) -> nn.Module:
        """Fold each ``ΔW`` into its base weight and remove the wrappers (single-adapter methods only).

        ``method``: fold only that method's group (e.g. the companion LoRA beside MixLoRA), keeping the others;
        ``None`` folds every group, so every group must be mergeable."""
        chosen = [g for g in self.groups if method is None or g.method == method]
        if not chosen:
            raise AdapterError(f"the model has no {method!r} adapters to merge; it has {self.method}")
        for g in chosen:
            if not method_spec(g.method).mergeable:
                hint = (f"; merge(model, method=...) folds one mergeable group of {self.method}"
                        if len(self.groups) > 1 else "")
                raise AdapterError(f"{g.method} adapters route per input, so they cannot be folded into one weight; "
                                   f"merge works for {mergeable_methods()}{hint}")
        with torch.no_grad():
            for g in chosen:
                for w in g.wrappers.values():
                    delta_OI = w.adapter.delta_weight()
                    w.base.weight += delta_OI.to(w.base.weight.dtype)
        return self._remove(chosen)

    def remove(self) -> nn.Module:
        """Put the base modules back (unchanged unless merged) and restore their ``requires_grad``."""
        return self._remove(list(self.groups))

    def _remove(self, groups: list[AdapterGroup]) -> nn.Module:
        for g in groups:
            for name, w in g.wrappers.items():
                owner, child = parent(self.model, name)
                setattr(owner, child, w.base)
            self.groups.remove(g)
        if self.groups:  # other adapters stay: the base stays frozen
            return self.model
        for pname, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(pname, p.requires_grad))
        self._hook.remove()
        if getattr(self.model, ATTR, None) is self:
            delattr(self.model, ATTR)
        return self.model


def adapters_of(model: nn.Module | Adapters) -> Adapters:
    """The :class:`Adapters` applied to ``model``."""
    if isinstance(model, Adapters):
        return model
    found = getattr(model, ATTR, None)
    if found is None:
        raise AdapterError("the model has no adapters; call moekit.adapters.apply(model, method, ...) or "
                           "moekit.adapters.load(model, path) first")
    return found

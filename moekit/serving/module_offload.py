"""Offload the experts of a model already in memory: a transformers model patched by :func:`moekit.hf.patch`, or
any module holding plain :class:`~moekit.MoE` layers (a moekit model built or trained in this process).

The routed experts are written once to a safetensors file (atomically: a temporary file beside it, then a rename),
their in-memory banks are dropped, and each layer gets an
:class:`~moekit.serving.offload.OffloadedExpertBank` that reads single experts from the memory-mapped file through
an :class:`~moekit.serving.cache.ExpertCache`, exactly as :func:`~moekit.serving.offload.load_offloaded` does for
a run folder. Outputs equal the model's own with the ``reference`` engine, bit for bit (tests).

Dim legend: E experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..experts import ExpertBank
from ..layers import MoE
from ..training.checkpoint import write_atomic
from .background import BackgroundLoader
from .cache import ExpertCache, Policy, make_policy
from .offload import ExpertStore, Offload, OffloadedExpertBank, parse_budget

__all__ = ["offload_module"]

_PROJ = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


def offload_module(model: nn.Module, path: str | Path, expert_memory: str | int = "100%",
                   policy: str | Policy = "lru", *, prefetch: str = "none", record: bool = True,
                   asynchronous: bool = False) -> Offload:
    """Move ``model``'s routed experts into the safetensors file ``path`` and serve them from a cache, in place.

    Args:
        model: a patched transformers model or any module with plain ``MoE`` layers (ExpertBank experts).
        path: the file to write (replaced if it exists; its folder must exist).
        expert_memory / policy / prefetch / record / asynchronous: as for
            :func:`~moekit.serving.offload.load_offloaded` (``affinity`` and ``m2r2`` need that function).

    Returns:
        The :class:`Offload` (cache, statistics, trace). The model's expert parameters are gone from it.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)
              and type(m.experts) is ExpertBank]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer with a plain expert bank to offload; patch a "
                         f"transformers model first (moekit.hf.patch) or serve it resident")
    if prefetch not in ("none", "router"):
        raise ValueError(f"prefetch={prefetch!r}: offload_module supports 'none' and 'router'; use "
                         f"load_offloaded on a run folder for 'affinity' or 'm2r2'")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{path.parent} is not a folder; create it or choose another path for the experts file")
    tensors: dict[str, torch.Tensor] = {}
    for name, moe in layers:
        for p in _PROJ:
            t = getattr(moe.experts, p, None)
            if isinstance(t, torch.Tensor):
                tensors[f"{name}.experts.{p}"] = t.detach().to("cpu").contiguous().clone()
    per_expert = [sum(t[0].numel() * t.element_size() for k, t in tensors.items() if k.startswith(f"{name}.experts."))
                  for name, _ in layers]
    total = sum(b * moe.experts.num_experts for b, (_, moe) in zip(per_expert, layers, strict=True))
    budget = parse_budget(expert_memory, total, max(per_expert))  # checked before anything is written
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    tensors.clear()  # the file is now the only copy
    device = next(iter(layers[0][1].router.parameters())).device
    store = ExpertStore(path, [name for name, _ in layers])
    assert store.expert_bytes == per_expert
    if isinstance(policy, str):
        policy = make_policy(policy, num_layers=len(layers), num_experts=max(m.config.num_experts for _, m in layers))

    def load(key):
        return {n: t.to(device) for n, t in store.load(key).items()}

    background = BackgroundLoader(store.load, device) if asynchronous else None
    cache = ExpertCache(budget, policy, load, store.nbytes, background)
    offload = Offload(store, cache, [moe for _, moe in layers], prefetch, None, record)
    for i, (_, moe) in enumerate(layers):
        moe.experts = OffloadedExpertBank(moe.experts, i, offload)  # type: ignore[assignment]
        moe.config = dataclasses.replace(moe.config, engine="offload")
    return offload

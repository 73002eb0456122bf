"""Routing profiles: per-layer expert loads and layer-to-layer transition counts (MoETuner's inputs).

Dim legend: L MoE layers (in execution order), E experts per layer, T tokens, K slots per token.

MoETuner (arXiv 2502.06643) profiles a representative workload and records, per layer ``l``, the load
``n^l_e`` (assignments received by expert ``e``) and the transitions ``T^l_{e,e'}`` (tokens at expert ``e`` in
layer ``l`` and at ``e'`` in layer ``l+1``, all pairs of slots counted for top-k). :func:`record_routing`
collects both with forward hooks on the routers: the model itself is not changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..layers import MoE
from .groups import ParallelGroups

__all__ = ["RoutingProfile", "record_routing"]


@dataclass
class RoutingProfile:
    """Accumulated routing statistics of a model's MoE layers.

    Attributes:
        layer_names: the MoE layers' module names, in execution order.
        loads_LE: assignments received per expert (float64).
        transitions_LEE: ``[L-1, E, E]`` token transitions from layer ``l`` to layer ``l+1`` (float64).
    """

    layer_names: tuple[str, ...]
    loads_LE: torch.Tensor
    transitions_LEE: torch.Tensor

    @classmethod
    def empty(cls, layer_names: tuple[str, ...], num_experts: int) -> "RoutingProfile":
        L, E = len(layer_names), num_experts
        return cls(layer_names, torch.zeros(L, E, dtype=torch.float64),
                   torch.zeros(max(L - 1, 0), E, E, dtype=torch.float64))

    def add(self, layer: int, ids_TK: torch.Tensor, prev_ids_TK: torch.Tensor | None) -> None:
        """Count one forward of layer ``layer``; ``prev_ids_TK`` are the same tokens' ids in layer ``layer-1``."""
        E = self.loads_LE.shape[1]
        onehot_TE = _multi_hot(ids_TK, E)
        self.loads_LE[layer] += onehot_TE.sum(0)
        if prev_ids_TK is not None:
            self.transitions_LEE[layer - 1] += _multi_hot(prev_ids_TK, E).T @ onehot_TE

    def all_reduce(self, groups: ParallelGroups) -> "RoutingProfile":
        """Sum the profile over every rank (each profiled its own tokens); in place, returns self."""
        if groups.is_distributed:
            for t in (self.loads_LE, self.transitions_LEE):
                buf = t.to(groups.device)
                dist.all_reduce(buf)
                t.copy_(buf.cpu())
        return self


def _multi_hot(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, E]`` float64 counts of each expert among a token's slots; empty slots (-1) are dropped."""
    ids_TK = ids_TK.detach().cpu()
    out = torch.zeros(ids_TK.shape[0], num_experts + 1, dtype=torch.float64)
    out.scatter_add_(1, ids_TK + 1, torch.ones_like(ids_TK, dtype=torch.float64))
    return out[:, 1:]


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingProfile]:
    """Record the routing of every forward run inside the ``with`` block into a :class:`RoutingProfile`.

    Transitions are counted between consecutive MoE layers (in module order) that see the same tokens.
    All MoE layers must have the same number of experts.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("record_routing found no MoE layer in the model")
    num_experts = {m.config.num_experts for _, m in layers}
    if len(num_experts) != 1:
        raise ValueError(f"record_routing needs one expert count for all layers, got {sorted(num_experts)}")
    profile = RoutingProfile.empty(tuple(name for name, _ in layers), num_experts.pop())
    last_ids: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(module, args, routing) -> None:
            ids_TK = routing.expert_ids_TK
            prev = last_ids.pop(index - 1, None)
            same_tokens = prev is not None and prev.shape[0] == ids_TK.shape[0]
            profile.add(index, ids_TK, prev if same_tokens else None)
            last_ids[index] = ids_TK.detach()
        return hook

    handles = [m.router.register_forward_hook(hook_for(i)) for i, (_, m) in enumerate(layers)]
    try:
        yield profile
    finally:
        for h in handles:
            h.remove()

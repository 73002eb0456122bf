"""Turn every MoE layer of a built model into an expert-parallel one (a model transform).

Dim legend: E global experts, L local experts, F expert hidden dim, D model dim.

:func:`shard_experts` keeps, on each rank, only the experts its EP rank owns, attaches an
:class:`~moekit.dispatch.ExpertShard` to the layer's bank and switches the layer to the ``alltoall`` engine,
which runs the layer's former engine on the local experts. The layer class, its router and its shared experts
are untouched: routing is global and replicated, only the experts' location changes. Parameter names stay
those of the unsharded model, so :mod:`moekit.parallel.checkpoint` can gather and re-slice full checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..dispatch import ExpertShard
from ..dispatch.hierarchical import Hierarchy
from ..experts import ExpertBank
from ..layers import MoE
from .groups import ParallelGroups

__all__ = ["Placement", "contiguous_placement", "round_robin_placement", "shard_experts", "sharded_banks",
           "is_expert_parameter"]

# For each rank of an EP group, the global expert ids it holds, in local order.
Placement = Sequence[Sequence[int]]


def contiguous_placement(num_experts: int, ep_size: int) -> list[list[int]]:
    """Rank ``r`` holds experts ``[r*E/W, (r+1)*E/W)`` (Megatron-LM's default layout)."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}; choose an ep_size "
                         f"dividing it, or pass an explicit placement with unequal expert counts")
    n = num_experts // ep_size
    return [list(range(r * n, (r + 1) * n)) for r in range(ep_size)]


def round_robin_placement(num_experts: int, ep_size: int) -> list[list[int]]:
    """Expert ``e`` on rank ``e % W``."""
    if num_experts < ep_size:
        raise ValueError(f"num_experts={num_experts} < ep_size={ep_size}: some rank would hold no expert")
    return [list(range(r, num_experts, ep_size)) for r in range(ep_size)]


def _local_bank(full: ExpertBank, experts: Sequence[int]) -> ExpertBank:
    # Built on the meta device: no initialisation work, and no draw from the random generator, which would
    # otherwise advance by a different amount on ranks holding different numbers of experts.
    with torch.device("meta"):
        bank = ExpertBank(len(experts), full.dim, full.hidden_dim, full.activation, use_bias=full.use_bias)
    index = torch.tensor(list(experts), device=full.w_up.device)
    for name, _ in list(bank.named_parameters()):
        full_p = getattr(full, name)
        setattr(bank, name, nn.Parameter(full_p.detach().index_select(0, index), full_p.requires_grad))
    return bank


def shard_experts(
    model: nn.Module,
    groups: ParallelGroups,
    placement: Placement | Mapping[str, Placement] | None = None,
    hierarchy: Hierarchy | None = None,
) -> nn.Module:
    """Make every :class:`~moekit.layers.MoE` in ``model`` expert-parallel over ``groups.ep_group``, in place.

    Every rank must hold the same full weights first (build with one seed, load one checkpoint, or call
    :func:`moekit.parallel.broadcast_parameters` afterwards). Nothing changes when ``groups.ep_size == 1``.

    Args:
        model: a built model (or a single MoE layer).
        groups: from :func:`moekit.parallel.init_from_env`.
        placement: experts per EP rank; one for all layers, or a dict from module name (as in
            ``model.named_modules()``) to placement, e.g. from :func:`moekit.parallel.plan_placement`.
            Default: contiguous.
        hierarchy: from :func:`moekit.parallel.make_hierarchy`: exchange tokens intra-node first, then
            inter-node (DeepSpeed-MoE's hierarchical all-to-all); default: one flat all-to-all.

    Variant layers that route over one expert bank and declare ``supports_expert_parallel`` (Chain-of-Experts,
    MoE++) are sharded the same way; top-p routes through an inner :class:`~moekit.layers.MoE`.

    Returns:
        ``model``, whose MoE layers now hold ``E / ep_size`` experts each (or as ``placement`` says).
    """
    if groups.ep_size == 1:
        return model
    for name, moe in [(n, m) for n, m in model.named_modules() if _config_attr(m)]:
        if getattr(moe.experts, "expert_shard", None) is not None:
            raise ValueError(f"layer {name!r} is already sharded; build a fresh model to change the layout")
        attr = _config_attr(moe)
        assert attr is not None
        config = getattr(moe, attr)
        layer_placement = placement.get(name) if isinstance(placement, Mapping) else placement
        num_experts = moe.experts.num_experts
        if layer_placement is None:
            layer_placement = contiguous_placement(num_experts, groups.ep_size)
        if len(layer_placement) != groups.ep_size:
            raise ValueError(f"placement for {name!r} has {len(layer_placement)} ranks, expected "
                             f"ep_size={groups.ep_size}")
        shard = ExpertShard(group=groups.ep_group, rank_experts=tuple(map(tuple, layer_placement)),
                            rank=groups.ep_rank, local_engine=config.engine, hierarchy=hierarchy)
        if shard.num_experts != num_experts:
            raise ValueError(f"placement for {name!r} covers {shard.num_experts} experts, the layer has "
                             f"{num_experts}")
        bank = _local_bank(moe.experts, shard.local_experts)
        bank.expert_shard = shard  # type: ignore[assignment]  # a plain attribute, not a tensor or module
        moe.experts = bank
        setattr(moe, attr, dataclasses.replace(config, engine="alltoall"))
    return model


def _config_attr(module: nn.Module) -> str | None:
    """The attribute holding the :class:`~moekit.layers.MoEConfig` whose engine a layer runs its ``experts``
    bank with: ``config`` for :class:`~moekit.layers.MoE`, ``moe_config`` for a variant that declares
    ``supports_expert_parallel = True`` (its routing is replicated; only the bank's experts move); else None."""
    if isinstance(module, MoE):
        return "config"
    if getattr(type(module), "supports_expert_parallel", False) and isinstance(getattr(module, "experts", None),
                                                                              ExpertBank):
        return "moe_config"
    return None


def sharded_banks(model: nn.Module) -> Iterator[tuple[str, ExpertBank]]:
    """``(module name, bank)`` for every expert-parallel bank in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, ExpertBank) and getattr(module, "expert_shard", None) is not None:
            yield name, module


def is_expert_parameter(model: nn.Module) -> dict[str, bool]:
    """For each parameter name of ``model``: does it belong to a sharded expert bank?"""
    expert = {id(p) for _, bank in sharded_banks(model) for p in bank.parameters()}
    return {name: id(p) in expert for name, p in model.named_parameters()}

"""FSDP2 + expert parallelism on one 2-D device mesh (a model transform).

Mesh: ``world_size = dp * ep`` ranks laid out as ``torch.arange(world).view(dp, ep)`` with dimension names
``("dp", "ep")``, the layout of :mod:`moekit.parallel.groups`: a row is an expert-parallel group (consecutive
ranks sharing one copy of the experts), a column is a replica group (ranks holding the same experts). With 8
ranks and ``ep_size=4``::

    mesh = [[0 1 2 3]      "ep" groups: rows      "dp" groups: columns [0 4] [1 5] [2 6] [3 7]
            [4 5 6 7]]

What each parameter does (the torchtitan / Megatron-Core layout, with PyTorch's own FSDP2):

- **Non-expert parameters** (attention, norms, embeddings, routers, shared experts, dense FFNs) are sharded
  with ``torch.distributed.fsdp.fully_shard`` over the flattened mesh (every rank: the model's data-parallel
  shard dimension), one FSDP unit per block and one for the root. Each rank keeps ``1 / world`` of them and
  of their AdamW moments; FSDP all-gathers a block's parameters before its forward and backward and
  reduce-scatters (world mean) their gradients.
- **Expert parameters** are already split by expert parallelism (``E / ep`` experts per rank,
  :func:`~moekit.parallel.shard_experts`); FSDP ignores them (``ignored_params``). Their gradients hold every
  token of the EP group after the backward all-to-all and are summed over the ``"dp"`` column of the mesh
  (the replicas holding the same experts) and divided by the world size in
  :func:`~moekit.parallel.reduce_gradients`. Choice made here: experts are not further sharded over their
  replicas (torchtitan does, with a second FSDP mesh): the engine reads the bank's weights directly rather than
  calling a module forward that FSDP could hook, so an expert weight lives whole on its EP rank.
- **Mixed precision**: with ``param_dtype=torch.bfloat16`` FSDP all-gathers and computes in bfloat16 while the
  sharded master weights, the optimizer state and the gradient reduction stay float32
  (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); only where the device runs bfloat16.
  Routers, which always score in float32, are FSDP units of their own without casting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..routing import Router
from .groups import ParallelGroups
from .sharding import sharded_banks

__all__ = ["build_mesh", "apply_fsdp", "is_fsdp", "bf16_supported", "local_numel", "memory_per_rank"]


def build_mesh(groups: ParallelGroups) -> DeviceMesh:
    """The 2-D ``("dp", "ep")`` mesh over the world, built from ``groups``' own process groups (so it shares
    their timeout); every rank calls it. Size-1 dimensions get a one-rank group of their own."""
    if not groups.is_distributed:
        raise ValueError("build_mesh needs torch.distributed; launch with torchrun or moekit.parallel.run_local")
    world, ep, dp = groups.world_size, groups.ep_size, groups.dp_size
    layout = torch.arange(world).view(dp, ep)
    ep_group, dp_group = groups.ep_group, groups.expert_replica_group
    if ep_group is None or dp_group is None:  # collective: every rank creates every singleton group, in order
        singles, _ = dist.new_subgroups_by_enumeration([[r] for r in range(world)], timeout=groups.timeout)
        ep_group = singles if ep_group is None else ep_group
        dp_group = singles if dp_group is None else dp_group
    return DeviceMesh.from_group([dp_group, ep_group], groups.device.type, mesh=layout,
                                 mesh_dim_names=("dp", "ep"))


def bf16_supported(device: torch.device) -> bool:
    """Whether FSDP may compute in bfloat16 on ``device`` (CUDA with bf16 support, or CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def _expert_params(model: nn.Module) -> set[nn.Parameter]:
    return {p for _, bank in sharded_banks(model) for p in bank.parameters()}


def apply_fsdp(model: nn.Module, groups: ParallelGroups, param_dtype: torch.dtype | None = None,
               units: list[nn.Module] | None = None) -> nn.Module:
    """Shard ``model``'s non-expert parameters with FSDP2 over every rank, in place (after
    :func:`~moekit.parallel.shard_experts` and :func:`~moekit.parallel.broadcast_parameters`, before building
    the optimizer). Every rank calls it.

    Args:
        param_dtype: ``torch.bfloat16`` for mixed precision (see the module docstring); ``None``: float32.
        units: submodules that become FSDP units of their own; default: ``model.layers`` when it exists.

    Returns:
        ``model`` (now also an ``FSDPModule``): its non-expert parameters are ``DTensor`` shards.
    """
    if not groups.is_distributed:
        return model
    world = dist.group.WORLD
    assert world is not None  # groups.is_distributed
    mesh = DeviceMesh.from_group(world, groups.device.type)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    experts = _expert_params(model)
    if units is None:
        units = list(getattr(model, "layers", []))
    if param_dtype is not None:  # routers compute in float32 (moekit.routing.Router): their own float32 units
        for router in [m for m in model.modules() if isinstance(m, Router)]:
            fully_shard(router, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=experts & set(unit.parameters()) or None)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=experts or None)
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) was sharded by :func:`apply_fsdp`."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank stores for ``tensor`` (its local shard for a ``DTensor``)."""
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


def memory_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank stores for parameters and optimizer state (local shards only), by kind.

    Returns:
        ``{"params": ..., "optimizer": ..., "expert_params": ..., "total": ...}`` in bytes.
    """
    experts = _expert_params(model)
    out = {"params": 0, "expert_params": 0, "optimizer": 0}
    for p in model.parameters():
        size = local_numel(p) * p.element_size()
        out["params"] += size
        out["expert_params"] += size if p in experts else 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    out["optimizer"] += local_numel(v) * v.element_size()
    out["total"] = out["params"] + out["optimizer"]
    return out

"""Full-model checkpoints from expert-parallel models, loadable into any other layout (resharding).

Dim legend: E global experts, L local experts.

A full state dict has the keys and shapes of the unsharded model, whatever ``ep_size`` (or placement) wrote
it: expert tensors are gathered from the EP group into ``[E, ...]``, everything else is already replicated.
Loading slices ``[E, ...]`` back to the local experts of the current layout. Optimizer states whose tensors
have their parameter's shape (Adam's moments, SGD's momentum) are converted the same way, so a run can resume
under a different ``ep_size``. FSDP2 shards (``DTensor``) are all-gathered to full tensors and, on loading,
cut back to this rank's shard. Without sharded layers these reduce to ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..dispatch import ExpertShard
from .sharding import sharded_banks

__all__ = ["gather_full_state_dict", "load_full_state_dict", "gather_full_optimizer_state",
           "load_full_optimizer_state", "gather_experts"]


def gather_experts(local_L: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """Gather one expert tensor ``[L, ...]`` from every rank of the EP group into ``[E, ...]`` (collective)."""
    L = shard.max_local
    padded = local_L.new_zeros((L, *local_L.shape[1:]))  # all_gather wants equal shapes
    padded[: local_L.shape[0]] = local_L
    parts = [torch.empty_like(padded) for _ in range(shard.world_size)]
    dist.all_gather(parts, padded.contiguous(), group=shard.group)
    full = local_L.new_empty((shard.num_experts, *local_L.shape[1:]))
    for part, experts in zip(parts, shard.rank_experts):
        full[list(experts)] = part[: len(experts)]
    return full


def _expert_keys(model: nn.Module) -> dict[str, ExpertShard]:
    keys: dict[str, ExpertShard] = {}
    for prefix, bank in sharded_banks(model):
        for name, _ in bank.named_parameters(recurse=False):
            keys[f"{prefix}.{name}" if prefix else name] = cast(ExpertShard, bank.expert_shard)
    return keys


def _check_full(key: str, full: torch.Tensor, shard: ExpertShard) -> None:
    if full.shape[0] != shard.num_experts:
        raise ValueError(f"{key} has {full.shape[0]} experts in the checkpoint, the model {shard.num_experts}; "
                         f"load a checkpoint of the same architecture")


@torch.no_grad()
def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict, on every rank (collective: every rank calls it; rank 0 writes it)."""
    state = {k: _full(v) for k, v in model.state_dict().items()}
    for key, shard in _expert_keys(model).items():
        state[key] = gather_experts(state[key], shard)
    return state


def _full(t):
    """A ``DTensor`` all-gathered to the full tensor (collective); anything else unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: torch.Tensor, target) -> torch.Tensor:
    """``full`` as ``target`` holds it: this rank's shard when ``target`` is a ``DTensor`` (no communication)."""
    if isinstance(target, DTensor):
        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
    return full


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a full (unsharded) state dict into ``model``, whatever its expert layout; not collective."""
    local = dict(state)
    for key, shard in _expert_keys(model).items():
        if key in local:
            _check_full(key, local[key], shard)
            local[key] = local[key][list(shard.local_experts)]
    own = model.state_dict()
    for key, value in own.items():
        if isinstance(value, DTensor) and key in local:
            if tuple(local[key].shape) != tuple(value.shape):
                raise ValueError(f"{key} has shape {tuple(local[key].shape)} in the checkpoint, the model "
                                 f"{tuple(value.shape)}; load a checkpoint of the same architecture")
            local[key] = _like(local[key], value)
    return model.load_state_dict(local, strict=strict)


def _param_index(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, tuple[str, nn.Parameter]]:
    """Optimizer state index (as in ``optimizer.state_dict()``) -> (parameter name, parameter)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: (names.get(id(p), ""), p) for i, p in enumerate(params)}


@torch.no_grad()
def gather_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every expert parameter's state tensors gathered to ``[E, ...]``.

    Collective. Every rank of an EP group must hold state for the same parameters (true after any step).
    """
    state_dict = optimizer.state_dict()
    experts = _expert_keys(model)
    for i, (name, p) in _param_index(model, optimizer).items():
        shard = experts.get(name)
        if i not in state_dict["state"]:
            continue
        if shard is None:
            state_dict["state"][i] = {k: _full(v) for k, v in state_dict["state"][i].items()}
            continue
        state_dict["state"][i] = {
            k: gather_experts(v, shard) if torch.is_tensor(v) and v.shape == p.shape else v
            for k, v in state_dict["state"][i].items()}
    return state_dict


@torch.no_grad()
def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load a state dict from :func:`gather_full_optimizer_state` into ``optimizer`` (same parameter order)."""
    local = {**state_dict, "state": dict(state_dict["state"])}
    experts = _expert_keys(model)
    for i, (name, p) in _param_index(model, optimizer).items():
        shard = experts.get(name)
        if i not in local["state"]:
            continue
        if shard is None:
            if isinstance(p, DTensor):
                local["state"][i] = {k: _like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                                     for k, v in local["state"][i].items()}
            continue
        full_shape = (shard.num_experts, *p.shape[1:])
        index = list(shard.local_experts)
        local["state"][i] = {k: v[index] if torch.is_tensor(v) and v.shape == full_shape else v
                             for k, v in local["state"][i].items()}
    optimizer.load_state_dict(local)

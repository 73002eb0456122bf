"""Gradient reduction and parameter synchronisation for expert parallelism inside data parallelism.

Each rank's loss is the mean over its own tokens; the objective is the mean of the ranks' losses. Then:

- a replicated (non-expert) parameter's gradient is the world mean of the ranks' gradients (as DDP does);
- an expert parameter already received, through the backward all-to-all, the gradients of every token of its
  EP group; summing over its replicas gives every token of the world, so it is summed over the replica group
  and divided by the *world* size (not the replica count).

One flat all-reduce per group, after ``loss.backward()`` and before ``optimizer.step()``. Unlike DDP it does
not overlap with backward: simple and exact, and cheap next to the expert all-to-alls at these sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .groups import ParallelGroups
from .sharding import is_expert_parameter

__all__ = ["reduce_gradients", "clip_grad_norm_", "broadcast_parameters", "all_reduce_mean"]


def _sum_and_scale(tensors: list[torch.Tensor], group: dist.ProcessGroup | None, scale: float,
                   reduce: bool = True) -> None:
    """In place: ``t = scale * sum over group of t`` for every tensor, through one flat buffer."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if reduce:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def reduce_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Average gradients over data parallelism, expert gradients over their replicas only.

    A parameter without a gradient on this rank gets a zero one (every rank must add the same buffer; an
    expert that received no token has a zero gradient in the single-process model too).
    """
    if not groups.is_distributed:
        return
    expert = is_expert_parameter(model)
    replicated: list[torch.Tensor] = []
    experts: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or isinstance(p, DTensor):  # FSDP2 shards: already reduce-scattered
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (experts if expert[name] else replicated).append(p.grad)
    scale = 1.0 / groups.world_size
    _sum_and_scale(replicated, None, scale)
    # Without a replica group there is one copy of each expert: its gradient already sums the world.
    replicas = groups.expert_replica_group
    _sum_and_scale(experts, replicas, scale, reduce=replicas is not None)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ParallelGroups) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` of the whole (unsharded) model; call after :func:`reduce_gradients`.

    The norm covers every expert of the EP group, not only the local ones, so every rank computes the same
    norm and clips by the same factor (a local norm would let the replicated parameters drift apart). FSDP2
    shards (``DTensor`` gradients) add their local squares summed over the world.

    Returns:
        The total gradient norm before clipping (float32 scalar, the same on every rank).
    """
    expert = is_expert_parameter(model)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    sq = torch.zeros(3, dtype=torch.float32, device=groups.device)  # replicated, local experts, FSDP shards
    for name, g in grads.items():
        if isinstance(g, DTensor):
            sq[2] += g.to_local().float().square().sum()
        else:
            sq[int(expert[name])] += g.float().square().sum()
    if groups.ep_group is not None:  # experts are disjoint across the EP group, identical across replicas
        dist.all_reduce(sq[1:2], group=groups.ep_group)
    if any(isinstance(g, DTensor) for g in grads.values()):  # shards are disjoint across the world
        dist.all_reduce(sq[2:])
    total = sq.sum().sqrt()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        local = g.to_local() if isinstance(g, DTensor) else g
        local.mul_(factor.to(local.dtype))
    return total


@torch.no_grad()
def broadcast_parameters(model: nn.Module, groups: ParallelGroups) -> None:
    """Copy rank 0's replicated parameters and buffers to every rank, and each expert shard's from its first
    replica (global rank ``ep_rank``), so that every copy starts equal."""
    if not groups.is_distributed:
        return
    expert = is_expert_parameter(model)
    for name, p in model.named_parameters():
        if not expert[name]:
            dist.broadcast(p.data, src=0)
        elif groups.expert_replica_group is not None:
            dist.broadcast(p.data, src=groups.ep_rank, group=groups.expert_replica_group)
    for b in model.buffers():
        dist.broadcast(b, src=0)


def all_reduce_mean(value: torch.Tensor | float, groups: ParallelGroups) -> float:
    """The world mean of a scalar (for logging a loss every rank computed on its own tokens)."""
    t = torch.as_tensor(value).detach().to(groups.device, torch.float64).reshape(1).clone()
    if groups.is_distributed:
        dist.all_reduce(t)
    return t.item() / groups.world_size

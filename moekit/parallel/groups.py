"""Process groups for expert parallelism inside data parallelism.

``world_size = dp_size * ep_size``. Consecutive ranks form an expert-parallel (EP) group and share one copy of
every layer's experts between them; rank ``r`` has EP rank ``r % ep_size``. Ranks with the same EP rank hold
the same experts: they form that expert shard's replica group, across which the experts' gradients are
reduced. Everything else (attention, embeddings, routers, shared experts) is replicated on all ranks and
reduced over the whole world. With 8 ranks and ``ep_size=4``::

    EP groups:       [0 1 2 3] [4 5 6 7]
    replica groups:  [0 4] [1 5] [2 6] [3 7]

Consecutive EP groups keep the all-to-all inside a node when ``ep_size`` divides the GPUs per node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..dispatch.hierarchical import Hierarchy

__all__ = ["ParallelGroups", "init_from_env", "make_groups", "make_hierarchy", "shutdown"]


@dataclass(frozen=True)
class ParallelGroups:
    """This process's place in the world.

    Attributes:
        rank / world_size: global rank and number of processes (0 / 1 without ``torch.distributed``).
        ep_size: ranks sharing one copy of the experts; ``ep_rank`` is this rank's index among them.
        ep_group: the expert-parallel group (``None`` when ``ep_size == 1``).
        expert_replica_group: ranks holding the same experts as this one (``None`` when there is one copy).
        device: where this rank computes (``cuda:LOCAL_RANK`` under NCCL, else CPU).
    """

    rank: int = 0
    world_size: int = 1
    ep_size: int = 1
    ep_group: dist.ProcessGroup | None = None
    expert_replica_group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")
    timeout: timedelta | None = None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_size(self) -> int:
        """Copies of the experts (data-parallel degree of the expert parameters)."""
        return self.world_size // self.ep_size

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one rank that logs and writes checkpoints."""
        return self.rank == 0


def make_groups(ep_size: int = 1, timeout: timedelta | None = None) -> ParallelGroups:
    """Create the EP and replica groups on an initialised default group (every rank must call this).

    Args:
        ep_size: ranks per expert-parallel group; must divide the world size.
        timeout: collective timeout of every group created here (``None``: torch's default for new groups,
            30 minutes for gloo); :func:`init_from_env` passes its own, so that a stopped peer surfaces as an
            error on the other ranks after it, in every group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size != 1:
            raise ValueError(f"ep_size={ep_size} needs torch.distributed; launch with "
                             f"torchrun --nproc_per_node={ep_size} or set ep_size=1")
        return ParallelGroups()
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}; "
                         f"choose one of {[d for d in range(1, world + 1) if world % d == 0]}")
    dp_size = world // ep_size
    ep_group = replica_group = None
    # new_subgroups_by_enumeration is collective: every rank creates every group, in the same order.
    if ep_size > 1:
        ep_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(i * ep_size, (i + 1) * ep_size)) for i in range(dp_size)], timeout=timeout)
    if dp_size > 1:
        replica_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(j, world, ep_size)) for j in range(ep_size)], timeout=timeout)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return ParallelGroups(rank=rank, world_size=world, ep_size=ep_size, ep_group=ep_group,
                          expert_replica_group=replica_group, device=device, timeout=timeout)


def make_hierarchy(groups: ParallelGroups, node_size: int) -> Hierarchy | None:
    """The intra-node and inter-node groups of each EP group for the hierarchical all-to-all (collective:
    every rank calls it). ``node_size`` ranks of an EP group share a node (torchrun's ``--nproc_per_node``
    when ``ep_size`` spans nodes); it must divide ``ep_size``. ``None`` when there is nothing to split (one
    node, or one rank per node)."""
    ep = groups.ep_size
    if node_size < 1 or ep % node_size:
        raise ValueError(f"node_size={node_size} must divide ep_size={ep}; use the processes per node "
                         f"(torchrun --nproc_per_node), or a divisor of it that divides ep_size")
    if not groups.is_distributed or node_size in (1, ep):
        return None
    nodes = ep // node_size
    intra, inter = [], []
    for base in range(0, groups.world_size, ep):  # every EP group, in order
        intra += [[base + m * node_size + j for j in range(node_size)] for m in range(nodes)]
        inter += [[base + m * node_size + j for m in range(nodes)] for j in range(node_size)]
    intra_group, _ = dist.new_subgroups_by_enumeration(intra, timeout=groups.timeout)
    inter_group, _ = dist.new_subgroups_by_enumeration(inter, timeout=groups.timeout)
    return Hierarchy(intra=intra_group, inter=inter_group, node_size=node_size)


def init_from_env(ep_size: int = 1, backend: str | None = None,
                  timeout: timedelta = timedelta(minutes=10)) -> ParallelGroups:
    """Initialise ``torch.distributed`` from torchrun's variables and build the groups.

    Without ``RANK``/``WORLD_SIZE`` in the environment (a plain ``python`` launch) it returns a single-process
    :class:`ParallelGroups`, so a trainer can call it unconditionally.

    Args:
        ep_size: ranks per expert-parallel group (``--parallel.ep_size``).
        backend: ``nccl`` when every local rank can have a GPU of its own, else ``gloo``, unless given.
        timeout: collective timeout of the default group and of every group made here; a peer that died or
            stopped surfaces as an error after it.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return make_groups(ep_size, timeout)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        backend = backend or ("nccl" if torch.cuda.device_count() >= local_ranks else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    return make_groups(ep_size, timeout)


def shutdown() -> None:
    """Destroy the process groups at the end of a run (a no-op without ``torch.distributed``).

    Call it on every rank before exiting: a rank that exits with its groups alive can make a peer's
    gloo connection abort (SIGABRT) while that peer is still finishing.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

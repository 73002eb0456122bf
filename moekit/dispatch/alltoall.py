"""The ``alltoall`` engine: expert parallelism over ``torch.distributed`` around a local engine.

Dim legend: T tokens, D model dim, K slots per token, N valid assignments sent by this rank, R rows received
by this rank, W ranks of the expert-parallel group, L most local experts on any rank, E global experts.

Each rank of an expert-parallel group holds some of the ``E`` experts (an :class:`ExpertShard` on its
:class:`~moekit.experts.ExpertBank` says which). One call:

1. sorts this rank's valid assignments by (owner rank, local expert) and exchanges the ``[W, L]`` count
   matrix with one ``all_to_all_single`` (the only host sync: split sizes must be Python ints);
2. sends each assigned token row to the rank owning its expert (``all_to_all_single`` with uneven splits);
3. runs the local engine on the received rows, each with its local expert id and weight 1;
4. sends the outputs back along the reverse splits and combines ``y_t = sum_k weights_tk * out_tk`` at home,
   so the combine weights, and hence the router's gradient, never leave the rank.

Both exchanges are differentiable (:class:`_AllToAll`; backward is the reverse exchange), as in GShard
(arXiv 2006.16668) and Megatron-LM's all-to-all token dispatcher. A rank that sends no rows, or receives
none, still calls every collective, forward and backward, so no peer waits forever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.distributed as dist

from ..experts import ExpertBank
from ..types import Routing
from .hierarchical import Hierarchy, hierarchical_all_to_all
from .registry import register_engine, resolve_engine

__all__ = ["ExpertShard", "alltoall_engine", "all_to_all"]


@dataclass(eq=False)
class ExpertShard:
    """Where the experts of one layer live in an expert-parallel group; set as ``bank.expert_shard``.

    Attributes:
        group: the expert-parallel process group (``None`` is the default, world group).
        rank_experts: for each rank of ``group``, the global ids of the experts it holds, in its local order.
            Ranks may hold different numbers of experts (a placement plan), but at least one each.
        rank: this process's rank within ``group``.
        local_engine: the engine run on the received rows (``auto``, ``sorted``, ``reference``...).
        received_L: rows received per local expert since the last reset (measured load).
        comm_seconds: wall time in the exchanges (counts, tokens forward, gradients backward) since the last
            reset; host clock, so exact for the blocking gloo backend but only launch time for NCCL.
        hierarchy: when set, token exchanges go intra-node first, then inter-node
            (:mod:`moekit.dispatch.hierarchical`); same result as the flat exchange.
    """

    group: dist.ProcessGroup | None
    rank_experts: tuple[tuple[int, ...], ...]
    rank: int
    local_engine: str = "auto"
    hierarchy: Hierarchy | None = None
    received_L: torch.Tensor = field(init=False)
    comm_seconds: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.rank_experts = tuple(tuple(int(e) for e in experts) for experts in self.rank_experts)
        flat = sorted(e for experts in self.rank_experts for e in experts)
        if flat != list(range(len(flat))) or any(len(experts) == 0 for experts in self.rank_experts):
            raise ValueError(f"rank_experts={self.rank_experts} must hold every expert 0..E-1 exactly once, "
                             f"with at least one expert per rank")
        if self.local_engine == "alltoall":
            raise ValueError("local_engine='alltoall' would recurse; use 'auto', 'sorted' or 'reference'")
        W, L = self.world_size, self.max_local
        if not 0 <= self.rank < W:
            raise ValueError(f"rank={self.rank} is not a rank of the group: rank_experts lists {W} ranks "
                             f"(0..{W - 1}); give this process's rank within the expert-parallel group")
        slot_E = torch.empty(len(flat), dtype=torch.int64)
        for r, experts in enumerate(self.rank_experts):
            slot_E[list(experts)] = r * L + torch.arange(len(experts))
        self.slot_E = slot_E  # global expert -> owner * L + local index
        self.received_L = torch.zeros(len(self.local_experts), dtype=torch.int64)

    @property
    def world_size(self) -> int:
        return len(self.rank_experts)

    @property
    def num_experts(self) -> int:
        return len(self.slot_E)

    @property
    def max_local(self) -> int:
        return max(len(experts) for experts in self.rank_experts)

    @property
    def local_experts(self) -> tuple[int, ...]:
        return self.rank_experts[self.rank]

    def reset_stats(self) -> None:
        self.received_L.zero_()
        self.comm_seconds = 0.0


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], shard: ExpertShard) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    start = time.perf_counter()
    if shard.hierarchy is not None:
        out = hierarchical_all_to_all(x, out_splits, in_splits, shard.hierarchy)
    else:
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=shard.group)
    shard.comm_seconds += time.perf_counter() - start
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its backward is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, shard):
        ctx.splits, ctx.shard = (out_splits, in_splits), shard
        return _exchange(x, out_splits, in_splits, shard)

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        return _exchange(grad_out, in_splits, out_splits, ctx.shard), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], shard: ExpertShard) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: rows ``in_splits[r]`` go to rank ``r``, ``out_splits[r]`` arrive."""
    return _AllToAll.apply(x, out_splits, in_splits, shard)


def _shard_missing(x: torch.Tensor, bank: ExpertBank) -> str | None:
    if getattr(bank, "expert_shard", None) is None:
        return "the alltoall engine needs a bank sharded by moekit.parallel.shard_experts"
    return None


@register_engine("alltoall", priority=-100, supports=_shard_missing)
def alltoall_engine(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """Expert-parallel ``y_t = sum_k weights_tk * E_{ids_tk}(x_t)`` with ``bank`` holding the local experts."""
    shard = cast(ExpertShard, bank.expert_shard)  # set by moekit.parallel.shard_experts
    W, L = shard.world_size, shard.max_local
    K = routing.expert_ids_TK.shape[1]
    ids_N = routing.expert_ids_TK.reshape(-1)
    slot_E = shard.slot_E.to(ids_N.device)
    slot_N = torch.where(ids_N >= 0, slot_E[ids_N.clamp_min(0)], W * L)  # empty slots sort last
    order_N = torch.argsort(slot_N, stable=True)
    send_WL = torch.bincount(slot_N, minlength=W * L + 1)[: W * L]
    recv_WL = torch.empty_like(send_WL)
    start = time.perf_counter()
    dist.all_to_all_single(recv_WL, send_WL, group=shard.group)
    counts = torch.cat([send_WL, recv_WL]).tolist()  # the one host sync
    shard.comm_seconds += time.perf_counter() - start
    send_splits = [sum(counts[r * L:(r + 1) * L]) for r in range(W)]
    recv_counts = counts[W * L:]
    recv_splits = [sum(recv_counts[r * L:(r + 1) * L]) for r in range(W)]

    valid_N = order_N[: sum(send_splits)]
    token_N = valid_N // K
    x_ND = x_TD[token_N]
    if torch.is_grad_enabled() and not x_ND.requires_grad and any(p.requires_grad for p in bank.parameters()):
        # NOTE: every rank must run both backward exchanges, or its peers wait forever. Whether they run
        # must therefore not depend on this rank's data, so the sent rows always join the graph here.
        x_ND = x_ND.detach().requires_grad_()
    x_RD = all_to_all(x_ND, recv_splits, send_splits, shard)

    R = x_RD.shape[0]
    shard.received_L += torch.tensor(recv_counts).view(W, L).sum(0)[: len(shard.local_experts)]
    if R > 0:
        local_R = torch.arange(L, device=x_TD.device).repeat(W).repeat_interleave(recv_WL, output_size=R)
        y_RD = _run_local(x_RD, local_R, bank, shard)
    else:
        y_RD = x_RD * 0  # no rows to compute, but keeps x_RD in the graph so its backward exchange runs
    y_ND = all_to_all(y_RD, send_splits, recv_splits, shard)
    weights_N = routing.weights_TK.reshape(-1)[valid_N].to(y_ND.dtype)
    return torch.zeros_like(x_TD).index_add(0, token_N, y_ND * weights_N[:, None])


def _run_local(x_RD: torch.Tensor, local_R: torch.Tensor, bank: ExpertBank, shard: ExpertShard) -> torch.Tensor:
    """The local engine on the received rows: one slot each, weight 1 (weights are applied at home)."""
    R = x_RD.shape[0]
    scores_RE = x_RD.new_zeros(R, bank.num_experts)  # engines read only ids and weights
    routing = Routing(expert_ids_TK=local_R[:, None], weights_TK=x_RD.new_ones(R, 1),
                      scores_TE=scores_RE, logits_TE=scores_RE)
    # Under FSDP2 mixed precision the rows arrive in bfloat16 while the experts (not FSDP's) stay float32:
    # compute in the experts' dtype and hand back the rows' dtype.
    x_in = x_RD.to(bank.w_up.dtype)
    return resolve_engine(shard.local_engine, x_in, bank)(x_in, routing, bank).to(x_RD.dtype)

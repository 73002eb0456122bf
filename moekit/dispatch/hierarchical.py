"""Hierarchical all-to-all (DeepSpeed-MoE, arXiv 2201.05596 §5): intra-node first, then inter-node.

Dim legend: N rows of the exchange, W ranks of the expert-parallel group, G ranks per node, M nodes (W = M*G).

EP rank ``r = m*G + j`` is local rank ``j`` of node ``m``. A flat all-to-all sends every rank's rows straight
to every other rank: ``W - 1`` peers per rank, ``M*G - G`` of them across nodes. The hierarchical one does it
in two hops:

1. **intra-node**: rank ``(m, i)`` sends to its node peer ``(m, j)`` every row bound for local rank ``j`` of
   *any* node, ordered by destination node;
2. **inter-node**: rank ``(m, j)`` now holds its node's rows for ``(m', j)`` for every ``m'`` and sends each
   node's rows in one message to ``(m', j)``, ordered by source local rank.

A rank then talks to ``G - 1`` peers inside its node and ``M - 1`` across nodes (O(G + W/G) hops instead of
O(W)), with each inter-node message aggregating ``G`` ranks' rows. Rows arrive ordered by source node, then
source local rank, then their order at the source: exactly the flat exchange's order (source rank
``m*G + i``), so it is a drop-in replacement (tests/test_hierarchical.py checks equality with the flat one).
Split sizes are exchanged in the first hop (one small all-to-all of a ``[G, M]`` count matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Hierarchy", "hierarchical_all_to_all"]


@dataclass(frozen=True, eq=False)
class Hierarchy:
    """The two process groups of this rank for :func:`hierarchical_all_to_all`.

    Attributes:
        intra: the ranks of this EP group on this node (``G`` of them, EP ranks ``m*G .. m*G+G-1``).
        inter: the ranks of this EP group with the same local rank on every node (``M`` of them).
        node_size: ``G``.
    """

    intra: dist.ProcessGroup
    inter: dist.ProcessGroup
    node_size: int


def _transpose_blocks(counts_AB: torch.Tensor) -> torch.Tensor:
    """Row permutation that regroups rows laid out in blocks ``[a][b]`` (sizes ``counts_AB``, on the CPU) as
    blocks ``[b][a]``."""
    A, B = counts_AB.shape
    starts_AB = (torch.cumsum(counts_AB.reshape(-1), 0) - counts_AB.reshape(-1)).view(A, B).tolist()
    sizes_AB = counts_AB.tolist()
    pieces = [torch.arange(starts_AB[a][b], starts_AB[a][b] + sizes_AB[a][b]) for b in range(B) for a in range(A)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def hierarchical_all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int],
                            hierarchy: Hierarchy) -> torch.Tensor:
    """``all_to_all_single(out, x, out_splits, in_splits)`` over the EP group, in two hops (not differentiable
    by itself: the ``alltoall`` engine's autograd function calls it forward and, reversed, backward).

    Args:
        x_ND: rows ordered by destination EP rank, ``in_splits[r]`` for rank ``r``.
        out_splits: rows this rank receives from each EP rank.
        in_splits: rows this rank sends to each EP rank.
    """
    G = hierarchy.node_size
    W = len(in_splits)
    M = W // G
    send_MG = torch.tensor(in_splits, dtype=torch.int64).view(M, G)  # [dest node, dest local]
    # hop 1: to node peer j go the rows for (m, j), every m, ordered by m
    x_ND = x_ND[_transpose_blocks(send_MG).to(x_ND.device)]  # [m][j] blocks -> [j][m]
    send_GM = send_MG.T.contiguous()  # [dest local j, dest node m]
    recv_GM = torch.empty_like(send_GM, device=x_ND.device)  # [source local i, dest node m]
    dist.all_to_all_single(recv_GM, send_GM.to(x_ND.device), group=hierarchy.intra)
    recv_GM = recv_GM.cpu()
    hop1 = x_ND.new_empty((int(recv_GM.sum()), *x_ND.shape[1:]))
    dist.all_to_all_single(hop1, x_ND.contiguous(), recv_GM.sum(1).tolist(), send_GM.sum(1).tolist(),
                           group=hierarchy.intra)
    # hop 2: to node m go its rows, ordered by source local rank i
    hop1 = hop1[_transpose_blocks(recv_GM).to(x_ND.device)]  # [i][m] blocks -> [m][i]
    recv_from_M = torch.tensor(out_splits, dtype=torch.int64).view(M, G).sum(1).tolist()
    out = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(out, hop1.contiguous(), recv_from_M, recv_GM.sum(0).tolist(), group=hierarchy.inter)
    return out

"""DERN: Dropping Experts, Recombining Neurons (arXiv 2509.10377; spec §2). Retraining-free.

Dim legend: E experts, F expert hidden dim (segments per expert), D model dim, N segments in a pool, V segment
vector length.

1. Keep the ``E_keep`` experts of largest importance ``s_i = mean_x 1[i ∈ topk(x)] g_i(x)``; the router loses the
   rows of the dropped ones (top-k becomes ``min(k, E_keep)``).
2. Segment ``j`` of an expert is (row ``j`` of ``w_gate``, row ``j`` of ``w_up``, column ``j`` of ``w_down``); the
   expert's output is the sum of its segments' contributions.
3. Every segment of a dropped expert goes to the kept expert holding its most similar segment (cosine over
   ``[up row | down column]``: the paper's ablation prefers leaving the gate out), if that similarity exceeds α;
   otherwise it is discarded.
4. Each kept expert clusters its own plus received segments back to F with a weighted spherical k-means:
   centres start at the segments of largest ``max |gate row|`` (``max |up row|`` without a gate), never two
   identical ones; a segment's weight is the importance of the expert it came from *(our reading of the
   "router contribution" transfer)*; members are rescaled to their cluster's mean norm before the weighted
   average *(reconstructed rule)*. Clustering compares full ``[gate | up | down]`` vectors *(our choice)*.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["from_segments", "recombine", "segments", "spherical_kmeans", "transfer_segments"]


def segments(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[F, V]`` segment vectors ``[gate row | up row | down column]`` (no gate part without ``w_gate``)."""
    parts = [w["w_gate"]] if "w_gate" in w else []
    return torch.cat([*parts, w["w_up"], w["w_down"].T], dim=1)


def from_segments(seg_FV: torch.Tensor, dim: int, gated: bool) -> dict[str, torch.Tensor]:
    out = {}
    i = 0
    if gated:
        out["w_gate"], i = seg_FV[:, :dim], dim
    out["w_up"] = seg_FV[:, i:i + dim]
    out["w_down"] = seg_FV[:, i + dim:].T.contiguous()
    return out


def _similarity_part(seg_NV: torch.Tensor, dim: int, gated: bool) -> torch.Tensor:
    return seg_NV[:, dim:] if gated else seg_NV


def transfer_segments(kept: list[torch.Tensor], dropped: list[torch.Tensor], dim: int, gated: bool,
                      alpha: float) -> tuple[list[list[tuple[int, int]]], list[list[float]]]:
    """For each kept expert, the ``(dropped expert, segment)`` pairs it receives, and their cosines."""
    pool = torch.cat(kept)
    owner = torch.repeat_interleave(torch.arange(len(kept)), torch.tensor([k.shape[0] for k in kept]))
    pool_n = F.normalize(_similarity_part(pool, dim, gated), dim=1)
    received: list[list[tuple[int, int]]] = [[] for _ in kept]
    cosines: list[list[float]] = [[] for _ in kept]
    for d, seg in enumerate(dropped):
        sim_NP = F.normalize(_similarity_part(seg, dim, gated), dim=1) @ pool_n.T
        best, where = sim_NP.max(dim=1)
        for j in range(seg.shape[0]):
            if float(best[j]) > alpha:
                k = int(owner[where[j]])
                received[k].append((d, j))
                cosines[k].append(float(best[j]))
    return received, cosines


def _init_centres(seg_NV: torch.Tensor, key_N: torch.Tensor, k: int) -> list[int]:
    """The ``k`` segments of largest ``key``, skipping any identical (cosine ~1, equal norm) to one chosen."""
    order = torch.argsort(key_N, descending=True, stable=True).tolist()
    unit = F.normalize(seg_NV, dim=1)
    norms = seg_NV.norm(dim=1)
    chosen: list[int] = []
    for i in order:
        if len(chosen) == k:
            break
        if chosen:
            c = torch.tensor(chosen)
            same = (unit[c] @ unit[i] > 1 - 1e-6) & ((norms[c] - norms[i]).abs() <= 1e-6 * norms[i].clamp_min(1e-12))
            if bool(same.any()):
                continue
        chosen.append(i)
    for i in order:  # fewer distinct segments than k: fill with the rest
        if len(chosen) == k:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


def spherical_kmeans(seg_NV: torch.Tensor, weight_N: torch.Tensor, key_N: torch.Tensor, k: int,
                     iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted spherical k-means: ``(centroids_KV, assignment_N)``; centroids are norm-equalised weighted means."""
    centres = _init_centres(seg_NV, key_N, k)
    centroid_KV = seg_NV[centres].clone()
    unit = F.normalize(seg_NV, dim=1)
    norms = seg_NV.norm(dim=1)
    assign = torch.zeros(seg_NV.shape[0], dtype=torch.long)
    for _ in range(iters):
        sim = unit @ F.normalize(centroid_KV, dim=1).T
        sim[centres, torch.arange(k)] = float("inf")  # a centre's seed stays in its own cluster
        new_assign = sim.argmax(dim=1)
        for c in range(k):
            members = (new_assign == c).nonzero().flatten()
            mean_norm = norms[members].mean()
            scaled = unit[members] * mean_norm
            w = weight_N[members].clamp_min(1e-12)
            centroid_KV[c] = (w[:, None] * scaled).sum(0) / w.sum()
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centroid_KV, assign


def recombine(own: torch.Tensor, received: torch.Tensor, own_weight: float, received_weight_N: torch.Tensor,
              dim: int, gated: bool) -> torch.Tensor:
    """Cluster ``own`` (``[F, V]``) plus ``received`` segments back to F segments."""
    F_ = own.shape[0]
    if received.shape[0] == 0:
        return own
    seg = torch.cat([own, received])
    weight = torch.cat([torch.full((F_,), own_weight), received_weight_N])
    key = seg[:, :dim].abs().amax(1)  # max |gate row| (max |up row| for ungated experts)
    centroids, _ = spherical_kmeans(seg, weight, key, F_)
    return centroids

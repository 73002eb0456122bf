"""Expert placement planner in the spirit of MoETuner (arXiv 2502.06643): balance load, cut cross-rank traffic.

Dim legend: L MoE layers, E experts per layer, G ranks of an expert-parallel group (= clusters), P permutations.

From a :class:`~moekit.parallel.RoutingProfile` (loads ``n^l_e``, transitions ``T^l_{e,e'}``), two stages:

1. *Load-balanced clustering*, per layer: split the experts into ``G`` clusters of ``E/G`` experts minimising
   ``sum_c |sum_{e in c} n_e - mean|`` (the paper's stage-1 objective). Exact by enumeration while the number of
   partitions is at most ``exact_limit``; otherwise greedy (heaviest expert to the lightest open cluster) then
   improving pairwise swaps until none helps.
2. *Traffic-aware cluster -> rank mapping*: with ``M^l[g, g']`` the tokens moving from rank ``g`` in layer
   ``l`` to rank ``g'`` in layer ``l+1``, minimise ``sum_l max_{g != g'} M^l[g, g'] / BW[g, g']`` over one
   bijection per layer (same-rank pairs cost nothing). Exact by dynamic programming over layers (Viterbi over
   all ``G!`` bijections) for ``G <= 5``; for larger ``G``, layer by layer with improving swaps.

The paper solves both stages as integer programs (Gurobi); :mod:`moekit.parallel.ilp` does so with scipy's
HiGHS (``plan_placement(solver="ilp")``, the default when scipy is installed), allowing clusters of unequal
size with equal experts per rank over the whole model. The heuristic here is the fallback: its clusters have
exactly ``E/G`` experts, which satisfies the equal-memory constraint trivially. The ``alltoall`` engine accepts
unequal placements. Routing is unchanged by any placement: only where experts live.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .ilp import cluster_ilp, map_clusters_ilp, milp_available
from .profile import RoutingProfile

__all__ = ["PlacementPlan", "plan_placement", "balanced_clusters", "map_clusters", "placement_metrics",
           "uniform_plan"]


@dataclass(frozen=True)
class PlacementPlan:
    """Experts per rank for each MoE layer: ``placements[l][g]`` lists layer ``l``'s experts on rank ``g``."""

    layer_names: tuple[str, ...]
    placements: tuple[tuple[tuple[int, ...], ...], ...]

    def as_dict(self) -> dict[str, list[list[int]]]:
        """``{layer module name: placement}`` for :func:`moekit.parallel.shard_experts`."""
        return {name: [list(r) for r in p] for name, p in zip(self.layer_names, self.placements)}

    def rank_of_LE(self) -> torch.Tensor:
        """``[L, E]`` rank holding each expert."""
        num_experts = sum(len(r) for r in self.placements[0])
        out = torch.empty(len(self.placements), num_experts, dtype=torch.int64)
        for l, placement in enumerate(self.placements):
            for g, experts in enumerate(placement):
                out[l, list(experts)] = g
        return out


def uniform_plan(profile: RoutingProfile, placement: list[list[int]]) -> PlacementPlan:
    """The same placement (e.g. round-robin) for every layer, for comparison."""
    p = tuple(tuple(r) for r in placement)
    return PlacementPlan(profile.layer_names, (p,) * len(profile.layer_names))


def _imbalance(partition: list[list[int]], loads: list[float]) -> float:
    sums = [sum(loads[e] for e in cluster) for cluster in partition]
    mean = sum(sums) / len(sums)
    return sum(abs(s - mean) for s in sums)


def _partitions(items: list[int], size: int):
    """Every partition of ``items`` into blocks of ``size`` (block order canonical: by smallest item)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = [e for e in rest if e not in others]
        for tail in _partitions(remaining, size):
            yield [[first, *others], *tail]


def _num_partitions(num_experts: int, num_clusters: int) -> int:
    n = num_experts // num_clusters
    return math.factorial(num_experts) // (math.factorial(n) ** num_clusters * math.factorial(num_clusters))


def balanced_clusters(loads_E: torch.Tensor, num_clusters: int, exact_limit: int = 20000) -> list[list[int]]:
    """Stage 1: ``num_clusters`` clusters of ``E / num_clusters`` experts with near-equal summed load."""
    E = loads_E.numel()
    if E % num_clusters:
        raise ValueError(f"{E} experts do not split into {num_clusters} equal clusters; choose an ep_size "
                         f"dividing num_experts")
    loads = loads_E.double()
    if _num_partitions(E, num_clusters) <= exact_limit:
        host = loads.tolist()
        return min(_partitions(list(range(E)), E // num_clusters), key=lambda p: _imbalance(p, host))
    cluster_of = torch.empty(E, dtype=torch.int64)
    cluster_loads = torch.zeros(num_clusters, dtype=torch.float64)
    sizes = [0] * num_clusters
    for e in torch.argsort(loads, descending=True).tolist():
        c = min((c for c in range(num_clusters) if sizes[c] < E // num_clusters), key=lambda c: cluster_loads[c])
        cluster_of[e], sizes[c] = c, sizes[c] + 1
        cluster_loads[c] += loads[e]
    mean = cluster_loads.mean()
    while True:  # best improving swap of two experts in different clusters
        a, b = cluster_of[:, None], cluster_of[None, :]
        delta = loads[None, :] - loads[:, None]  # expert e (row) leaves a, f (column) leaves b
        new = (cluster_loads[a] + delta - mean).abs() + (cluster_loads[b] - delta - mean).abs()
        gain = (cluster_loads[a] - mean).abs() + (cluster_loads[b] - mean).abs() - new
        gain = torch.where(a != b, gain, torch.zeros_like(gain))
        best = int(torch.argmax(gain))
        if gain.view(-1)[best] <= 1e-9:
            break
        e, f = divmod(best, E)
        ce, cf = int(cluster_of[e]), int(cluster_of[f])
        cluster_loads[ce] += loads[f] - loads[e]
        cluster_loads[cf] += loads[e] - loads[f]
        cluster_of[e], cluster_of[f] = cf, ce
    return [torch.nonzero(cluster_of == c).view(-1).tolist() for c in range(num_clusters)]


def _transition_costs(traffic_GG: torch.Tensor, perms_PG: torch.Tensor, next_perms_QG: torch.Tensor,
                      bandwidth_GG: torch.Tensor) -> torch.Tensor:
    """``[P, Q]`` max off-diagonal rank-pair cost; a permutation row maps rank g -> the cluster it holds."""
    M = traffic_GG[perms_PG[:, None, :, None], next_perms_QG[None, :, None, :]]  # [P, Q, G, G]
    G = traffic_GG.shape[0]
    off = ~torch.eye(G, dtype=torch.bool)
    return (M / bandwidth_GG)[..., off].amax(-1)


def map_clusters(cluster_traffic: list[torch.Tensor], num_ranks: int,
                 bandwidth_GG: torch.Tensor | None = None) -> list[list[int]]:
    """Stage 2: for each layer, which cluster each rank holds (``out[l][g]``), minimising the summed per-transition
    maximum rank-pair traffic. ``cluster_traffic[l]`` is ``[G, G]`` cluster-level traffic from layer l to l+1."""
    G, L = num_ranks, len(cluster_traffic) + 1
    bw = torch.ones(G, G, dtype=torch.float64) if bandwidth_GG is None else bandwidth_GG.double()
    identity = list(range(G))
    if L == 1:
        return [identity]
    if G <= 5:  # Viterbi over all bijections, exact
        perms = torch.tensor(list(itertools.permutations(range(G))))
        best = torch.zeros(len(perms), dtype=torch.float64)
        back = []
        for traffic in cluster_traffic:
            total = best[:, None] + _transition_costs(traffic.double(), perms, perms, bw)
            best, arg = total.min(0)
            back.append(arg)
        path = [int(torch.argmin(best))]
        for arg in reversed(back):
            path.append(int(arg[path[-1]]))
        return [perms[i].tolist() for i in reversed(path)]
    out = [identity]
    for traffic in cluster_traffic:  # greedy layer by layer: improving swaps of two ranks' clusters
        prev, cur = torch.tensor([out[-1]]), identity[:]
        cost = _transition_costs(traffic.double(), prev, torch.tensor([cur]), bw).item()
        improved = True
        while improved:
            improved = False
            for i, j in itertools.combinations(range(G), 2):
                cand = cur[:]
                cand[i], cand[j] = cand[j], cand[i]
                c = _transition_costs(traffic.double(), prev, torch.tensor([cand]), bw).item()
                if c < cost - 1e-9:
                    cur, cost, improved = cand, c, True
        out.append(cur)
    return out


def _cluster_traffic(profile: RoutingProfile, clusters: list[list[list[int]]]) -> list[torch.Tensor]:
    out = []
    for ly, trans_EE in enumerate(profile.transitions_LEE):
        t = torch.zeros(len(clusters[ly]), len(clusters[ly + 1]), dtype=torch.float64)
        for c, a in enumerate(clusters[ly]):
            for c2, b in enumerate(clusters[ly + 1]):
                t[c, c2] = trans_EE[a][:, b].sum()
        out.append(t)
    return out


def _plan(profile: RoutingProfile, clusters: list[list[list[int]]], ranks: list[list[int]]) -> PlacementPlan:
    placements = tuple(tuple(tuple(sorted(clusters[ly][c])) for c in ranks[ly]) for ly in range(len(clusters)))
    return PlacementPlan(profile.layer_names, placements)


def _plan_ilp(profile: RoutingProfile, num_ranks: int, bandwidth_GG: torch.Tensor | None,
              time_limit: float, gap: float) -> PlacementPlan | None:
    """The paper's two ILPs; unequal clusters first, equal ones when the memory constraint rules them out."""
    for equal in (False, True):
        solved = [cluster_ilp(loads_E, num_ranks, equal_sizes=equal, time_limit=time_limit, gap=gap)
                  for loads_E in profile.loads_LE]
        clusters = [c for c in solved if c is not None]
        if len(clusters) != len(solved):
            continue
        sizes = [[len(c) for c in layer] for layer in clusters]
        ranks = map_clusters_ilp(_cluster_traffic(profile, clusters), sizes, num_ranks, bandwidth_GG,
                                 time_limit=time_limit, gap=gap)
        if ranks is not None:
            return _plan(profile, clusters, ranks)
    return None


def plan_placement(profile: RoutingProfile, num_ranks: int, bandwidth_GG: torch.Tensor | None = None,
                   exact_limit: int = 20000, solver: Literal["auto", "ilp", "heuristic"] = "auto",
                   time_limit: float = 10.0, gap: float = 0.0) -> PlacementPlan:
    """Both stages: a placement per MoE layer for an expert-parallel group of ``num_ranks``.

    Args:
        solver: ``ilp``: MoETuner's integer programs with scipy's HiGHS (:mod:`moekit.parallel.ilp`; clusters
            of unequal size allowed, equal experts per rank over the whole model); ``heuristic``: the
            enumeration / swap search above (equal clusters); ``auto``: the ILP when scipy is installed and it
            finds a solution within ``time_limit`` seconds per program, else the heuristic.
        time_limit / gap: HiGHS's time limit per program and relative MIP gap (the paper: Gurobi, gap 0.025).
    """
    if solver not in ("auto", "ilp", "heuristic"):
        raise ValueError(f"solver={solver!r} must be 'auto', 'ilp' or 'heuristic'")
    if solver == "ilp" and not milp_available():
        raise ValueError("solver='ilp' needs scipy (pip install 'moekit[parallel]'); or use solver='heuristic'")
    if solver != "heuristic":
        plan = _plan_ilp(profile, num_ranks, bandwidth_GG, time_limit, gap)
        if plan is not None:
            return plan
    clusters = [balanced_clusters(loads_E, num_ranks, exact_limit) for loads_E in profile.loads_LE]
    ranks = map_clusters(_cluster_traffic(profile, clusters), num_ranks, bandwidth_GG)
    return _plan(profile, clusters, ranks)


def placement_metrics(profile: RoutingProfile, plan: PlacementPlan) -> dict[str, float]:
    """Predicted figures of a plan on a profile.

    Returns:
        ``max_over_mean_load``: the busiest rank's load over the mean, averaged over layers (1.0 is perfect);
        ``max_rank_load``: the busiest rank's assignments, summed over layers;
        ``max_pair_traffic``: ``sum_l max_{g != g'} M^l[g, g']`` (stage 2's objective, unit bandwidth);
        ``cross_rank_share``: transitions that change rank, over all transitions.
    """
    rank_LE = plan.rank_of_LE()
    G = max(len(p) for p in plan.placements)
    loads_LG = torch.zeros(rank_LE.shape[0], G, dtype=torch.float64).scatter_add_(1, rank_LE, profile.loads_LE)
    out = {"max_over_mean_load": (loads_LG.amax(1) / loads_LG.mean(1).clamp_min(1e-12)).mean().item(),
           "max_rank_load": loads_LG.amax(1).sum().item()}
    pair_max, cross, total = 0.0, 0.0, 0.0
    for l, trans_EE in enumerate(profile.transitions_LEE):
        M = torch.zeros(G, G, dtype=torch.float64)
        M.index_put_((rank_LE[l][:, None].expand_as(trans_EE), rank_LE[l + 1][None, :].expand_as(trans_EE)),
                     trans_EE, accumulate=True)
        off = M * (1 - torch.eye(G, dtype=torch.float64))
        pair_max += off.max().item()
        cross, total = cross + off.sum().item(), total + M.sum().item()
    out["max_pair_traffic"] = pair_max
    out["cross_rank_share"] = cross / total if total else 0.0
    return out

"""MoETuner's two integer programs (arXiv 2502.06643), solved with scipy's ``milp`` (HiGHS).

Dim legend: L MoE layers, E experts per layer, G ranks of an expert-parallel group (= clusters per layer).

Stage 1, per layer ``l`` (load-balanced clustering): binaries ``x_{e,c}`` put each expert in exactly one of
``G`` clusters, none empty; continuous ``u_c >= |sum_e n_e x_{e,c} - n_mean|`` (two linear inequalities);
minimise ``sum_c u_c``. Cluster sizes may differ (a hot expert can sit with few others), as in the paper;
``equal_sizes=True`` adds ``sum_e x_{e,c} = E/G``.

Stage 2, all layers jointly (bandwidth-aware cluster -> rank mapping): binaries ``y^l_{c,g}`` form one
bijection per layer; ``z^l_{c,g,c',g'} >= y^l_{c,g} + y^{l+1}_{c',g'} - 1`` (``z >= 0``) linearises the
product, exact at the optimum because ``z`` only appears in upper bounds of the objective; ``t_l >=
sum_{c,c'} T^l_{c,c'} z^l_{c,g,c',g'} / BW_{g,g'}`` for every rank pair ``g != g'`` (same-rank pairs cost
nothing, our reading of the spec); minimise ``sum_l t_l``. Memory: every rank holds the same number of experts
over the whole model, ``sum_l sum_c |c^l| y^l_{c,g} = L*E/G``.

Solver settings: HiGHS through ``scipy.optimize.milp`` with a relative MIP gap (the paper used Gurobi with gap
0.025) and a time limit; when scipy is missing, the model is infeasible (e.g. ``L*E`` not divisible by ``G``)
or the solver returns no feasible point in time, :func:`plan_placement_ilp` returns ``None`` and the caller falls
back to the heuristic of :mod:`moekit.parallel.placement`.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

__all__ = ["cluster_ilp", "map_clusters_ilp", "milp_available"]


def milp_available() -> bool:
    """Whether scipy's ``milp`` (HiGHS) can be imported (``pip install moekit[parallel]``)."""
    try:
        from scipy.optimize import milp  # noqa: F401
    except ImportError:
        return False
    return True


def _solve(c, constraints, integrality, bounds, time_limit: float, gap: float):
    """``constraints``: ``(row, lo, hi)`` with ``row`` a ``{column: coefficient}`` dict (sparse)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix
    rows, cols, vals = [], [], []
    for i, (row, _, _) in enumerate(constraints):
        rows += [i] * len(row)
        cols += list(row)
        vals += list(row.values())
    A = csr_matrix((vals, (rows, cols)), shape=(len(constraints), len(c)))
    lo = np.array([lo for _, lo, _ in constraints], dtype=float)
    hi = np.array([hi for _, _, hi in constraints], dtype=float)
    res = milp(c=c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(*bounds), options={"time_limit": time_limit, "mip_rel_gap": gap, "disp": False})
    return res.x if res.x is not None else None


def cluster_ilp(loads_E: torch.Tensor, num_clusters: int, *, equal_sizes: bool = False, time_limit: float = 10.0,
                gap: float = 0.0) -> list[list[int]] | None:
    """Stage 1 for one layer: ``num_clusters`` non-empty clusters minimising ``sum_c |load_c - mean|``.

    Returns:
        The clusters (expert ids, ascending), or ``None`` when scipy is missing or no solution was found.
    """
    if not milp_available():
        return None
    n = loads_E.double().numpy()
    E, G = len(n), num_clusters
    if G > E or (equal_sizes and E % G):
        return None
    mean = n.sum() / G
    nx = E * G  # x[e, c] at e * G + c, then u[c]
    size = nx + G
    constraints: list[tuple[dict[int, float], float, float]] = []
    for e in range(E):  # each expert in one cluster
        constraints.append(({e * G + c: 1.0 for c in range(G)}, 1, 1))
    for c in range(G):
        members = {e * G + c: 1.0 for e in range(E)}
        constraints.append((members, E // G, E // G) if equal_sizes else (members, 1, np.inf))  # not empty
        above = {**{e * G + c: float(n[e]) for e in range(E)}, nx + c: -1.0}
        below = {**{e * G + c: -float(n[e]) for e in range(E)}, nx + c: -1.0}
        constraints.append((above, -np.inf, mean))  # load_c - u_c <= mean
        constraints.append((below, -np.inf, -mean))  # -load_c - u_c <= -mean
    cost = np.concatenate([np.zeros(nx), np.ones(G)])
    integrality = np.concatenate([np.ones(nx), np.zeros(G)])
    x = _solve(cost, constraints, integrality, (np.zeros(size), np.concatenate([np.ones(nx), np.full(G, np.inf)])),
               time_limit, gap)
    if x is None:
        return None
    assign = x[:nx].reshape(E, G).argmax(1)
    clusters = [sorted(int(e) for e in np.nonzero(assign == c)[0]) for c in range(G)]
    return clusters if all(clusters) else None


def map_clusters_ilp(cluster_traffic: list[torch.Tensor], cluster_sizes: list[list[int]], num_ranks: int,
                     bandwidth_GG: torch.Tensor | None = None, *, time_limit: float = 10.0,
                     gap: float = 0.0) -> list[list[int]] | None:
    """Stage 2: for each layer, the cluster each rank holds (``out[l][g]``).

    Args:
        cluster_traffic: ``[G, G]`` cluster-level traffic from layer ``l`` to ``l+1`` (``L - 1`` of them).
        cluster_sizes: the number of experts in each cluster of each layer (``[L][G]`` ints), for the
            equal-memory constraint.

    Returns:
        One bijection per layer, or ``None`` (no scipy, infeasible, or nothing found within ``time_limit``).
    """
    if not milp_available():
        return None
    G, L = num_ranks, len(cluster_sizes)
    total = sum(sum(s) for s in cluster_sizes)
    if total % G:
        return None
    bw = np.ones((G, G)) if bandwidth_GG is None else bandwidth_GG.double().numpy()
    ny = L * G * G  # y[l, c, g] at (l * G + c) * G + g

    def y(ly: int, c: int, g: int) -> int:
        return (ly * G + c) * G + g

    T = L - 1
    nz = T * G ** 4  # z[l, c, g, c', g']

    def z(ly: int, c: int, g: int, c2: int, g2: int) -> int:
        return ny + (((ly * G + c) * G + g) * G + c2) * G + g2

    size = ny + nz + T  # then t[l]
    constraints: list[tuple[dict[int, float], float, float]] = []
    for ly in range(L):
        for k in range(G):
            constraints.append(({y(ly, k, m): 1.0 for m in range(G)}, 1, 1))  # cluster k on one rank
            constraints.append(({y(ly, m, k): 1.0 for m in range(G)}, 1, 1))  # rank k holds one cluster
    for g in range(G):  # equal experts per rank over the whole model
        row = {y(ly, c, g): float(cluster_sizes[ly][c]) for ly in range(L) for c in range(G)}
        constraints.append((row, total // G, total // G))
    for ly in range(T):
        traffic = cluster_traffic[ly].double().numpy()
        for c, g, c2, g2 in itertools.product(range(G), repeat=4):
            if traffic[c, c2] > 0 and g != g2:  # z only matters where it costs
                row = {z(ly, c, g, c2, g2): 1.0, y(ly, c, g): -1.0, y(ly + 1, c2, g2): -1.0}
                constraints.append((row, -1, np.inf))  # z >= y + y' - 1
        for g, g2 in itertools.product(range(G), repeat=2):
            if g == g2:
                continue
            row = {z(ly, c, g, c2, g2): traffic[c, c2] / bw[g, g2] for c, c2 in itertools.product(range(G), repeat=2)
                   if traffic[c, c2] > 0}
            row[ny + nz + ly] = -1.0
            constraints.append((row, -np.inf, 0))  # pair cost <= t_l
    cost = np.concatenate([np.zeros(ny + nz), np.ones(T)])
    integrality = np.concatenate([np.ones(ny), np.zeros(nz + T)])
    upper = np.concatenate([np.ones(ny + nz), np.full(T, np.inf)])
    x = _solve(cost, constraints, integrality, (np.zeros(size), upper), time_limit, gap)
    if x is None:
        return None
    y_LCG = x[:ny].reshape(L, G, G).round()
    out = []
    for ly in range(L):
        cluster_of_rank = [int(np.argmax(y_LCG[ly, :, g])) for g in range(G)]
        if sorted(cluster_of_rank) != list(range(G)):
            return None
        out.append(cluster_of_rank)
    return out

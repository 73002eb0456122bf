"""MoETuner's integer programs with scipy's HiGHS (the spec's minimal faithful tests, §8), against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from moekit.parallel import RoutingProfile, placement_metrics, plan_placement
from moekit.parallel import ilp as ilp_module
from moekit.parallel import placement as placement_module
from moekit.parallel.ilp import cluster_ilp, map_clusters_ilp

pytest.importorskip("scipy.optimize")


def _imbalance(clusters, loads) -> float:
    sums = [sum(loads[e] for e in c) for c in clusters]
    return sum(abs(s - sum(sums) / len(sums)) for s in sums)


@pytest.mark.parametrize("E, G, seed", [(4, 2, 0), (5, 2, 1), (6, 3, 2)])
def test_stage1_equals_brute_force_over_all_non_empty_partitions(E, G, seed):
    loads = torch.rand(E, generator=torch.Generator().manual_seed(seed)) * 10
    loads[0] = 25.0  # a hot expert: the optimum puts it in a cluster of its own
    clusters = cluster_ilp(loads, G)
    assert sorted(e for c in clusters for e in c) == list(range(E)) and all(clusters)
    best = min(_imbalance([[e for e in range(E) if a[e] == c] for c in range(G)], loads.tolist())
               for a in itertools.product(range(G), repeat=E) if len(set(a)) == G)
    assert _imbalance(clusters, loads.tolist()) == pytest.approx(best, abs=1e-6)
    assert [0] in clusters


def _stage2_cost(traffic, ranks, bw) -> float:
    G = len(ranks[0])
    total = 0.0
    for ly, t in enumerate(traffic):
        costs = [t[ranks[ly][g], ranks[ly + 1][g2]].item() / bw[g, g2].item()
                 for g in range(G) for g2 in range(G) if g != g2]
        total += max(costs)
    return total


@pytest.mark.parametrize("sizes", [[[2, 2, 2]] * 3, [[1, 3], [3, 1], [2, 2]]])
def test_stage2_is_a_bijection_with_equal_memory_and_equals_brute_force(sizes):
    L, G = len(sizes), len(sizes[0])
    g = torch.Generator().manual_seed(7)
    traffic = [torch.randint(0, 20, (G, G), generator=g).double() for _ in range(L - 1)]
    bw = torch.rand(G, G, generator=g).double() + 0.5
    ranks = map_clusters_ilp(traffic, sizes, G, bw)
    assert all(sorted(r) == list(range(G)) for r in ranks)
    held = [sum(sizes[ly][ranks[ly][g]] for ly in range(L)) for g in range(G)]
    assert len(set(held)) == 1  # every rank holds as many experts over the whole model
    feasible = []
    for choice in itertools.product(itertools.permutations(range(G)), repeat=L):
        if len({sum(sizes[ly][choice[ly][g]] for ly in range(L)) for g in range(G)}) == 1:
            feasible.append(_stage2_cost(traffic, [list(c) for c in choice], bw))
    assert _stage2_cost(traffic, ranks, bw) == pytest.approx(min(feasible), abs=1e-9)


def _block_profile() -> RoutingProfile:
    """4 experts, 3 layers: experts {0, 1} send to {2, 3} and back, so a layer's pair can share a rank."""
    loads = torch.tensor([[5.0, 5, 5, 5]] * 3, dtype=torch.float64)
    block = torch.zeros(4, 4, dtype=torch.float64)
    block[0, 2] = block[1, 3] = block[2, 0] = block[3, 1] = 5
    return RoutingProfile(("a", "b", "c"), loads, torch.stack([block, block]))


def test_block_diagonal_traffic_reaches_zero_cross_rank_traffic():
    profile = _block_profile()
    plan = plan_placement(profile, 2, solver="ilp")
    metrics = placement_metrics(profile, plan)
    assert metrics["cross_rank_share"] == 0.0 and metrics["max_over_mean_load"] == pytest.approx(1.0)


def test_auto_falls_back_to_the_heuristic_without_scipy(monkeypatch):
    profile = _block_profile()
    heuristic = plan_placement(profile, 2, solver="heuristic")
    monkeypatch.setattr(placement_module, "milp_available", lambda: False)
    monkeypatch.setattr(ilp_module, "milp_available", lambda: False)
    assert plan_placement(profile, 2) == heuristic
    with pytest.raises(ValueError, match="needs scipy"):
        plan_placement(profile, 2, solver="ilp")
    with pytest.raises(ValueError, match="solver='magic' must be"):
        plan_placement(profile, 2, solver="magic")

"""The MoETuner-style placement planner and routing profiles (single process; the EP run of a planned
placement is in tests/test_ep.py). Brute force over every partition / bijection is the oracle."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.parallel import (RoutingProfile, balanced_clusters, map_clusters, placement_metrics, plan_placement,
                             record_routing, round_robin_placement, uniform_plan)
from moekit.parallel.placement import _partitions


def _imbalance(partition, loads) -> float:
    sums = torch.tensor([float(loads[list(c)].sum()) for c in partition])
    return (sums - sums.mean()).abs().sum().item()


def _brute_force_stage1(loads, G):
    return min(_imbalance(p, loads) for p in _partitions(list(range(len(loads))), len(loads) // G))


def _assert_partition(partition, E, G):
    assert len(partition) == G and all(len(c) == E // G for c in partition)
    assert sorted(e for c in partition for e in c) == list(range(E))


def test_partitions_enumerates_each_partition_once():
    parts = list(_partitions(list(range(6)), 2))
    assert len(parts) == 15  # 6! / (2!^3 3!)
    assert len({tuple(map(tuple, p)) for p in parts}) == 15


def test_stage1_tiny_case_equals_brute_force():
    loads = torch.tensor([10.0, 1.0, 9.0, 2.0])
    partition = balanced_clusters(loads, 2)
    _assert_partition(partition, 4, 2)
    assert _imbalance(partition, loads) == _brute_force_stage1(loads, 2) == 0.0
    assert sorted(map(sorted, partition)) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("E,G", [(8, 2), (8, 4), (12, 3)])
def test_stage1_swap_search_reaches_brute_force_optimum(E, G, seed):
    loads = torch.rand(E, generator=torch.Generator().manual_seed(seed)).pow(3) * 100
    heuristic = balanced_clusters(loads, G, exact_limit=0)  # force the greedy + swap path
    _assert_partition(heuristic, E, G)
    best = _brute_force_stage1(loads, G)
    rr = _imbalance(round_robin_placement(E, G), loads)
    assert _imbalance(heuristic, loads) <= best + 0.05 * (rr - best) + 1e-9


def _stage2_objective(traffic, ranks, bw):
    """Sum over transitions of the max off-diagonal rank-pair cost (ranks[l][g] = cluster on rank g)."""
    total = 0.0
    for l, T in enumerate(traffic):
        G = T.shape[0]
        M = torch.zeros(G, G, dtype=torch.float64)
        for g, h in itertools.product(range(G), repeat=2):
            M[g, h] = T[ranks[l][g], ranks[l + 1][h]] / bw[g, h]
        total += max(M[g, h].item() for g, h in itertools.product(range(G), repeat=2) if g != h)
    return total


def test_stage2_is_a_bijection_and_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    G, L = 3, 3
    traffic = [torch.rand(G, G, generator=g, dtype=torch.float64) * 10 for _ in range(L - 1)]
    bw = 1 + torch.rand(G, G, generator=g, dtype=torch.float64)
    ranks = map_clusters(traffic, G, bw)
    assert all(sorted(r) == list(range(G)) for r in ranks)
    best = min(_stage2_objective(traffic, combo, bw)
               for combo in itertools.product(itertools.permutations(range(G)), repeat=L))
    assert _stage2_objective(traffic, ranks, bw) == pytest.approx(best)


def test_stage2_swap_search_for_many_ranks_gives_bijections():
    G = 6
    traffic = [torch.rand(G, G, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]
    ranks = map_clusters(traffic, G)
    assert all(sorted(r) == list(range(G)) for r in ranks) and ranks[0] == list(range(G))
    assert _stage2_objective(traffic, ranks, torch.ones(G, G)) <= _stage2_objective(
        traffic, [list(range(G))] * 3, torch.ones(G, G)) + 1e-9


def _profile(loads, transitions) -> RoutingProfile:
    return RoutingProfile(tuple(f"moe{i}" for i in range(len(loads))), torch.tensor(loads, dtype=torch.float64),
                          torch.tensor(transitions, dtype=torch.float64))


def test_block_diagonal_traffic_reaches_zero_cross_rank_traffic():
    """Experts {0,1} feed {2,3} and {2,3} feed {0,1} next layer; loads allow the blocks as clusters."""
    loads = [[10, 1, 9, 2], [9, 2, 10, 1], [10, 1, 9, 2]]
    block = [[0, 0, 5, 4], [0, 0, 3, 2], [6, 2, 0, 0], [3, 1, 0, 0]]
    plan = plan_placement(_profile(loads, [block, block]), 2)
    metrics = placement_metrics(_profile(loads, [block, block]), plan)
    assert metrics["cross_rank_share"] == 0.0 and metrics["max_pair_traffic"] == 0.0
    assert metrics["max_over_mean_load"] == 1.0
    # Memory: every rank holds the same number of experts in every layer, hence over the model.
    assert all(len(experts) == 2 for placement in plan.placements for experts in placement)
    rr = placement_metrics(_profile(loads, [block, block]), uniform_plan(_profile(loads, [block, block]),
                                                                         round_robin_placement(4, 2)))
    assert rr["cross_rank_share"] > 0.4 and rr["max_over_mean_load"] > 1.5


def test_placement_metrics_by_hand():
    profile = _profile([[4, 2, 1, 1]], [])
    plan = uniform_plan(profile, [[0, 1], [2, 3]])
    m = placement_metrics(profile, plan)
    assert m["max_rank_load"] == 6 and m["max_over_mean_load"] == pytest.approx(6 / 4)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2), name="a")
        self.b = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2), name="b")

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


def test_record_routing_counts_loads_and_transitions():
    model = _TwoLayers()
    x = torch.randn(2, 5, 8)
    with record_routing(model) as profile:
        model(x)
        model(x)
    h = x.reshape(-1, 8)
    ids_a = model.a.route(h).expert_ids_TK
    ids_b = model.b.route(h + model.a(h)).expert_ids_TK
    assert profile.layer_names == ("a", "b")
    torch.testing.assert_close(profile.loads_LE[0], 2 * torch.bincount(ids_a.view(-1), minlength=4).double())
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for t in range(h.shape[0]):  # every pair of slots of the same token
        for e, f in itertools.product(ids_a[t].tolist(), ids_b[t].tolist()):
            expected[e, f] += 2
    torch.testing.assert_close(profile.transitions_LEE[0], expected)
    assert not model.a.router._forward_hooks, "hooks removed on exit"
    plan = plan_placement(profile, 2)
    assert set(plan.as_dict()) == {"a", "b"}

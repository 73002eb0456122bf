"""Hierarchical all-to-all (DeepSpeed-MoE): equal to the flat exchange, raw and inside an expert-parallel layer.

4 processes (gloo) form one EP group of 4 laid out as 2 "nodes" of 2 ranks. Uneven splits, empty splits
and whole ranks sending nothing are covered; rows must arrive in the flat exchange's order, so equality is
exact.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig
from moekit.dispatch.hierarchical import hierarchical_all_to_all
from moekit.parallel import init_from_env, make_groups, make_hierarchy, run_local, shard_experts

WORLD, NODE = 4, 2


def _splits(seed: int) -> torch.Tensor:
    """``[W, W]`` rows sent from rank a to rank b, with zeros (and rank 2 sending nothing when seed is odd)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (WORLD, WORLD), generator=g)
    if seed % 2:
        counts[2] = 0
    return counts


def _exchange_cases(groups, hierarchy) -> list[bool]:
    same = []
    for seed in range(4):
        counts = _splits(seed)
        in_splits, out_splits = counts[groups.rank].tolist(), counts[:, groups.rank].tolist()
        x = torch.randn(sum(in_splits), 3, 2, generator=torch.Generator().manual_seed(100 + groups.rank + seed))
        flat = x.new_empty((sum(out_splits), 3, 2))
        dist.all_to_all_single(flat, x, out_splits, in_splits)
        two_hop = hierarchical_all_to_all(x, out_splits, in_splits, hierarchy)
        same.append(torch.equal(flat, two_hop))
    return same


def _layer_case(groups, hierarchy) -> dict[str, bool]:
    torch.manual_seed(0)
    ref = MoE(MoEConfig(dim=6, hidden_dim=5, num_experts=8, top_k=3))
    flat, two_hop = (shard_experts(copy.deepcopy(ref), groups, hierarchy=h) for h in (None, hierarchy))
    x = torch.randn(5 + groups.rank, 6, generator=torch.Generator().manual_seed(groups.rank))
    out = {}
    ys = []
    for layer in (flat, two_hop):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        ys.append((y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    out["y"] = torch.equal(ys[0][0], ys[1][0])
    out["x.grad"] = torch.equal(ys[0][1], ys[1][1])
    out.update({n: torch.equal(g, ys[1][2][n]) for n, g in ys[0][2].items()})
    return out


def _worker() -> dict:
    init_from_env(1, timeout=timedelta(seconds=60))
    groups = make_groups(WORLD, timeout=timedelta(seconds=60))
    hierarchy = make_hierarchy(groups, NODE)
    return {"exchange": _exchange_cases(groups, hierarchy), "layer": _layer_case(groups, hierarchy),
            "groups": (dist.get_process_group_ranks(hierarchy.intra), dist.get_process_group_ranks(hierarchy.inter))}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_local(_worker, WORLD, timeout=120)


def test_hierarchical_exchange_equals_the_flat_one(ranks):
    assert all(all(r["exchange"]) for r in ranks), [r["exchange"] for r in ranks]


def test_hierarchical_layer_equals_the_flat_one_on_outputs_and_gradients(ranks):
    for r in ranks:
        assert r["layer"] and all(r["layer"].values()), r["layer"]


def test_hierarchy_groups_are_nodes_and_same_local_ranks(ranks):
    assert [r["groups"] for r in ranks] == [([0, 1], [0, 2]), ([0, 1], [1, 3]), ([2, 3], [0, 2]),
                                            ([2, 3], [1, 3])]


def test_node_size_must_divide_ep_size():
    with pytest.raises(ValueError, match="node_size=3 must divide ep_size=1"):
        make_hierarchy(make_groups(1), 3)

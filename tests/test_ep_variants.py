"""Expert parallelism for the variant layers that route over one expert bank: top-p, Chain-of-Experts and
MoE++ (plain MoE with shared and fine-grained experts is covered by tests/test_ep.py).

2 processes (gloo): each variant layer, its experts split over both ranks, run on each rank's tokens equals
the unsharded layer run on the concatenated tokens, on outputs, the input gradient and every parameter's
gradient (replicated ones summed over the ranks; expert ones compared on the local experts).
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moekit import MoEConfig, RoutingContext
from moekit.layers import build_ffn
from moekit.parallel import init_from_env, make_groups, run_local, shard_experts, sharded_banks

WORLD, D = 2, 8
VARIANTS = {
    "topp": {"threshold": 0.5},
    "coe": {"num_iterations": 2},
    # no capacity limit: a capacity counts the tokens of the batch it sees, which differ per rank
    "moepp": {"num_zero": 1, "num_copy": 1, "num_constant": 1, "capacity_factor": None},
}


def _case(kind: str, rank: int) -> dict[str, float]:
    groups = make_groups(WORLD, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    moe = MoEConfig(dim=D, hidden_dim=6, num_experts=6, top_k=2, num_shared_experts=1 if kind != "moepp" else 0)
    ref = build_ffn(kind, moe, VARIANTS[kind], name=kind)
    ep = shard_experts(copy.deepcopy(ref), groups)
    banks = list(sharded_banks(ep))
    x_all = torch.randn(2, 7 * WORLD, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x = x_all.detach()[:, rank * 7:(rank + 1) * 7].clone().requires_grad_()
    g_all = torch.randn(2, 7 * WORLD, D, generator=torch.Generator().manual_seed(2))
    y_ref, y = ref(x_all, RoutingContext()), ep(x, RoutingContext())
    (y_ref * g_all).sum().backward()
    (y * g_all[:, rank * 7:(rank + 1) * 7]).sum().backward()
    out = {"sharded banks": float(len(banks) != 1),
           "y": (y - y_ref[:, rank * 7:(rank + 1) * 7]).abs().max().item(),
           "x.grad": (x.grad - x_all.grad[:, rank * 7:(rank + 1) * 7]).abs().max().item()}
    local = list(banks[0][1].expert_shard.local_experts)
    expert_names = {f"{banks[0][0]}.{n}".removeprefix(".") for n, _ in banks[0][1].named_parameters()}
    for name, p in ep.named_parameters():
        p_ref = ref.get_parameter(name)
        if p_ref.grad is None:
            continue
        if name in expert_names:
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            out[name] = (grad - p_ref.grad[local]).abs().max().item()
        else:
            grad = p.grad.detach().clone()
            dist.all_reduce(grad)
            out[name] = (grad - p_ref.grad).abs().max().item()
    return out


def _worker() -> dict:
    rank = init_from_env(1, timeout=timedelta(seconds=60)).rank
    return {kind: _case(kind, rank) for kind in VARIANTS}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_local(_worker, WORLD, timeout=120)


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_variant_layer_under_expert_parallelism_equals_one_process(ranks, kind):
    for rank, result in enumerate(ranks):
        diffs = result[kind]
        assert len(diffs) > 4 and any(k.endswith("experts.w_up") for k in diffs), diffs
        bad = {k: v for k, v in diffs.items() if v > 1e-4}  # float32 sums in another order (all-reduce)
        assert not bad, f"rank {rank}: {bad}"

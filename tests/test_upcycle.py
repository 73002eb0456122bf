"""Dense -> MoE transforms: sparse upcycling and fine-grained splitting (MoEfication).

Identities: an upcycled layer equals its dense FFN for any router and any k (renormalised weights over equal
experts); a split layer equals it with all experts active. Structure: co-activation clustering recovers
planted groups of neurons that fire together, and beats a random split at the same k.

Run: python -m pytest tests/test_upcycle.py -q
"""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.compression.upcycle import (DenseFFN, cluster_neurons, expert_importance, fit_router, moefy,
                                        random_partition, set_top_k, sparse_upcycle, split_ffn)

TOL = dict(rtol=1e-5, atol=1e-5)


def dense(activation: str = "gelu", D: int = 12, F: int = 24, bias: bool = True, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return DenseFFN(w_up=r(F, D) / D**0.5, w_down=r(D, F) / F**0.5, activation=activation,
                    w_gate=r(F, D) / D**0.5 if activation == "swiglu" else None,
                    b_up=r(F) if bias else None, b_down=r(D) if bias else None)


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False), ("relu", True)])
@pytest.mark.parametrize("engine", ["reference", "sorted"])
def test_sparse_upcycle_equals_dense_for_any_router_and_k(activation: str, bias: bool, engine: str) -> None:
    ffn = dense(activation, bias=bias)
    x = torch.randn(3, 5, 12)
    moe = sparse_upcycle(ffn, num_experts=6, top_k=1, engine=engine, router_std=3.0)  # far from uniform
    for k in (1, 2, 6):
        set_top_k(moe, k)
        torch.testing.assert_close(moe(x), ffn(x.view(-1, 12)).view_as(x), **TOL)
    n_dense = sum(t.numel() for t in (ffn.w_up, ffn.w_down, ffn.w_gate, ffn.b_up, ffn.b_down) if t is not None)
    n_moe = sum(p.numel() for p in moe.parameters())
    assert n_moe == 6 * n_dense + 6 * 12  # E copies (biases included) + a router [E, D]
    noisy = sparse_upcycle(ffn, num_experts=6, top_k=2, noise_std=0.05, engine=engine)
    assert not torch.allclose(noisy(x), moe(x), atol=1e-4)


def test_upcycled_experts_diverge_after_one_step() -> None:
    moe = sparse_upcycle(dense("swiglu", bias=False), num_experts=4, top_k=2, router_std=1.0)
    moe(torch.randn(32, 12)).square().sum().backward()
    g = moe.experts.w_up.grad
    assert not torch.allclose(g[0], g[1]) and moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("engine", ["reference", "sorted"])
def test_split_with_every_expert_equals_dense(engine: str) -> None:
    ffn = dense("gelu", F=24)
    x = torch.randn(40, 12)
    for groups in (random_partition(24, 4, seed=1), cluster_neurons(ffn.hidden(x) > 0, 4)):
        split = split_ffn(ffn, groups, top_k=4, engine=engine)
        torch.testing.assert_close(split(x), ffn(x), **TOL)
        set_top_k(split, 2)
        assert not torch.allclose(split(x), ffn(x), atol=1e-3)
    with pytest.raises(ValueError, match="partition"):
        split_ffn(ffn, torch.zeros(4, 6, dtype=torch.long), top_k=2)


def test_cluster_neurons_recovers_planted_groups() -> None:
    g = torch.Generator().manual_seed(0)
    planted = torch.randperm(32, generator=g).view(4, 8)
    group_on = torch.rand(500, 4, generator=g) < 0.3  # each group fires together on 30% of the tokens
    active = torch.zeros(500, 32, dtype=torch.bool)
    for e in range(4):
        flips = torch.rand(500, 8, generator=g) < 0.05
        active[:, planted[e]] = group_on[:, e : e + 1] ^ flips
    groups = cluster_neurons(active, 4)
    assert groups.shape == (4, 8)
    assert {tuple(r.tolist()) for r in groups} == {tuple(r.sort().values.tolist()) for r in planted}


def test_fit_router_recovers_a_linear_map() -> None:
    x = torch.randn(200, 6)
    w, b = torch.randn(3, 6), torch.randn(3)
    got_w, got_b = fit_router(x, x @ w.T + b, ridge=0.0)
    torch.testing.assert_close(got_w, w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_b, b, rtol=1e-4, atol=1e-4)


def test_coactivation_split_beats_random_split() -> None:
    """Neurons built in 8 correlated families: clustering keeps a family in one expert, so top-k drops whole
    families that are off for a token, while a random split spreads every family over all experts."""
    g = torch.Generator().manual_seed(0)
    D, F, E = 16, 64, 8
    family = torch.randn(E, D, generator=g)
    w_up = (family.repeat_interleave(F // E, 0) + 0.1 * torch.randn(F, D, generator=g))[torch.randperm(F, generator=g)]
    ffn = DenseFFN(w_up=w_up, w_down=torch.randn(D, F, generator=g) / F**0.5, activation="relu",
                   b_up=torch.full((F,), -1.5), b_down=torch.zeros(D))
    calib, test = torch.randn(2000, D, generator=g), torch.randn(500, D, generator=g)
    errors = {}
    for method in ("coactivation", "random"):
        split = moefy(ffn, calib, E, top_k=3, method=method)
        errors[method] = ((split(test) - ffn(test)).norm() / ffn(test).norm()).item()
    assert errors["coactivation"] < 0.5 * errors["random"], errors
    importance = expert_importance(ffn, random_partition(F, E), test)
    assert importance.shape == (500, E) and (importance >= 0).all()


def test_split_layer_is_traced_by_the_analysis() -> None:
    from moekit.analysis import trace_routing

    split = split_ffn(dense(), random_partition(24, 6), top_k=2)
    with trace_routing(split) as trace:
        split(torch.randn(7, 12))
    assert trace.ids["moe"][0].shape == (7, 2)
    assert isinstance(split.moe, moekit.MoE)

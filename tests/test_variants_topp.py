"""Dynamic top-p routing: the spec's minimal faithful test (architectures.md §6) plus losses and stats."""

import torch

from moekit import RoutingContext
from moekit.dispatch import reference_engine
from moekit.layers import build_ffn
from moekit.layers.variants.topp import TopPConfig, TopPMoE
from moekit.routing.losses import load_balancing_loss
from moekit.routing.topp import router_entropy, select_topp

from .variants_util import params_with_grad, tiny_moe


def _kept(ids_TK):
    return [sorted(i for i in row.tolist() if i >= 0) for row in ids_TK]


def test_spec_example_thresholds_and_raw_weights():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    assert _kept(select_topp(p, 0.4)[0]) == [[0]]
    ids, w = select_topp(p, 0.6)
    assert _kept(ids) == [[0, 1]]
    torch.testing.assert_close(w.sum(), torch.tensor(0.8))  # raw probabilities, not renormalised
    assert _kept(select_topp(torch.tensor([[0.7, 0.3, 0.0]]), 1.0)[0]) == [[0, 1, 2]]  # even zero-prob ones
    assert _kept(select_topp(torch.tensor([[0.2, 0.5, 0.3]]), 0.4)[0]) == [[1]]


def test_layer_matches_reference_loop_and_counts_experts():
    torch.manual_seed(0)
    layer = TopPMoE(tiny_moe(), TopPConfig(threshold=0.5), name="l0")
    x = torch.randn(2, 5, 8)
    ctx = RoutingContext(collect_stats=True)
    y = layer(x, ctx)
    routing = layer.route(x.reshape(-1, 8))
    torch.testing.assert_close(y.reshape(-1, 8), reference_engine(x.reshape(-1, 8), routing, layer.moe.experts),
                               rtol=1e-5, atol=1e-6)
    expected = (routing.expert_ids_TK >= 0).sum().item() / 10
    assert abs(ctx.stats_summary()["l0"]["experts_per_token"] - expected) < 1e-6
    assert 1 <= expected <= 4


def test_padding_slots_are_not_reported_as_drops():
    # Top-p has no capacity limit: the -1 slots of tokens that chose fewer experts than the widest token are
    # padding, so the drop rate is 0 while the routing does hold empty slots.
    torch.manual_seed(0)
    layer = TopPMoE(tiny_moe(), TopPConfig(threshold=0.5), name="l0")
    x = torch.randn(2, 5, 8)
    ctx = RoutingContext(collect_stats=True)
    layer(x, ctx)
    assert (layer.route(x.reshape(-1, 8)).expert_ids_TK < 0).any(), "the test needs padded slots"
    assert ctx.stats_summary()["l0"]["drop_rate"] == 0.0


def test_threshold_one_uses_every_expert():
    layer = TopPMoE(tiny_moe(), TopPConfig(threshold=1.0))
    assert torch.all(layer.route(torch.randn(7, 8)).expert_ids_TK >= 0)


def test_loss_coefficients_and_gradients_reach_router_only():
    torch.manual_seed(1)
    layer = TopPMoE(tiny_moe(router=dict(aux_loss_coef=0.2)), TopPConfig(entropy_coef=0.7), name="l0")
    x = torch.randn(10, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    r = layer.route(x)
    torch.testing.assert_close(ctx.losses["topp_entropy_loss"], 0.7 * router_entropy(r.scores_TE))
    torch.testing.assert_close(ctx.losses["aux_loss"], 0.2 * load_balancing_loss(r.scores_TE, r.expert_ids_TK))
    for name in ("topp_entropy_loss", "aux_loss"):
        ctx = RoutingContext()
        layer(x, ctx)
        assert params_with_grad(layer, ctx.losses[name]) == {"moe.router.weight"}


def test_entropy_loss_lowers_experts_per_token_when_minimised():
    torch.manual_seed(2)
    layer = build_ffn("topp", tiny_moe(router=dict(aux_loss_coef=0.0)), {"threshold": 0.6, "entropy_coef": 1.0})
    x = torch.randn(32, 8)
    before = (layer.route(x).expert_ids_TK >= 0).sum()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    for _ in range(30):
        ctx = RoutingContext()
        layer(x, ctx)
        opt.zero_grad()
        ctx.losses["topp_entropy_loss"].backward()
        opt.step()
    assert (layer.route(x).expert_ids_TK >= 0).sum() < before

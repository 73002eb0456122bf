"""MoFME: the spec's minimal faithful tests (compression-adaptation-serving.md §33), the mixed-modulation path
against the per-expert loop, the MC-dropout router, loss coefficients and gradient targets."""

import pytest
import torch
import torch.nn.functional as F

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.layers import build_ffn
from moekit.layers.variants.mofme import MoFME, MoFMEConfig
from moekit.routing.losses import load_balancing_loss, z_loss

from .variants_util import params_with_grad, tiny_moe


def _layer(router=None, **kw):
    torch.manual_seed(0)
    return MoFME(tiny_moe(router=router or {}), MoFMEConfig(**kw), name="l0")


def _randomise_film(layer):
    with torch.no_grad():
        layer.gamma.normal_(1.0, 0.5)
        layer.beta.normal_(0.0, 0.5)


def test_identity_modulation_is_the_shared_ffn():
    layer = _layer()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), layer.ffn(x), rtol=1e-5, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.ffn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_mixing_modulations_equals_mixing_expert_outputs_with_gradients(activation):
    torch.manual_seed(1)
    layer = MoFME(tiny_moe(activation=activation, router=dict(norm_topk_prob=False)), MoFMEConfig())
    _randomise_film(layer)
    x = torch.randn(7, 8, requires_grad=True)
    routing, _ = layer.route(x)
    ids = routing.expert_ids_TK.clone()
    ids[3, 1] = -1  # an empty slot is skipped
    w = routing.weights_TK.masked_fill(ids < 0, 0.0)
    routing = type(routing)(expert_ids_TK=ids, weights_TK=w, scores_TE=routing.scores_TE,
                            logits_TE=routing.logits_TE)
    y = layer.combine(x, routing)
    y_loop = torch.zeros_like(y)
    for t in range(7):
        for k in range(2):
            if ids[t, k] >= 0:
                y_loop[t] += w[t, k] * layer.expert(x[t:t + 1], int(ids[t, k]))[0]
    torch.testing.assert_close(y, y_loop, rtol=1e-5, atol=1e-6)
    inputs = [x, layer.gamma, layer.beta, layer.ffn.w_up, layer.ffn.w_down, layer.router.weight]
    grads = torch.autograd.grad(y.square().sum(), inputs, retain_graph=True)  # the routing graph is shared
    for g, g_ref in zip(grads, torch.autograd.grad(y_loop.square().sum(), inputs)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_parameter_count_is_one_ffn_plus_two_vectors_per_expert_plus_router():
    layer = _layer()
    ffn = sum(p.numel() for p in layer.ffn.parameters())
    assert ffn == 3 * 8 * 12
    assert sum(p.numel() for p in layer.parameters()) == ffn + 4 * 2 * 12 + 4 * 8


def test_router_averages_mc_dropout_passes_in_training_and_is_deterministic_in_eval():
    layer = _layer(mc_samples=3, router_dropout=0.5)
    x = torch.randn(6, 8)
    torch.manual_seed(7)
    routing, mi = layer.route(x)
    torch.manual_seed(7)
    probs = [F.linear(F.dropout(x, 0.5, training=True), layer.router.weight).softmax(-1) for _ in range(3)]
    p_bar = torch.stack(probs).mean(0)
    torch.testing.assert_close(routing.scores_TE, p_bar)
    ids, w = routing.expert_ids_TK, routing.weights_TK
    torch.testing.assert_close(w, p_bar.gather(1, ids) / p_bar.gather(1, ids).sum(-1, keepdim=True))
    h = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(mi, (h(p_bar) - torch.stack([h(p) for p in probs]).mean(0)).mean())
    assert mi > 0
    layer.eval()
    r1, mi1 = layer.route(x)
    r2, _ = layer.route(x)
    assert torch.equal(r1.scores_TE, r2.scores_TE) and mi1 == 0
    torch.testing.assert_close(r1.scores_TE, F.linear(x, layer.router.weight).softmax(-1))
    sampling = _layer(mc_samples=3, router_dropout=0.5, mc_in_eval=True).eval()
    assert not torch.equal(sampling.route(x)[0].scores_TE, sampling.route(x)[0].scores_TE)


def test_no_dropout_is_a_plain_softmax_router():
    layer = _layer(router_dropout=0.0)
    x = torch.randn(5, 8)
    routing, mi = layer.route(x)
    torch.testing.assert_close(routing.scores_TE, F.linear(x, layer.router.weight).softmax(-1))
    assert mi == 0


def test_loss_coefficients_and_gradient_targets():
    layer = _layer(router=dict(aux_loss_coef=0.4, aux_loss_level="sequence", z_loss_coef=0.03), mc_samples=2)
    _randomise_film(layer)
    x = torch.randn(2, 5, 8)
    torch.manual_seed(11)
    ctx = RoutingContext()
    layer(x, ctx)
    torch.manual_seed(11)
    logits = torch.stack([F.linear(F.dropout(x.reshape(-1, 8), 0.1, training=True), layer.router.weight)
                          for _ in range(2)])
    p_bar = logits.softmax(-1).mean(0)
    expected = 0.4 * load_balancing_loss(p_bar, p_bar.topk(2, -1).indices, num_sequences=2)
    torch.testing.assert_close(ctx.losses["aux_loss"], expected)
    torch.testing.assert_close(ctx.losses["z_loss"], 0.03 * z_loss(logits.flatten(0, 1)))
    for name in ("aux_loss", "z_loss"):
        ctx = RoutingContext()
        layer(x, ctx)
        assert params_with_grad(layer, ctx.losses[name]) == {"router.weight"}
    # the output trains the FFN, the modulations and the router (through the gate values)
    names = params_with_grad(layer, layer(x).square().sum())
    assert names == {"router.weight", "ffn.w_gate", "ffn.w_up", "ffn.w_down", "gamma", "beta"}


def test_stats_and_builder_options():
    layer = build_ffn("mofme", tiny_moe(), {"mc_samples": 2, "router_dropout": 0.2}, name="layers.0.ffn")
    assert isinstance(layer, MoFME) and layer.config.mc_samples == 2
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(2, 5, 8), ctx)
    s = ctx.stats_summary()["layers.0.ffn"]
    assert s["router_mutual_info"] >= 0 and s["tokens"] == 20
    with pytest.raises(ConfigError, match="variant.mc_samples"):
        build_ffn("mofme", tiny_moe(), {"mc_sample": 2})
    with pytest.raises(ConfigError, match="router_dropout"):
        build_ffn("mofme", tiny_moe(), {"router_dropout": 1.0})
    with pytest.raises(ConfigError, match="capacity_factor"):
        build_ffn("mofme", tiny_moe(router=dict(capacity_factor=1.0)), {})

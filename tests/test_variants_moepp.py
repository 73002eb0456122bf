"""MoE++: the spec's minimal faithful tests (architectures.md §2) plus loss coefficient/gradient checks."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from moekit import MoE, Routing, RoutingContext
from moekit.layers import build_ffn
from moekit.layers.variants.moepp import STATE_KEY, MoEPlusPlus, MoEPPConfig
from moekit.routing.heterogeneous import heterogeneous_balance_loss, heterogeneous_capacities

from .variants_util import params_with_grad, tiny_moe

DROPLESS = dict(capacity_factor=None)


def _layer(**kw):
    torch.manual_seed(0)
    return MoEPlusPlus(tiny_moe(), MoEPPConfig(**{**DROPLESS, **kw}), name="l0")


def _forced(layer, ids, weights):
    ids = torch.tensor(ids)
    w = torch.tensor(weights, dtype=torch.float32)
    z = torch.zeros(ids.shape[0], layer.pool)
    return Routing(expert_ids_TK=ids, weights_TK=w, scores_TE=z, logits_TE=z)


def test_pool_layout_zero_last():
    layer = _layer()
    assert layer.pool == 8 and list(layer.constant_ids) == [4, 5] and list(layer.copy_ids) == [6]
    assert list(layer.zero_ids) == [7]


def test_zero_expert_returns_zeros_without_any_flop():
    layer = _layer()
    x = torch.randn(5, 8)
    routing = _forced(layer, [[7, -1]] * 5, [[0.9, 0.0]] * 5)
    with FlopCounterMode(display=False) as counter:
        y = layer.combine(x, routing)
    assert torch.equal(y, torch.zeros_like(y))
    # only the constant experts' tiny projections are counted (T x D -> T x 2 per constant expert, and the
    # [T, C] @ [C, D] mix of their vectors); no expert-bank matmul, whose cost per token would be 2*3*D*F
    C = layer.config.num_constant
    assert counter.get_total_flops() == 2 * 5 * 8 * 2 * C + 2 * 5 * C * 8


def test_copy_expert_is_bitwise_identity_and_constant_expert_with_zero_gate():
    layer = _layer()
    x = torch.randn(5, 8)
    assert torch.equal(layer.combine(x, _forced(layer, [[6, -1]] * 5, [[1.0, 0.0]] * 5)), x)
    with torch.no_grad():
        layer.const_gate.zero_()
    y = layer.combine(x, _forced(layer, [[4, -1]] * 5, [[1.0, 0.0]] * 5))
    torch.testing.assert_close(y, 0.5 * x + 0.5 * layer.const_vector[0])
    torch.testing.assert_close(layer.constant_expert(x, 0), 0.5 * x + 0.5 * layer.const_vector[0])


def test_ffn_slots_match_a_plain_moe_and_reference_engine():
    layer = _layer()
    moe = MoE(tiny_moe(engine="reference"))
    moe.experts.load_state_dict(layer.experts.state_dict())
    x = torch.randn(6, 8)
    ids = torch.randint(0, 4, (6, 2))
    ids[:, 1] = (ids[:, 0] + 1) % 4
    w = torch.rand(6, 2)
    r = Routing(expert_ids_TK=ids, weights_TK=w, scores_TE=torch.zeros(6, 4), logits_TE=torch.zeros(6, 4))
    torch.testing.assert_close(layer.combine(x, r), moe.combine(x, r), rtol=1e-5, atol=1e-6)


def test_gating_residual_chains_logits_and_zero_wg_is_a_plain_router():
    a, b = _layer(), _layer()
    x = torch.randn(6, 8)
    ctx = RoutingContext()
    a(x, ctx)
    first = ctx.state[STATE_KEY]
    torch.testing.assert_close(first, x @ a.gate.weight.t())  # first layer: no residual term
    with torch.no_grad():
        b.gate_residual.weight.zero_()
    b(x, ctx)
    torch.testing.assert_close(ctx.state[STATE_KEY], x @ b.gate.weight.t())
    with torch.no_grad():
        b.gate_residual.weight.normal_()
    b(x, ctx)
    torch.testing.assert_close(ctx.state[STATE_KEY], x @ b.gate.weight.t() + first @ b.gate_residual.weight.t())


def test_balance_loss_tau_one_is_plain_sum_f_p_and_coefficient_and_gradients():
    probs = torch.rand(10, 6).softmax(-1)
    ids = probs.topk(2, -1).indices
    f = torch.bincount(ids.reshape(-1), minlength=6).float() / 10
    torch.testing.assert_close(heterogeneous_balance_loss(probs, ids, 4, 1.0), (f * probs.mean(0)).sum())
    eta = torch.tensor([1, 1, 1, 1, 0.5, 0.5])
    torch.testing.assert_close(heterogeneous_balance_loss(probs, ids, 4, 0.5), (eta * f * probs.mean(0)).sum())
    layer = _layer(balance_coef=0.3)
    x = torch.randn(2, 5, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    p = layer.route(x.reshape(-1, 8)).scores_TE
    expected = 0.3 * heterogeneous_balance_loss(p, p.topk(2, -1).indices, 4, 0.75)
    torch.testing.assert_close(ctx.losses["moepp_balance_loss"], expected)
    # first layer: the loss reaches only the gate (W_g gets no input on the first layer)
    assert params_with_grad(layer, ctx.losses["moepp_balance_loss"]) == {"gate.weight"}
    ctx = RoutingContext()
    layer(x, ctx)
    layer(x, ctx)  # a second layer (same weights) sees the residual
    assert params_with_grad(layer, ctx.layer_losses["l0"]["moepp_balance_loss"]) == {"gate.weight",
                                                                                     "gate_residual.weight"}


def test_capacities_follow_eq8_and_overflow_is_dropped():
    assert heterogeneous_capacities(80, 4, 4, 1.0, 1.0) == (10, 10)  # tau = 1: gamma * A / (N + M) each
    ffn, zc = heterogeneous_capacities(80, 4, 4, 0.5, 1.1)
    assert (ffn, zc) == (8, 15)  # ceil(1.1*.5*80/6), ceil(1.1*80/6)
    layer = _layer(capacity_factor=0.5)
    with torch.no_grad():  # everybody wants expert 0 and the zero expert
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 1.0
        layer.gate.weight[7] = 0.5
    x = torch.rand(16, 8) + 0.1
    routing = layer.route(x)
    ffn_cap, zc_cap = heterogeneous_capacities(32, 4, 4, 0.75, 0.5)
    assert (routing.expert_ids_TK == 0).sum() == ffn_cap and (routing.expert_ids_TK == 7).sum() == zc_cap
    assert torch.all(routing.weights_TK[routing.expert_ids_TK < 0] == 0)


def test_code_gate_form_gives_ffn_full_weight_next_to_zero_expert():
    layer = _layer(gate_form="code")
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[1] = 1.0
        layer.gate.weight[7] = 0.9
    x = torch.rand(4, 8) + 0.1
    r = layer.route(x)
    assert torch.all(r.expert_ids_TK[:, 0] == 1) and torch.all(r.expert_ids_TK[:, 1] == 7)
    torch.testing.assert_close(r.weights_TK[:, 0], torch.ones(4))


def test_stats_and_builder_and_mlp_gate():
    layer = build_ffn("moepp", tiny_moe(), {"gate": "mlp", "capacity_factor": None}, name="l3")
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(2, 5, 8), ctx)
    s = ctx.stats_summary()["l3"]
    assert 0 <= s["zc_share"] <= 1 and 0 <= s["ffn_per_token"] <= 2 and "zero_share" in s
    assert isinstance(layer.gate, torch.nn.Sequential) and layer.gate[0].out_features == 8 * layer.pool

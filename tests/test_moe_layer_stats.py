"""The MoE layer's statistics and shared-expert gate against hand computations (from the mutation run over
``moekit/layers/moe.py``, docs/testing.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig, RouterConfig, Routing, RoutingContext
from moekit.configs import ConfigError
from moekit.layers.moe import routing_stats


def test_routing_stats_by_hand():
    scores = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.2, 0.2, 0.2, 0.2]])  # row 2 does not sum to 1
    ids = torch.tensor([[0, -1], [3, 0]])
    routing = Routing(expert_ids_TK=ids, weights_TK=torch.ones(2, 2), scores_TE=scores, logits_TE=scores.log())
    bias = torch.tensor([0.1, 0.0, -0.1, 0.0])
    s = routing_stats(routing, bias)
    assert s.counts_E.tolist() == [2, 0, 0, 1] and s.num_slots == 4 and int(s.num_dropped) == 1
    h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    h2 = math.log(4)  # the second row is normalised first: uniform over 4
    assert float(s.token_entropy) == pytest.approx((h1 + h2) / 2 / math.log(4), rel=1e-5)
    assert torch.equal(s.bias_E, bias) and s.bias_E is not bias
    assert routing_stats(routing).bias_E is None
    one = Routing(expert_ids_TK=torch.zeros(3, 1, dtype=torch.long), weights_TK=torch.ones(3, 1),
                  scores_TE=torch.ones(3, 1), logits_TE=torch.zeros(3, 1))
    assert float(routing_stats(one).token_entropy) == 0.0  # one expert: no normalisation by log(1) = 0


def test_layer_records_stats_and_bias_only_when_the_router_uses_it():
    x = torch.randn(2, 5, 8)
    for rate, has_bias in ((0.0, False), (0.1, True)):
        moe = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2,
                            router=RouterConfig(bias_update_rate=rate)), name="blk")
        ctx = RoutingContext(collect_stats=True)
        moe(x, ctx)
        assert (ctx.stats["blk"].bias_E is not None) == has_bias
        assert int(ctx.stats["blk"].counts_E.sum()) == 20


def test_shared_gate_scales_the_shared_experts_per_token():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=6, hidden_dim=4, num_experts=3, top_k=1, num_shared_experts=1, use_shared_gate=True,
                        engine="reference"))
    assert moe.w_shared_gate.shape == (1, 6) and torch.equal(moe.w_shared_gate, torch.zeros(1, 6))
    with torch.no_grad():
        moe.w_shared_gate.normal_()
        moe.experts.w_down.zero_()  # only the gated shared experts remain
    x = torch.randn(5, 6)
    expected = torch.sigmoid(F.linear(x, moe.w_shared_gate)) * moe.shared_experts(x)
    torch.testing.assert_close(moe(x), expected)


def test_layer_3d_input_is_batch_of_sequences_for_the_loss():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=6, hidden_dim=4, num_experts=4, top_k=1,
                        router=RouterConfig(aux_loss_level="sequence", aux_loss_coef=1.0)))
    x = torch.randn(3, 5, 6)
    c3, c2, c1 = RoutingContext(), RoutingContext(), RoutingContext()
    moe(x, c3)
    moe.route(x.reshape(15, 6), c2, num_sequences=3)
    moe(x.reshape(15, 6), c1)  # 2-D input: one sequence
    torch.testing.assert_close(c3.losses["aux_loss"], c2.losses["aux_loss"])
    assert not torch.allclose(c1.losses["aux_loss"], c3.losses["aux_loss"])
    c0 = RoutingContext()
    moe.route(x.reshape(15, 6), c0)  # route() alone defaults to one sequence
    torch.testing.assert_close(c0.losses["aux_loss"], c1.losses["aux_loss"])


@pytest.mark.parametrize("kwargs,words", [
    (dict(shared_hidden_dim=8), "moe.shared_hidden_dim=8 needs num_shared_experts >= 1"),
    (dict(num_shared_experts=1, shared_hidden_dim=0), "moe.shared_hidden_dim=0 needs"),
    (dict(use_shared_gate=True), "moe.use_shared_gate=True needs num_shared_experts >= 1"),
    (dict(activation="tanh"), "moe.activation='tanh' is not one of"),
    (dict(engine="fast"), "moe.engine='fast' is not one of"),
    (dict(router={"top_k": 2}), "moe.router={'top_k': 2} is a dict, not RouterConfig"),
])
def test_moe_config_errors_name_the_field(kwargs, words):
    with pytest.raises(ConfigError) as e:
        MoEConfig(dim=8, hidden_dim=4, num_experts=4, **kwargs)
    assert words in str(e.value)
    MoEConfig(dim=8, hidden_dim=4, num_experts=4, num_shared_experts=1, shared_hidden_dim=1, use_shared_gate=True)

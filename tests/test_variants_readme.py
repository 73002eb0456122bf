"""Read-ME pre-gating: the spec's minimal faithful tests that apply to a planner + plan-consuming layers
(architectures.md §8, compression-adaptation-serving.md §12), causality, losses and gradient targets."""

import pytest
import torch

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.dispatch import reference_engine
from moekit.layers import build_ffn
from moekit.layers.variants.readme import (PLAN_KEY, ReadMEConfig, ReadMEMoE, ReadMEPlanner, RoutingPlan,
                                           planner_distillation_loss)
from moekit.routing.losses import load_balancing_loss

from .variants_util import params_with_grad, tiny_moe

SMALL = dict(planner_dim=8, planner_layers=1, planner_heads=2)


def _model(num_layers=3, top_k=1, router=None, **kw):
    torch.manual_seed(0)
    moe = tiny_moe(top_k=top_k, num_shared_experts=1, router=router or {})
    options = {**SMALL, **kw}
    planner = ReadMEPlanner(moe, ReadMEConfig(**options), num_layers=num_layers)
    layers = [build_ffn("readme", moe, options, layer_index=i, num_layers=num_layers, name=f"layers.{i}.ffn")
              for i in range(num_layers)]
    return planner, layers


def test_planner_runs_once_and_every_layer_runs_its_own_plan_through_the_engine():
    planner, layers = _model(per_layer=True, top_k=2)
    calls = []
    planner.register_forward_hook(lambda *a: calls.append(1))
    emb, x = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ctx = RoutingContext()
    plan = planner(emb, ctx)
    h = x
    for i, layer in enumerate(layers):
        y = layer(h, ctx)
        h_TD = h.reshape(-1, 8)
        y_ref = reference_engine(h_TD, plan.routing(i), layer.experts) + layer.shared_experts(h_TD)
        torch.testing.assert_close(y.reshape(-1, 8), y_ref, rtol=1e-5, atol=1e-6)
        h = h + y
    assert len(calls) == 1 and ctx.state[PLAN_KEY] is plan and plan.num_plans == 3
    assert not torch.equal(plan.expert_ids_LTK[0], plan.expert_ids_LTK[1])  # the layers' plans differ


def test_forced_expert_is_used_by_every_layer_with_weight_one():
    planner, layers = _model()
    x = torch.randn(6, 8)
    plan = planner(torch.randn(1, 6, 8))
    assert plan.num_plans == 1 and torch.all(plan.weights_LTK == 1.0)  # paper: hard top-1, no gate value
    forced = RoutingPlan(expert_ids_LTK=torch.full_like(plan.expert_ids_LTK, 2), weights_LTK=plan.weights_LTK,
                         probs_LTE=plan.probs_LTE, logits_LTE=plan.logits_LTE)
    ctx = RoutingContext()
    ctx.state[PLAN_KEY] = forced
    for layer in layers:
        torch.testing.assert_close(layer(x, ctx), layer.experts.expert(x, 2) + layer.shared_experts(x))


def test_identical_experts_make_every_plan_the_dense_model():
    planner, layers = _model(top_k=2)
    layer = layers[0]
    with torch.no_grad():
        for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
            w.copy_(w[:1].expand_as(w))
    x = torch.randn(2, 4, 8)
    ctx = RoutingContext()
    planner(torch.randn(2, 4, 8), ctx)
    dense = layer.experts.expert(x.reshape(-1, 8), 0) + layer.shared_experts(x.reshape(-1, 8))
    torch.testing.assert_close(layer(x, ctx).reshape(-1, 8), dense, rtol=1e-5, atol=1e-6)


def test_layers_error_clearly_without_a_plan_or_with_a_mismatched_one():
    planner, layers = _model(per_layer=True, num_layers=2)
    with pytest.raises(ValueError, match=r"planner\(tokens_emb, ctx\)"):
        layers[0](torch.randn(3, 8), RoutingContext())
    with pytest.raises(ValueError, match="no routing plan"):
        layers[0](torch.randn(3, 8))
    ctx = RoutingContext()
    planner(torch.randn(1, 4, 8), ctx)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        layers[0](torch.randn(3, 8), ctx)
    with pytest.raises(ValueError, match="not layer 5"):
        ReadMEMoE(tiny_moe(), ReadMEConfig(**SMALL), layer_index=5)(torch.randn(4, 8), ctx)


def test_planner_is_causal():
    planner, _ = _model(per_layer=True)
    emb = torch.randn(1, 6, 8)
    emb2 = emb.clone()
    emb2[0, 4:] = torch.randn(2, 8)
    before, after = planner(emb).logits_LTE, planner(emb2).logits_LTE
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[:, 4:], before[:, 4:])


def test_balance_loss_coefficient_and_gradients_reach_the_planner_only():
    planner, layers = _model(per_layer=True, router=dict(aux_loss_coef=0.3, aux_loss_level="sequence",
                                                          z_loss_coef=0.02))
    emb, x = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    ctx = RoutingContext()
    plan = planner(emb, ctx)
    expected = 0.3 * sum(load_balancing_loss(plan.probs_LTE[i], plan.expert_ids_LTK[i], 2) for i in range(3)) / 3
    torch.testing.assert_close(ctx.layer_losses["readme.planner"]["aux_loss"], expected)
    torch.testing.assert_close(ctx.losses["z_loss"],
                               0.02 * torch.logsumexp(plan.logits_LTE, -1).square().mean())
    planner_params = {n for n, _ in planner.named_parameters()}
    for name in ("aux_loss", "z_loss"):
        ctx = RoutingContext()
        planner(emb, ctx)
        assert params_with_grad(planner, ctx.losses[name]) == planner_params
    # hard plans carry no gate value: the layers' output does not train the planner; soft plans do
    for weights, trains in (("hard", False), ("soft", True)):
        planner, layers = _model(weights=weights, top_k=2)  # top-1 renormalised would weigh 1 anyway
        ctx = RoutingContext()
        planner(emb, ctx)
        out = layers[0](x, ctx).square().sum()
        planner.zero_grad(set_to_none=True)
        out.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in planner.parameters()) == trains
        assert layers[0].experts.w_up.grad.abs().sum() > 0


def test_planner_distillation_loss_is_the_papers_mix():
    torch.manual_seed(1)
    logits, target = torch.randn(5, 4), torch.rand(5, 4).softmax(-1)
    logp = logits.log_softmax(-1)
    hard = (0.5 * -logp.gather(1, target.argmax(-1, keepdim=True))[:, 0] + 0.5 * -logp.mean(-1)).mean()
    soft = -(target * logp).sum(-1).mean()
    torch.testing.assert_close(planner_distillation_loss(logits, target), 0.75 * hard + 0.25 * soft)


def test_switch_rate_statistic_and_builder_options():
    planner, layers = _model(per_layer=True)
    ctx = RoutingContext(collect_stats=True)
    plan = planner(torch.randn(2, 5, 8), ctx)
    for layer in layers:
        layer(torch.randn(2, 5, 8), ctx)
    s = ctx.stats_summary()
    ids = plan.expert_ids_LTK[:, :, 0]
    assert s["layers.0.ffn"]["switch_rate"] == 0.0
    assert abs(s["layers.2.ffn"]["switch_rate"] - (ids[2] != ids[1]).float().mean().item()) < 1e-6
    assert s["layers.1.ffn"]["tokens"] == 10
    layer = build_ffn("readme", tiny_moe(), {}, layer_index=4, num_layers=6, name="layers.4.ffn")
    assert isinstance(layer, ReadMEMoE) and layer.layer_index == 4 and not hasattr(layer, "router")
    with pytest.raises(ConfigError, match="even head size"):
        build_ffn("readme", tiny_moe(), {"planner_dim": 12, "planner_heads": 4})
    with pytest.raises(ConfigError, match="variant.per_layer"):
        build_ffn("readme", tiny_moe(), {"per_layers": True})
    with pytest.raises(ConfigError, match=r"router.capacity_factor=None \(got 1.5\)"):
        ReadMEPlanner(tiny_moe(router=dict(capacity_factor=1.5)), ReadMEConfig(**SMALL))

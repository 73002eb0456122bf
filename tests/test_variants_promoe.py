"""ProMoE: the spec's minimal faithful tests (architectures.md §16), the contrastive loss, coefficients, gradient
targets and the engine against the reference loop."""

import pytest
import torch
import torch.nn.functional as F

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.dispatch import reference_engine
from moekit.layers import build_ffn
from moekit.layers.variants.promoe import UNCONDITIONAL_KEY, ProMoE, ProMoEConfig, routing_contrastive_loss
from moekit.routing.losses import load_balancing_loss

from .variants_util import params_with_grad, tiny_moe


def _layer(router=None, **kw):
    torch.manual_seed(0)
    return ProMoE(tiny_moe(num_shared_experts=1, router=router or {}), ProMoEConfig(**kw), name="l0")


def _ctx(flag, stats=False):
    ctx = RoutingContext(collect_stats=stats)
    ctx.state[UNCONDITIONAL_KEY] = flag
    return ctx


def test_unconditional_tokens_never_reach_routed_experts():
    layer = _layer(rcl_coef=1.0)
    x = torch.randn(2, 5, 8)
    flag = torch.tensor([[True] * 5, [False, True, False, False, True]])
    y = layer(x, _ctx(flag))
    routing = layer.route(x.reshape(-1, 8), _ctx(flag))
    ids = routing.expert_ids_TK.view(2, 5, 2)
    assert torch.all(ids[flag] == torch.tensor([4, -1])) and torch.all((ids[~flag] >= 0) & (ids[~flag] < 4))
    x_u = x[flag]
    torch.testing.assert_close(y[flag], layer.experts.expert(x_u, 4) + layer.shared_experts(x_u))
    # a batch of unconditional tokens only: no gradient reaches the routed experts or the prototypes
    ctx = _ctx(torch.ones(2, 5, dtype=torch.bool))
    out = layer(x, ctx)
    layer.zero_grad(set_to_none=True)
    (out.square().sum() + ctx.total_loss()).backward()
    assert layer.experts.w_up.grad[:4].abs().sum() == 0 and layer.experts.w_up.grad[4].abs().sum() > 0
    assert layer.prototypes.grad is None or layer.prototypes.grad.abs().sum() == 0


def test_stats_report_unconditional_share_and_cosine():
    layer = _layer()
    flag = torch.tensor([[True, False, False, False]])
    ctx = _ctx(flag, stats=True)
    x = torch.randn(1, 4, 8)
    layer(x, ctx)
    s = ctx.stats_summary()["l0"]
    assert s["uncond_share"] == 0.25 and s["tokens"] == 4 * 2 - 1  # one unconditional token, one slot
    cos = F.normalize(x[0, 1:], dim=-1) @ F.normalize(layer.prototypes, dim=-1).t()
    assert abs(s["top1_cosine"] - cos.amax(-1).mean().item()) < 1e-6


def test_routing_is_invariant_to_positive_scaling_of_the_input():
    for gate in ("softmax", "cosine"):
        layer = _layer(router=dict(norm_topk_prob=False), gate=gate)
        x = torch.randn(9, 8)
        r = layer.route(x)
        for c in (0.01, 7.0):
            rc = layer.route(c * x)
            assert torch.equal(rc.expert_ids_TK, r.expert_ids_TK)
            torch.testing.assert_close(rc.weights_TK, r.weights_TK)


def test_cosine_gate_uses_raw_cosines_and_softmax_gate_uses_probabilities():
    x = torch.randn(6, 8)
    layer = _layer(router=dict(norm_topk_prob=False), gate="cosine")
    cos = F.normalize(x, dim=-1) @ F.normalize(layer.prototypes, dim=-1).t()
    r = layer.route(x)
    torch.testing.assert_close(r.weights_TK, cos.topk(2, -1).values)
    layer = _layer(router=dict(norm_topk_prob=False), temperature=0.5)
    torch.testing.assert_close(layer.route(x).weights_TK, (cos / 0.5).softmax(-1).topk(2, -1).values)


def test_rcl_is_lowest_for_aligned_prototypes_and_training_aligns_them():
    torch.manual_seed(3)
    centers = torch.eye(4, 8) * 3
    ids = torch.arange(4).repeat_interleave(5)[:, None]
    x = centers[ids[:, 0]] + 0.3 * torch.randn(20, 8)
    means = torch.stack([x[ids[:, 0] == e].mean(0) for e in range(4)])
    aligned = routing_contrastive_loss(means, x, ids, 0.1)
    assert aligned < routing_contrastive_loss(means[[1, 0, 3, 2]], x, ids, 0.1)
    assert aligned < routing_contrastive_loss(torch.randn(4, 8), x, ids, 0.1)
    # explicit formula on the active experts
    logits = F.normalize(means, dim=-1) @ F.normalize(means, dim=-1).t() / 0.1
    torch.testing.assert_close(aligned, F.cross_entropy(logits, torch.arange(4)))
    # inactive experts (and -1 slots) drop out; a single active expert gives 0
    ids_partial = torch.where(ids < 2, ids, -1)
    sub = F.normalize(means[:2], dim=-1) @ F.normalize(means[:2], dim=-1).t() / 0.1
    torch.testing.assert_close(routing_contrastive_loss(means, x, ids_partial, 0.1),
                               F.cross_entropy(sub, torch.arange(2)))
    assert routing_contrastive_loss(means, x, torch.zeros_like(ids), 0.1) == 0
    # minimising the loss from random prototypes aligns each prototype with its own cluster
    protos = torch.randn(4, 8, requires_grad=True)
    cos0 = F.normalize(protos.detach(), dim=-1) @ F.normalize(means, dim=-1).t()
    opt = torch.optim.SGD([protos], lr=0.5, momentum=0.9)
    for _ in range(20):
        opt.zero_grad()
        routing_contrastive_loss(protos, x, ids, 0.1).backward()
        opt.step()
    cos = F.normalize(protos, dim=-1) @ F.normalize(means, dim=-1).t()
    assert not torch.equal(cos0.argmax(-1), torch.arange(4))
    assert torch.equal(cos.argmax(-1), torch.arange(4)) and torch.all(cos.diagonal() > cos0.diagonal() + 0.1)


def test_loss_coefficients_and_gradient_targets():
    layer = _layer(router=dict(aux_loss_coef=0.2), rcl_coef=0.6, rcl_temperature=0.2)
    x = torch.randn(2, 6, 8)
    flag = torch.rand(2, 6) < 0.3
    flag[0, 0] = True
    ctx = _ctx(flag)
    layer(x, ctx)
    x_TD, cond = x.reshape(-1, 8), ~flag.reshape(-1)
    cos = F.normalize(x_TD, dim=-1) @ F.normalize(layer.prototypes, dim=-1).t()
    probs = cos.softmax(-1)
    ids = probs.topk(2, -1).indices
    torch.testing.assert_close(ctx.losses["aux_loss"], 0.2 * load_balancing_loss(probs[cond], ids[cond]))
    torch.testing.assert_close(ctx.losses["promoe_rcl_loss"],
                               0.6 * routing_contrastive_loss(layer.prototypes, x_TD[cond], ids[cond][:, :1], 0.2))
    for name in ("aux_loss", "promoe_rcl_loss"):
        ctx = _ctx(flag)
        layer(x, ctx)
        assert params_with_grad(layer, ctx.losses[name]) == {"prototypes"}
    # the RCL also reaches the layer input (cluster means are not detached)
    x.requires_grad_(True)
    ctx = _ctx(flag)
    layer(x, ctx)
    (g,) = torch.autograd.grad(ctx.losses["promoe_rcl_loss"], x)
    assert g[~flag].abs().sum() > 0 and g[flag].abs().sum() == 0


def test_sorted_engine_matches_reference_with_unconditional_tokens_and_gradients():
    layer = _layer()
    x = torch.randn(2, 5, 8, requires_grad=True)
    flag = torch.tensor([[True, False, False, True, False], [False] * 5])
    y = layer(x, _ctx(flag))
    x_TD = x.reshape(-1, 8)
    routing = layer.route(x_TD, _ctx(flag))
    y_ref = (reference_engine(x_TD, routing, layer.experts) + layer.shared_experts(x_TD)).view_as(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    inputs = [x, layer.prototypes, layer.experts.w_up, layer.experts.w_down]
    for g, g_ref in zip(torch.autograd.grad(y.square().sum(), inputs),
                        torch.autograd.grad(y_ref.square().sum(), inputs)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_language_model_default_all_conditional_and_optional_unconditional_expert():
    layer = _layer(unconditional_expert=False)
    assert layer.experts.num_experts == 4
    x = torch.randn(2, 3, 8)
    r = layer.route(x.reshape(-1, 8), RoutingContext())
    assert torch.all(r.expert_ids_TK < 4) and r.scores_TE.shape == (6, 4)
    with pytest.raises(ValueError, match="unconditional_expert"):
        layer(x, _ctx(torch.zeros(2, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="one bool per token"):
        _layer()(x, _ctx(torch.zeros(5, dtype=torch.bool)))


def test_builder_options_and_router_checks():
    layer = build_ffn("promoe", tiny_moe(router=dict(norm_topk_prob=False)), {"gate": "cosine", "rcl_coef": 0.1},
                      name="layers.2.ffn")
    assert isinstance(layer, ProMoE) and layer.config.gate == "cosine" and layer.prototypes.shape == (4, 8)
    with pytest.raises(ConfigError, match="variant.rcl_coef"):
        build_ffn("promoe", tiny_moe(), {"rcl_coeff": 0.1})
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        build_ffn("promoe", tiny_moe(), {"gate": "cosine"})
    with pytest.raises(ConfigError, match="aux_loss_level"):
        build_ffn("promoe", tiny_moe(router=dict(aux_loss_level="sequence")), {})

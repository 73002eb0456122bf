"""Graph-of-tokens (Similarity-/Attention-Aware) routing: the spec's minimal faithful tests (architectures.md §13)
plus causality, the engine against the reference loop, loss coefficients and gradient targets."""

import pytest
import torch

from moekit import MoE, RoutingContext
from moekit.configs import ConfigError
from moekit.dispatch import reference_engine
from moekit.layers import build_ffn
from moekit.layers.variants.gmoe import ATTENTION_KEY, GMoEConfig, GraphOfTokensMoE
from moekit.routing.losses import load_balancing_loss, z_loss

from .variants_util import params_with_grad, tiny_moe


def _pair(**kw):
    torch.manual_seed(0)
    cfg = tiny_moe()
    layer = GraphOfTokensMoE(cfg, GMoEConfig(**kw), name="l0")
    moe = MoE(cfg, name="l0")
    moe.load_state_dict(layer.moe.state_dict())
    return layer, moe


def _entropy(p):
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def test_identity_graph_is_plain_softmax_routing():
    layer, moe = _pair(similarity="attention")
    x = torch.randn(2, 5, 8)
    ctx = RoutingContext(collect_stats=True)
    ctx.state[ATTENTION_KEY] = torch.eye(5).expand(2, 5, 5)
    torch.testing.assert_close(layer(x, ctx), moe(x), rtol=0, atol=0)
    routing, _ = layer.route(x, ctx)
    plain = moe.route(x.reshape(-1, 8))
    assert torch.equal(routing.expert_ids_TK, plain.expert_ids_TK)
    s = ctx.stats_summary()["l0"]
    assert s["self_weight"] == 1.0 and s["changed_top1"] == 0.0


def test_learned_similarity_at_low_temperature_is_the_identity_graph():
    layer, moe = _pair(temperature=1e-4, causal=False)
    x = torch.nn.functional.normalize(torch.randn(2, 6, 8), dim=-1)  # self-similarity 1 beats every other pair
    _, sim = layer.route(x)
    assert torch.equal(sim, torch.eye(6).expand(2, 6, 6))
    torch.testing.assert_close(layer(x), moe(x), rtol=0, atol=0)


def test_graph_rows_sum_to_one_and_mixing_obeys_jensen():
    layer, _ = _pair(temperature=0.5)
    x = torch.randn(3, 7, 8)
    routing, sim = layer.route(x)
    torch.testing.assert_close(sim.sum(-1), torch.ones(3, 7))
    p = routing.logits_TE.softmax(-1).view(3, 7, -1)
    mixed = routing.scores_TE.view(3, 7, -1)
    torch.testing.assert_close(mixed.sum(-1), torch.ones(3, 7))
    h_mixed, h_each = _entropy(mixed), torch.bmm(sim, _entropy(p)[..., None])[..., 0]
    assert torch.all(h_mixed >= h_each - 1e-6) and torch.all(h_mixed <= torch.log(torch.tensor(4.0)) + 1e-6)
    assert (h_mixed > h_each + 1e-4).any()  # the bound is not trivially tight


def test_causal_routing_ignores_future_tokens_and_non_causal_does_not():
    x = torch.randn(1, 6, 8)
    x2 = x.clone()
    x2[0, 4:] += 3 * torch.randn(2, 8)
    for causal in (True, False):
        layer, _ = _pair(temperature=0.3, causal=causal)
        before, after = layer.route(x)[0].scores_TE, layer.route(x2)[0].scores_TE
        if causal:
            torch.testing.assert_close(after[:4], before[:4], rtol=0, atol=0)
        else:
            assert not torch.allclose(after[:4], before[:4])


def test_large_temperature_non_causal_gives_every_token_of_a_sequence_the_same_experts():
    layer, _ = _pair(temperature=1e9, causal=False)
    routing, _ = layer.route(torch.randn(2, 5, 8))
    ids = routing.expert_ids_TK.view(2, 5, 2).sort(-1).values
    assert torch.equal(ids, ids[:, :1].expand_as(ids))


def test_sorted_engine_matches_reference_loop_with_gradients():
    layer, _ = _pair(temperature=0.7)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = layer(x)
    routing, _ = layer.route(x)
    y_ref = reference_engine(x.reshape(-1, 8), routing, layer.moe.experts).view_as(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    inputs = [x, layer.moe.router.weight, layer.similarity_weight, layer.moe.experts.w_up]
    for g, g_ref in zip(torch.autograd.grad(y.square().sum(), inputs),
                        torch.autograd.grad(y_ref.square().sum(), inputs)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_loss_coefficients_and_gradient_targets():
    torch.manual_seed(1)
    cfg = tiny_moe(router=dict(aux_loss_coef=0.3, aux_loss_level="sequence", z_loss_coef=0.05))
    layer = GraphOfTokensMoE(cfg, GMoEConfig(temperature=0.5), name="l0")
    x = torch.randn(2, 5, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    routing, _ = layer.route(x)
    expected = 0.3 * load_balancing_loss(routing.scores_TE, routing.expert_ids_TK, num_sequences=2)
    torch.testing.assert_close(ctx.losses["aux_loss"], expected)
    torch.testing.assert_close(ctx.losses["z_loss"], 0.05 * z_loss(routing.logits_TE))
    # the balance loss reaches the router and the similarity (through p~); the z-loss only the router
    ctx = RoutingContext()
    layer(x, ctx)
    assert params_with_grad(layer, ctx.losses["aux_loss"]) == {"moe.router.weight", "similarity_weight"}
    ctx = RoutingContext()
    layer(x, ctx)
    assert params_with_grad(layer, ctx.losses["z_loss"]) == {"moe.router.weight"}


def test_attention_aware_reads_head_mean_and_errors_without_it():
    layer, _ = _pair(similarity="attention")
    assert layer.similarity_weight is None
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="attention.probs"):
        layer(x, RoutingContext())
    with pytest.raises(ValueError, match="attention.probs"):
        layer(x)
    attn = torch.rand(2, 3, 4, 4).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    ctx = RoutingContext()
    ctx.state[ATTENTION_KEY] = attn
    _, sim = layer.route(x, ctx)
    torch.testing.assert_close(sim, attn.mean(1))
    ctx.state[ATTENTION_KEY] = attn[:, :, :3, :3]
    with pytest.raises(ValueError, match="expected"):
        layer(x, ctx)


def test_builder_options_and_router_checks():
    layer = build_ffn("gmoe", tiny_moe(), {"causal": False, "temperature": 2.0}, name="layers.1.ffn")
    assert isinstance(layer, GraphOfTokensMoE) and not layer.config.causal and layer.name == "layers.1.ffn"
    with pytest.raises(ConfigError, match="variant.temperature"):
        build_ffn("gmoe", tiny_moe(), {"temprature": 1.0})
    with pytest.raises(ConfigError, match="similarity"):
        build_ffn("gmoe", tiny_moe(), {"similarity": "cosine"})
    with pytest.raises(ConfigError, match="capacity_factor"):
        build_ffn("gmoe", tiny_moe(router=dict(capacity_factor=1.25)), {})


def test_attention_aware_mode_runs_inside_the_language_model():
    """The block asks its attention to publish probabilities; the routing reads exactly those."""
    from moekit import MoEConfig
    from moekit.layers.attention import apply_rope
    from moekit.models import LanguageModel, ModelConfig

    moe = MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2)
    cfg = ModelConfig(dim=16, num_layers=2, num_heads=2, context=8, moe=moe, ffn="gmoe",
                      variant={"similarity": "attention"})
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    assert all(b.attn.publish_probs for b in model.layers)
    plain = LanguageModel(cfg.replace(variant={"similarity": "learned"}))
    assert not any(b.attn.publish_probs for b in plain.layers)
    x = torch.randint(0, 256, (2, 8))
    seen = []
    model.layers[1].ffn.register_forward_pre_hook(lambda m, args: seen.append(args[1].state[ATTENTION_KEY].clone()))
    ctx = RoutingContext(collect_stats=True)
    model(x, ctx)
    block = model.layers[1]
    h = model.layers[0](model.embed(x), model.rope_cos[:8], model.rope_sin[:8], RoutingContext())
    q, k, _ = block.attn.w_qkv(block.attn_norm(h)).view(2, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(q, model.rope_cos[:8], model.rope_sin[:8]), apply_rope(k, model.rope_cos[:8], model.rope_sin[:8])
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    expected = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-5)
    assert "layers.1.ffn" in ctx.stats
    # publishing does not change the attention output
    a = block.attn(block.attn_norm(h), model.rope_cos[:8], model.rope_sin[:8], ctx=RoutingContext())
    block.attn.publish_probs = False
    torch.testing.assert_close(a, block.attn(block.attn_norm(h), model.rope_cos[:8], model.rope_sin[:8]),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="does not publish"):
        LanguageModel(cfg.replace(attention="mom"))

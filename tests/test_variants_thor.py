"""THOR: the spec's minimal faithful tests (architectures.md §12)."""

import torch

from moekit import FeedForward, RoutingContext
from moekit.layers import build_ffn
from moekit.layers.variants.thor import THOR, THORConfig, add_consistency_loss, consistency_loss

from .variants_util import params_with_grad, tiny_moe


def test_one_expert_call_per_layer_per_pass_and_passes_differ():
    torch.manual_seed(0)
    layer = THOR(tiny_moe(), name="l0")
    x = torch.randn(2, 5, 8)
    experts = set()
    for _ in range(12):
        ctx = RoutingContext(collect_stats=True)
        layer(x, ctx)
        counts = ctx.stats["l0"].counts_E
        assert (counts > 0).sum() == 1 and counts.sum() == 10  # one expert, all tokens
        experts.add(int(counts.argmax()))
    assert len(experts) > 1  # independent samples across passes


def test_forward_equals_the_sampled_expert():
    torch.manual_seed(1)
    layer = THOR(tiny_moe())
    x = torch.randn(6, 8)
    torch.manual_seed(5)
    e = int(layer.route(x).expert_ids_TK[0])
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x), layer.experts.expert(x, e), rtol=1e-5, atol=1e-6)


def test_eval_levels():
    layer = THOR(tiny_moe(num_experts=4), THORConfig(eval_level=1)).eval()
    ids = layer.route(torch.randn(3, 7, 8)).expert_ids_TK.view(3, 7)
    assert all(len(set(row.tolist())) == 1 for row in ids)
    layer = THOR(tiny_moe(num_experts=4), THORConfig(eval_level=0)).eval()
    assert len(set(layer.route(torch.randn(1, 64, 8)).expert_ids_TK.view(-1).tolist())) > 1


def test_single_expert_is_the_dense_ffn():
    layer = build_ffn("thor", tiny_moe(num_experts=1, top_k=1), {})
    ffn = FeedForward(8, 12)
    with torch.no_grad():
        ffn.w_gate.copy_(layer.experts.w_gate[0]), ffn.w_up.copy_(layer.experts.w_up[0])
        ffn.w_down.copy_(layer.experts.w_down[0])
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(layer(x), ffn(x), rtol=1e-5, atol=1e-6)


def test_consistency_loss_zero_for_same_experts_coefficient_and_gradients():
    torch.manual_seed(2)
    layer = THOR(tiny_moe())
    head = torch.nn.Linear(8, 11)
    x = torch.randn(2, 3, 8)
    torch.manual_seed(7)
    a = head(layer(x))
    torch.manual_seed(7)
    b = head(layer(x))
    assert consistency_loss(a, b) == 0
    p, q = torch.randn(4, 11), torch.randn(4, 11)
    P, Q = p.softmax(-1), q.softmax(-1)
    torch.testing.assert_close(consistency_loss(p, q), 0.5 * ((P - Q) * (P.log() - Q.log())).sum())
    mask = torch.tensor([True, False, True, True])
    torch.testing.assert_close(consistency_loss(p, q, mask), consistency_loss(p[mask], q[mask]))
    torch.manual_seed(8)
    a = head(layer(x))
    b = head(layer(x))
    while torch.equal(a, b):  # the two passes happened to sample the same expert; resample
        b = head(layer(x))
    ctx = RoutingContext()
    value = add_consistency_loss(ctx, a, b, coef=5.0)
    torch.testing.assert_close(value, 5.0 * consistency_loss(a, b))
    names = params_with_grad(torch.nn.ModuleDict({"layer": layer, "head": head}), ctx.losses["thor_consistency_loss"])
    assert value > 0 and {"layer.experts.w_up", "head.weight"} <= names

"""Residual-MoE / PR-MoE: the spec's minimal faithful tests (architectures.md §19) plus losses and stats."""

import torch

from moekit import RoutingContext
from moekit.layers import build_ffn
from moekit.routing.losses import load_balancing_loss
from moekit.layers.variants.pr_moe import ResidualMoE, ResidualMoEConfig

from .variants_util import params_with_grad, tiny_moe


def _zero_experts(layer):
    with torch.no_grad():
        layer.moe.experts.w_down.zero_()


def test_paper_form_with_zeroed_experts_is_the_dense_mlp():
    torch.manual_seed(0)
    layer = ResidualMoE(tiny_moe(top_k=1), ResidualMoEConfig())
    _zero_experts(layer)
    x = torch.randn(2, 3, 8)
    assert torch.equal(layer(x), layer.dense(x))


def test_deepspeed_form_with_zeroed_experts_is_c1_times_mlp():
    torch.manual_seed(1)
    layer = ResidualMoE(tiny_moe(top_k=1), ResidualMoEConfig(residual="deepspeed"), name="l0")
    _zero_experts(layer)
    x = torch.randn(2, 3, 8)
    c1 = layer.coefficient(x).softmax(-1)[..., 1:]
    ctx = RoutingContext(collect_stats=True)
    torch.testing.assert_close(layer(x, ctx), c1 * layer.dense(x))
    assert 0 < ctx.stats_summary()["l0"]["dense_weight"] < 1


def test_pyramid_expert_counts_per_block():
    cfg = tiny_moe(top_k=1)
    counts = [build_ffn("pr-moe", cfg, {"num_late_layers": 4, "late_num_experts": 8}, layer_index=i,
                        num_layers=12).moe.config.num_experts for i in range(12)]
    assert counts == [4] * 8 + [8] * 4
    default = [build_ffn("pr-moe", cfg, {}, layer_index=i, num_layers=6).moe.config.num_experts for i in range(6)]
    assert default == [4, 4, 4, 4, 8, 8]
    assert build_ffn("residual-moe", cfg, {}, layer_index=5, num_layers=6).moe.config.num_experts == 4


def test_aux_loss_coefficient_and_gradient_targets():
    torch.manual_seed(2)
    layer = ResidualMoE(tiny_moe(top_k=1, router=dict(aux_loss_coef=0.5)), ResidualMoEConfig(residual="deepspeed"))
    x = torch.randn(2, 4, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    r = layer.moe.route(x.reshape(-1, 8))
    torch.testing.assert_close(ctx.losses["aux_loss"], 0.5 * load_balancing_loss(r.scores_TE, r.expert_ids_TK))
    assert params_with_grad(layer, ctx.losses["aux_loss"]) == {"moe.router.weight"}
    names = params_with_grad(layer, layer(x).square().sum())
    assert {"dense.w_up", "coefficient.weight", "moe.experts.w_up", "moe.router.weight"} <= names

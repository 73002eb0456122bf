"""Chain-of-Experts: the spec's minimal faithful tests (architectures.md §1) plus loss/grad checks."""

import pytest
import torch

from moekit import MoE, RoutingContext
from moekit.configs import ConfigError
from moekit.dispatch import reference_engine
from moekit.layers import build_ffn
from moekit.layers.variants.coe import ChainOfExperts, CoEConfig
from moekit.routing.losses import load_balancing_loss

from .variants_util import params_with_grad, tiny_moe


def _copy_into(coe: ChainOfExperts, moe: MoE) -> None:
    coe.experts.load_state_dict(moe.experts.state_dict())
    coe.routers[0].load_state_dict(moe.router.state_dict())


def test_one_iteration_without_inner_residual_is_a_plain_moe():
    torch.manual_seed(0)
    cfg = tiny_moe(router=dict(norm_topk_prob=False))
    moe = MoE(cfg)
    coe = ChainOfExperts(cfg, CoEConfig(num_iterations=1, inner_residual=False, outer_residual=True))
    _copy_into(coe, moe)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(coe(x), moe(x), rtol=0, atol=1e-6)
    assert coe.block_residual is True


def test_default_flags_give_ln_x_plus_moe_and_are_explicit():
    torch.manual_seed(1)
    cfg = tiny_moe()
    moe = MoE(cfg)
    coe = ChainOfExperts(cfg, CoEConfig(num_iterations=1))
    _copy_into(coe, moe)
    assert coe.config.inner_residual and not coe.config.outer_residual and coe.block_residual is False
    h = torch.randn(3, 8)  # the block's normalised input LN(x)
    torch.testing.assert_close(coe(h), h + moe(h), rtol=0, atol=1e-6)


def test_params_grow_only_by_routers():
    cfg = tiny_moe()
    n = [sum(p.numel() for p in ChainOfExperts(cfg, CoEConfig(num_iterations=c)).parameters()) for c in (1, 2, 3)]
    assert n[1] - n[0] == n[2] - n[1] == cfg.num_experts * cfg.dim


def test_matches_a_reference_loop_and_expert_grads_accumulate_over_iterations():
    torch.manual_seed(2)
    cfg = tiny_moe(num_shared_experts=1)
    coe = ChainOfExperts(cfg, CoEConfig(num_iterations=2))
    x = torch.randn(6, 8)
    # Reference: the chain written out with two *separate copies* of the bank (reference engine).
    banks = [type(coe.experts)(4, 8, 12) for _ in range(2)]
    for b in banks:
        b.load_state_dict(coe.experts.state_dict())
    h = x
    for t in range(2):
        routing = coe.routers[t](h)
        h = h + reference_engine(h, routing, banks[t]) + coe.shared_experts(h)
    out = coe(x)
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-6)
    g_ref = torch.autograd.grad(h.square().sum(), [banks[0].w_up, banks[1].w_up])
    g = torch.autograd.grad(out.square().sum(), coe.experts.w_up)[0]
    assert g_ref[0].abs().sum() > 0 and g_ref[1].abs().sum() > 0  # both iterations used the pool
    torch.testing.assert_close(g, g_ref[0] + g_ref[1], rtol=1e-4, atol=1e-6)


def test_aux_loss_per_iteration_coefficient_and_gradient_targets():
    torch.manual_seed(3)
    coef = 0.37
    cfg = tiny_moe(router=dict(aux_loss_coef=coef, aux_loss_level="sequence"))
    coe = ChainOfExperts(cfg, CoEConfig(num_iterations=2), name="l0")
    x = torch.randn(2, 4, 8)
    ctx = RoutingContext(collect_stats=True)
    coe(x, ctx)
    assert set(ctx.layer_losses) == {"l0.iter0", "l0.iter1"}
    # recompute iteration 0's loss by hand
    r0 = coe.routers[0](x.reshape(-1, 8))
    expected0 = coef * load_balancing_loss(r0.scores_TE, r0.expert_ids_TK, num_sequences=2)
    torch.testing.assert_close(ctx.layer_losses["l0.iter0"]["aux_loss"], expected0)
    # iteration 0's loss reaches its own router only; iteration 1's loss also reaches what produced its
    # input h_1 (router 0's gates and the pool), as in the released code.
    assert params_with_grad(coe, ctx.layer_losses["l0.iter0"]["aux_loss"]) == {"routers.0.weight"}
    ctx2 = RoutingContext()
    coe(x.detach(), ctx2)
    names = params_with_grad(coe, ctx2.layer_losses["l0.iter1"]["aux_loss"])
    assert "routers.1.weight" in names and names <= {"routers.0.weight", "routers.1.weight", "experts.w_up",
                                                     "experts.w_gate", "experts.w_down"}
    assert set(ctx.stats) == {"l0.iter0", "l0.iter1"}


def test_registered_builder_and_option_errors():
    ffn = build_ffn("coe", tiny_moe(), {"num_iterations": 3}, name="layers.0.ffn")
    assert isinstance(ffn, ChainOfExperts) and len(ffn.routers) == 3
    with pytest.raises(ConfigError, match="num_iterations"):
        build_ffn("coe", tiny_moe(), {"num_iterations": 0})
    with pytest.raises(ConfigError, match="variant.num_iteration"):
        build_ffn("coe", tiny_moe(), {"num_iteration": 2})


def test_shared_experts_are_sized_like_the_moe_layer():
    from moekit import MoE, MoEConfig
    from moekit.layers.variants import ChainOfExperts
    cfg = MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=1, num_shared_experts=1, shared_hidden_dim=12)
    assert ChainOfExperts(cfg).shared_experts.w_up.shape == MoE(cfg).shared_experts.w_up.shape == (12, 8)

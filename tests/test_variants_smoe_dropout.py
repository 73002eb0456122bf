"""SMoE-Dropout: the spec's minimal faithful tests (architectures.md §11)."""

import torch

from moekit import RoutingContext
from moekit.layers import build_ffn
from moekit.layers.variants.smoe_dropout import SMoEDropout, SMoEDropoutConfig, k_schedule

from .variants_util import tiny_moe


def test_router_is_frozen_through_training():
    torch.manual_seed(0)
    layer = SMoEDropout(tiny_moe(), SMoEDropoutConfig(total_steps=4))
    w0, b0 = layer.moe.router.weight.clone(), layer.router_bias.clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        ctx = RoutingContext()
        layer(torch.randn(2, 3, 8), ctx).square().sum().backward()
        assert layer.moe.router.weight.grad is None and not ctx.losses  # no balance loss
        opt.step()
        opt.zero_grad()
        layer.on_step(step + 1)
    assert torch.equal(layer.moe.router.weight, w0) and torch.equal(layer.router_bias, b0)


def test_k_equal_num_experts_is_the_full_softmax_mixture():
    torch.manual_seed(1)
    layer = SMoEDropout(tiny_moe(), SMoEDropoutConfig()).eval()  # eval: k = k_max = E
    x = torch.randn(5, 8)
    p = (layer.moe.router.logits(x) + layer.router_bias).softmax(-1)
    expected = sum(p[:, i:i + 1] * layer.moe.experts.expert(x, i) for i in range(4))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_k_schedule_endpoints_and_growth():
    assert k_schedule(0, 8, 16, 400_000) == 8 and k_schedule(400_000, 8, 16, 400_000) == 16
    assert k_schedule(200_000, 8, 16, 400_000) == 12 and k_schedule(10**9, 8, 16, 400_000) == 16
    assert k_schedule(0, 1, 4, 10, "cosine") == 1 and k_schedule(10, 1, 4, 10, "cosine") == 4
    layer = build_ffn("smoe-dropout", tiny_moe(top_k=1), {"total_steps": 6}, name="l0")
    ks = []
    for step in range(7):
        layer.on_step(step)
        ctx = RoutingContext(collect_stats=True)
        layer(torch.randn(4, 8), ctx)
        ks.append(int(ctx.stats_summary()["l0"]["active_k"]))
        assert ctx.stats["l0"].counts_E.sum() == 4 * ks[-1]
    assert ks == [1, 1, 2, 3, 3, 3, 4] and ks == sorted(ks)  # Python round(), as in the released code

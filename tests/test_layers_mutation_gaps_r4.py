"""Behaviours of the layer variants and attention modules that the round-4 mutation samples (issue 11) found
unchecked: the seed-5 sample's last live mutants (MoD's block context, MoE++'s active parameters, BlockFFN's
trend window, TR-μMoE's core init), then the survivors of the fresh samples (seeds 6 and up). Each test checks a
behaviour, not the mutated line."""

from __future__ import annotations

import pytest
import torch

from moekit import RoutingContext
from moekit.layers import build_ffn
from moekit.layers.variants.blockffn import BlockFFN, BlockFFNConfig
from moekit.layers.variants.mod import POSITIONS_KEY, MixtureOfDepths, MoDConfig
from moekit.layers.variants.moepp import MoEPlusPlus, MoEPPConfig
from moekit.layers.variants.mumoe import TRMultilinear

from .variants_util import tiny_moe

# ------------------------------------------------------------------ seed 5's last live mutants


@pytest.mark.parametrize("mode", ["train", "threshold"])
def test_mod_hands_its_context_to_the_block_so_inner_layers_keep_their_statistics(mode):
    torch.manual_seed(0)
    mod = MixtureOfDepths(8, MoDConfig(capacity=0.5, eval_mode="threshold"), name="depth")
    mod.train(mode == "train")
    inner = build_ffn("moe", tiny_moe(), {}, layer_index=0, num_layers=1, name="inner")
    seen = []

    def block(h, c):
        seen.append((c, None if c is None else c.state.get(POSITIONS_KEY)))
        return inner(h, c)

    ctx = RoutingContext(collect_stats=True)
    x = torch.randn(2, 6, 8)
    mod(x, block, ctx)
    assert len(seen) == 1 and seen[0][0] is ctx, "the block runs once, with the caller's context"
    positions = seen[0][1]
    if mode == "train":
        assert positions is not None and positions.shape == (2, 3), "the block sees the k = 3 chosen positions"
        tokens = 6  # 2 sequences x 3 chosen positions
    else:
        assert positions is None, "threshold evaluation runs the block on every position"
        tokens = 12
    assert "inner" in ctx.stats, "the inner MoE recorded its statistics into the caller's context"
    assert int(ctx.stats["inner"].counts_E.sum()) == tokens * 2, "top-2 over the tokens the block ran on"


@pytest.mark.parametrize("top_k,activation,per_expert", [(1, "swiglu", 3 * 8 * 12), (3, "swiglu", 3 * 8 * 12),
                                                          (2, "gelu", 2 * 8 * 12)])
def test_moepp_active_params_count_top_k_ffn_experts_besides_everything_else(top_k, activation, per_expert):
    layer = MoEPlusPlus(tiny_moe(num_experts=5, top_k=top_k, activation=activation), MoEPPConfig())
    total = sum(p.numel() for p in layer.parameters())
    bank = 5 * per_expert  # five bias-free FFN experts D=8 -> F=12 -> D
    assert sum(p.numel() for p in layer.experts.parameters()) == bank
    assert layer.active_params() == total - bank + top_k * per_expert


def _chunk_losses_then_trend(interval: int, batches: list[torch.Tensor]) -> tuple[BlockFFN, list[float]]:
    torch.manual_seed(1)
    layer = BlockFFN(tiny_moe(num_experts=6, activation="gelu"),
                     BlockFFNConfig(adaptive_chunk_coef=True, hold_steps=0, interval=interval, chunk_coef=0.1,
                                    chunk_len=2), name="b").train()
    losses = []
    for x in batches:
        ctx = RoutingContext()
        layer(x, ctx)
        losses.append(float(ctx.losses["blockffn_chunk_loss"].detach()) / 0.1)
    return layer, losses


def test_blockffn_trend_compares_the_last_interval_with_the_one_before_only():
    torch.manual_seed(2)
    interval = 2
    # three intervals of batches; the oldest one must no longer count when the coefficient is adapted
    batches = [torch.randn(2, 4, 8) * (1 + i) for i in range(3 * interval)]
    layer, losses = _chunk_losses_then_trend(interval, batches)
    prev = sum(losses[interval:2 * interval]) / interval
    last = sum(losses[2 * interval:]) / interval
    oldest = sum(losses[:interval]) / interval
    assert abs(oldest - prev) > 1e-4, "the test needs an oldest interval that differs from the previous one"
    ratio = last / prev
    ratio = max(ratio, 1.025) if ratio > 1 else ratio
    expected = min(0.1 * ratio, 4 * 0.1)
    layer.on_step(interval)  # start a ramp towards the target
    layer.on_step(2 * interval)  # the ramp's end: the coefficient reached the target
    assert layer.chunk_coef == pytest.approx(expected, rel=1e-5)


def test_tr_mumoe_expert_core_slices_start_as_diagonals_drawn_around_one():
    torch.manual_seed(3)
    layer = TRMultilinear(400, 4, 3, 3, 2, 2)  # G_N [r1=3, N=400, r2=2]
    g = layer.g_expert.detach()
    eye = torch.eye(3, 2, dtype=torch.bool)
    diag = g[eye[:, None, :].expand_as(g)]
    off = g[~eye[:, None, :].expand_as(g)]
    assert diag.numel() == 800 and torch.equal(off, torch.zeros_like(off)), "each slice is diag(N(1, 1))"
    assert abs(diag.mean().item() - 1.0) < 0.15 and abs(diag.std().item() - 1.0) < 0.15

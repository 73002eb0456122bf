"""Union of Experts (architectures.md §5): UoME with every slice is the dense MLP, SMHA with every head is dense
attention; selection semantics, gradients to the selectors, bad input, and the preset."""

from __future__ import annotations

import pytest
import torch

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.experts import FeedForward
from moekit.layers import build_attention, build_ffn
from moekit.layers.attention import rope_tables
from moekit.layers.attention.smha import SelectiveMultiHeadAttention, SMHAConfig
from moekit.layers.variants.uoe import UnionOfMLPExperts, UoMEConfig
from moekit.models import Attention

from .reference import assert_close
from .variants_util import tiny_moe


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_uome_with_every_slice_is_the_dense_mlp_of_the_concatenated_slices(level):
    torch.manual_seed(0)
    layer = UnionOfMLPExperts(tiny_moe(num_experts=3, top_k=3, hidden_dim=5), UoMEConfig(level=level))
    dense = FeedForward(8, 15)
    b = layer.experts
    with torch.no_grad():
        dense.w_gate.copy_(b.w_gate.reshape(15, 8)), dense.w_up.copy_(b.w_up.reshape(15, 8))
        dense.w_down.copy_(b.w_down.permute(1, 0, 2).reshape(8, 15))
    x = torch.randn(2, 7, 8)
    assert_close(layer(x), dense(x), "k = E: the equitant decomposition is exact")


def test_uome_selection_only_and_sequence_level_routing():
    torch.manual_seed(1)
    layer = UnionOfMLPExperts(tiny_moe(num_experts=4, top_k=1), UoMEConfig(level="sequence"))
    x = torch.randn(3, 5, 8)
    routing = layer.route(x)
    ids = routing.expert_ids_TK.view(3, 5)
    assert all(len(set(row.tolist())) == 1 for row in ids), "one choice per sequence"
    assert torch.equal(routing.weights_TK, torch.ones_like(routing.weights_TK)), "gate values do not scale"
    y = layer(x).view(15, 8)
    e = routing.expert_ids_TK[:, 0]
    expected = torch.stack([layer.experts.expert(x.view(15, 8)[t:t + 1], int(e[t]))[0] for t in range(15)])
    assert_close(y, expected, "the selected slice alone")
    ctx = RoutingContext()
    token = build_ffn("uoe", tiny_moe(num_experts=4, top_k=2, router={"aux_loss_coef": 0.01}), {})
    token(x, ctx).pow(2).sum().backward()
    assert token.selector.weight.grad.abs().sum() > 0, "the selector learns through g / stopgrad(g)"
    assert ctx.losses["aux_loss"] > 0


def _copy(smha, dense):
    with torch.no_grad():
        smha.w_qkv.weight.copy_(dense.w_qkv.weight), smha.w_out.weight.copy_(dense.w_out.weight)


def test_smha_with_every_head_chosen_is_dense_attention():
    torch.manual_seed(2)
    dense = Attention(12, 3, 2)
    smha = SelectiveMultiHeadAttention(12, 3, 2, SMHAConfig(heads_per_token=3))
    _copy(smha, dense)
    x = torch.randn(2, 6, 12)
    cos, sin = rope_tables(6, 4, 10000.0)
    assert_close(smha(x, cos, sin), dense(x, cos, sin), "all heads for all tokens")


def test_smha_head_sees_only_the_tokens_that_chose_it():
    torch.manual_seed(3)
    smha = SelectiveMultiHeadAttention(8, 2, 2, SMHAConfig(heads_per_token=1))
    with torch.no_grad():
        smha.w_gate.weight.zero_()
        smha.w_gate.weight[0, 0], smha.w_gate.weight[1, 0] = 10.0, -10.0  # feature 0 > 0 picks head 0
    x = torch.randn(1, 6, 8)
    x[0, :, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    cos, sin = rope_tables(6, 4, 10000.0)
    y = smha(x, cos, sin)
    x2 = x.clone()
    x2[0, 1, 1:] += 3.0  # token 1 chose head 1: tokens of head 0 (2, 4) must not see it
    y2 = smha(x2, cos, sin)
    assert torch.allclose(y[0, [0, 2, 4]], y2[0, [0, 2, 4]], atol=1e-6)
    assert not torch.allclose(y[0, 3], y2[0, 3])
    ctx = RoutingContext(collect_stats=True)
    smha(x, cos, sin, ctx=ctx).sum().backward()
    assert smha.w_gate.weight.grad.abs().sum() > 0
    assert ctx.stats["smha"].counts_E.tolist() == [3, 3]


def test_bad_options_and_the_preset(tmp_path):
    with pytest.raises(ConfigError, match="heads_per_token=5 exceeds model.num_heads=4"):
        build_attention("smha", {"heads_per_token": 5}, dim=16, num_heads=4, num_layers=1, context=8)
    with pytest.raises(ConfigError, match="variant.level='batch' is not one of"):
        build_ffn("uoe", tiny_moe(), {"level": "batch"})
    from moekit.recipes import load_preset
    from moekit.training import train, with_overrides

    cfg = with_overrides(load_preset("uoe"), {
        "model.dim": "16", "model.num_heads": "4", "model.context": "8", "model.num_layers": "2",
        "model.moe.hidden_dim": "8", "train.max_steps": "2", "train.batch_size": "2", "train.eval_every": "2",
        "train.eval_batches": "1", "data.max_files": "3", "train.max_seconds": "600"})
    layers = train(cfg, tmp_path / "run", progress=False).summary["layers"]
    assert {"layers.0.attn", "layers.0.ffn", "layers.1.attn", "layers.1.ffn"} <= set(layers)

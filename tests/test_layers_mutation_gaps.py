"""Behaviours of the layer variants and attention modules that a seeded mutation sample (issue 11, round 3)
found unchecked: error texts name the field and the fix, boundary configs are accepted, initial scales follow
their formulas, statistics and losses are keyed by the layer's name, accumulated state equals one batch, and
per-sequence and per-layer losses follow their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.layers.attention import rope_tables
from moekit.layers.attention.mom import MixtureOfMemories, MoMConfig
from moekit.layers.attention.rope import apply_rope, apply_rope_any_width
from moekit.layers.attention.routing_attention import RoutingAttention, RoutingAttentionConfig
from moekit.layers.attention.smha import SelectiveMultiHeadAttention, SMHAConfig
from moekit.layers.attention.switchhead import SwitchHead, SwitchHeadConfig, sparse_sigmoid_gates
from moekit.layers.variants.blockffn import BlockFFNConfig
from moekit.layers.variants.duo import DuoConfig, DuoFFN
from moekit.layers.variants.mod import MixtureOfDepths, MoDConfig
from moekit.layers.variants.moepp import MoEPlusPlus, MoEPPConfig
from moekit.layers.variants.moma import MoMaConfig
from moekit.layers.variants.mumoe import MultilinearMoE, MuMoEConfig, matched_rank
from moekit.layers.variants.promoe import ProMoE, ProMoEConfig
from moekit.layers.variants.readme import ReadMEConfig
from moekit.layers.variants.smoe_dropout import SMoEDropoutConfig
from moekit.routing import load_balancing_loss

from .reference import assert_close
from .variants_util import tiny_moe

# ------------------------------------------------------------------ error texts name the field and the fix

BAD = [
    ("mom-aux", lambda: MoMConfig(aux_loss_coef=-0.1), r"aux_loss_coef=-0\.1 must be >= 0 \(0: off\)"),
    ("moma-aux", lambda: MoMaConfig(aux_router_coef=-1.0), r"variant\.aux_router_coef=-1\.0 must be >= 0 \(0: off\)"),
    ("readme-weights", lambda: ReadMEConfig(weights="x"), r"^variant\.weights='x' is not one of \['hard', 'soft'\]"),
    ("smoe-schedule", lambda: SMoEDropoutConfig(schedule="x"), r"^variant\.schedule='x' is not one of"),
    ("promoe-rcl", lambda: ProMoEConfig(rcl_assignment="x"), r"^variant\.rcl_assignment='x' is not one of"),
    ("blockffn-coef", lambda: BlockFFNConfig(chunk_coef=-1.0), r"variant\.chunk_coef=-1\.0 must be >= 0; 0 disables"),
    ("promoe-router", lambda: ProMoE(tiny_moe(router={"aux_loss_level": "sequence"})),
     r"^ProMoE routes by cosine to prototypes \(dropless top-k; batch-level balance loss over conditional tokens\); "
     r"set router\.aux_loss_level='batch'"),
    ("mumoe-router", lambda: MultilinearMoE(tiny_moe(router={"aux_loss_coef": 0.0, "z_loss_coef": 0.1})),
     r"^μMoE is a soft mixture trained without router losses; set router\.z_loss_coef=0\.0 \(got 0\.1\)$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_configs_name_the_field_and_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_mom_refuses_a_kv_cache_with_the_fix():
    layer = MixtureOfMemories(8, 2, 2, MoMConfig())
    with pytest.raises(ValueError, match=r"MoM attention has no KV cache; generate without one \(moekit sample "
                                         r"--no-cache\)"):
        layer(torch.randn(1, 3, 8), cache=object())


@pytest.mark.parametrize("make", [
    lambda: DuoConfig(small_hidden_dim=1),  # the smallest small module
    lambda: DuoConfig(budget_target=0.0),  # the budget may ask for no big module at all
], ids=["duo-small-1", "duo-budget-0"])
def test_boundary_configs_are_accepted(make):
    make()


# ------------------------------------------------------------------ initial scales and parameter sets

def test_switchhead_value_experts_and_selections_start_at_their_documented_scales():
    torch.manual_seed(0)
    dim = 64
    layer = SwitchHead(dim, 4, 2, SwitchHeadConfig(num_experts=4, top_k=2))
    assert abs(layer.w_v_HEDDh.std().item() * dim**0.5 - 1) < 0.1, "values ~ N(0, 1/dim)"
    for lin in (layer.w_sel_v, layer.w_sel_o):
        norms = lin.weight.norm(dim=1)
        assert_close(norms, norms.mean().expand_as(norms), "every selection row has the same norm")
        assert abs(norms.mean().item() - (dim * dim**-1.0) ** 0.5) < 0.2, "the rows' common norm is their mean"


def test_moepp_linear_gate_starts_with_std_one_over_sqrt_dim():
    torch.manual_seed(0)
    D = 256
    layer = MoEPlusPlus(tiny_moe(dim=D, hidden_dim=8), MoEPPConfig(num_zero=1, num_copy=1, num_constant=1))
    assert abs(layer.gate.weight.std().item() * D**0.5 - 1) < 0.1


def test_sparse_sigmoid_gates_drop_nothing_outside_training():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 6)
    plain = sparse_sigmoid_gates(logits, 2)
    for dropout in (0.5, 0.99):
        gates, ids = sparse_sigmoid_gates(logits, 2, dropout=dropout)  # training defaults to False
        assert torch.equal(gates, plain[0]) and torch.equal(ids, plain[1])
    gates, _ = sparse_sigmoid_gates(logits, 2, dropout=0.99, training=True)
    assert not torch.equal(gates, plain[0]), "in training the same dropout masks experts"


def test_narrow_heads_use_the_tables_first_frequencies_for_any_length():
    torch.manual_seed(0)
    for S in (1, 2, 3, 5):  # S == Dh / 2 included
        cos, sin = rope_tables(S, 16, 10000.0)  # tables for 16-wide heads: R = 8 frequencies
        x = torch.randn(1, 2, S, 4)  # 4-wide heads: the first 2 frequencies
        assert_close(apply_rope_any_width(x, cos, sin), apply_rope(x, cos[..., :2], sin[..., :2]), f"S={S}")


def test_mumoe_tr_rank_is_at_least_one_when_the_budget_is_spent():
    config = MuMoEConfig(factorization="tr", tr_rank=4)
    assert matched_rank(config, 4, 4, 64) == 1, "a dense budget below one rank still gives rank 1"
    assert matched_rank(config, 64, 128, 4) == (64 * 128 - 16 * 4) // (4 * (64 + 128 + 1))


# ------------------------------------------------------------------ statistics and losses under the layer's name

def test_smha_balance_loss_is_over_the_heads_softmax_and_keyed_by_the_layer():
    torch.manual_seed(1)
    B, S, D, H, K = 2, 5, 12, 3, 2
    layer = SelectiveMultiHeadAttention(D, H, 2, SMHAConfig(heads_per_token=K, aux_loss_coef=0.5), name="blk.attn")
    cos, sin = rope_tables(S, D // H, 10000.0)
    x = torch.randn(B, S, D)
    ctx = RoutingContext(collect_stats=True)
    layer(x, cos, sin, ctx=ctx)
    probs_TH = layer.w_gate(x).float().softmax(-1).reshape(B * S, H)  # each token's distribution over heads
    ids_TK = probs_TH.topk(K, dim=-1).indices
    assert_close(ctx.losses["smha_aux_loss"], 0.5 * load_balancing_loss(probs_TH, ids_TK), "Switch loss over heads")
    assert list(ctx.layer_losses) == ["blk.attn"] and list(ctx.stats) == ["blk.attn"]
    assert torch.equal(ctx.stats["blk.attn"].counts_E, torch.bincount(ids_TK.flatten(), minlength=H))


def test_mom_balance_loss_with_two_memories_is_keyed_by_the_layer():
    torch.manual_seed(2)
    layer = MixtureOfMemories(8, 2, 2, MoMConfig(num_memories=2, top_k=1, aux_loss_coef=0.1), name="blk.mom")
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(2, 6, 8), ctx=ctx)
    assert "mom_aux_loss" in ctx.losses, "two memories are balanced"
    assert list(ctx.layer_losses) == ["blk.mom"] and list(ctx.stats) == ["blk.mom"]


def test_mod_default_name_keys_its_statistics():
    mod = MixtureOfDepths(8, MoDConfig(capacity=0.5))
    assert mod.name == "mod"
    ctx = RoutingContext(collect_stats=True)
    mod(torch.randn(2, 4, 8), lambda h, c: h + 1.0, ctx)
    assert list(ctx.stats) == ["mod"]


def test_routing_attention_accumulates_micro_batches_like_one_batch():
    cos, sin = rope_tables(8, 8, 10000.0)
    torch.manual_seed(3)
    x1, x2 = torch.randn(1, 8, 16), torch.randn(2, 8, 16)
    layers = []
    for _ in range(2):
        torch.manual_seed(4)
        layers.append(RoutingAttention(16, 2, 1, 8, RoutingAttentionConfig(num_clusters=2, ema_decay=0.5)).train())
    split, whole = layers
    split(x1, cos, sin)
    split(x2, cos, sin)
    whole(torch.cat([x1, x2]), cos, sin)
    split.on_step(1)
    whole.on_step(1)
    assert_close(split.centroids_HCd, whole.centroids_HCd, "two micro-batches then one step = one batch")


# ------------------------------------------------------------------ Duo

def test_duo_big_module_uses_the_layers_activation_and_counts_its_router():
    torch.manual_seed(5)
    moe = tiny_moe(num_experts=1, top_k=1, activation="gelu")
    layer = DuoFFN(moe, DuoConfig(small_hidden_dim=3))
    x = torch.randn(4, 8)
    big = layer.big
    assert_close(big(x), (F.gelu(x @ big.w_up.T)) @ big.w_down.T, "the big FFN is the layer's GELU FFN")
    plain = DuoFFN(tiny_moe(num_experts=1, top_k=1, activation="relu"), DuoConfig(small_hidden_dim=3))
    plain.big.load_state_dict(big.state_dict())
    assert not torch.allclose(plain.big(x), big(x)), "the activation is the layer's, not a default"
    routed = DuoFFN(moe, DuoConfig(small_hidden_dim=3, routing="router"))
    assert routed.router is not None
    assert routed.active_params() == layer.active_params() + routed.router.weight.numel()

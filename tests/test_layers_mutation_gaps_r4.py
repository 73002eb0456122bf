"""Behaviours of the layer variants and attention modules that the round-4 mutation samples (issue 11) found
unchecked: the seed-5 sample's last live mutants (MoD's block context, MoE++'s active parameters, BlockFFN's
trend window, TR-μMoE's core init), then the survivors of the fresh samples (seeds 6 and up). Each test checks a
behaviour, not the mutated line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.layers import build_ffn
from moekit.layers.attention import rope_tables
from moekit.layers.attention.mom import MixtureOfMemories, MoMConfig
from moekit.layers.attention.registry import ATTENTION_PROBS_KEY, build_attention
from moekit.layers.attention.routing_attention import RoutingAttention, RoutingAttentionConfig
from moekit.layers.attention.smha import SelectiveMultiHeadAttention, SMHAConfig
from moekit.layers.attention.switchhead import (
    SwitchHead,
    SwitchHeadConfig,
    selection_entropy_loss,
    sparse_sigmoid_gates,
)
from moekit.layers.step_hook import next_token_ce, training_step_hook
from moekit.layers.variants._common import flatten
from moekit.layers.variants.blockffn import BlockFFN, BlockFFNConfig
from moekit.layers.variants.coe import ChainOfExperts
from moekit.layers.variants.drllm import PATH_KEY as DRLLM_PATH_KEY
from moekit.layers.variants.drllm import DrLLMConfig, LayerPathRouters, search_paths
from moekit.layers.variants.duo import ROUTES_KEY, DuoConfig, DuoFFN
from moekit.layers.variants.ftp import (
    KEEP_KEY,
    STATIC_KEY,
    FTPConfig,
    TokenPruner,
    attention_received,
    static_keep,
)
from moekit.layers.variants.gmoe import GMoEConfig, GraphOfTokensMoE
from moekit.layers.variants.mod import POSITIONS_KEY, MixtureOfDepths, MoDConfig
from moekit.layers.variants.moepp import STATE_KEY as MOEPP_STATE_KEY
from moekit.layers.variants.moepp import MoEPlusPlus, MoEPPConfig
from moekit.layers.variants.mofme import MoFME
from moekit.layers.variants.moma import MoMa, MoMaConfig
from moekit.layers.variants.mor import KV_SHARE_KEY, MixtureOfRecursions, MoRConfig, _run_active
from moekit.layers.variants.mumoe import CPMultilinear, MultilinearMoE, MuMoEConfig, TRMultilinear, matched_rank
from moekit.layers.variants.pr_moe import ResidualMoE, ResidualMoEConfig
from moekit.layers.variants.promoe import UNCONDITIONAL_KEY, ProMoE, ProMoEConfig
from moekit.layers.variants.readme import ReadMEConfig, ReadMEMoE, ReadMEPlanner
from moekit.layers.variants.readme import _rope as _readme_rope
from moekit.layers.variants.smoe_dropout import SMoEDropout, SMoEDropoutConfig, k_schedule
from moekit.layers.variants.supernet import ARCH_KEY, SupernetConfig, SupernetFFN
from moekit.layers.variants.thor import THOR, THORConfig, consistency_loss
from moekit.layers.variants.topp import TopPConfig, TopPMoE
from moekit.layers.variants.uoe import UnionOfMLPExperts, UoMEConfig
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.routing import load_balancing_loss, z_loss
from moekit.training import with_overrides
from moekit.types import MODALITY_KEY

from .reference import assert_close
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


# ------------------------------------------------------------------ seed 6's live survivors


def test_smha_gate_and_cp_output_factor_start_at_their_documented_scales():
    torch.manual_seed(10)
    smha = SelectiveMultiHeadAttention(64, 4, 1, SMHAConfig())
    assert abs(smha.w_gate.weight.std().item() * 64**0.5 - 1) < 0.2, "head gate N(0, 1/D)"
    cp = CPMultilinear(4, 8, 64, 16)  # u_out [O=64, R=16] ~ U(+-1/sqrt(R))
    bound = 16**-0.5
    assert cp.u_out.abs().max() <= bound and cp.u_out.min() < -0.5 * bound and cp.u_out.max() > 0.5 * bound


def test_switchhead_selection_entropy_loss_is_log_e_minus_the_mean_selection_entropy():
    uniform = torch.zeros(5, 3)  # 5 tokens, 3 experts: a uniform mean selection has no loss
    assert abs(float(selection_entropy_loss(uniform))) < 1e-6
    logits = torch.tensor([[4.0, 0.0, 0.0], [3.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    mean = logits.softmax(-1).mean(0)
    expected = math.log(3) + (mean * mean.log()).sum()
    assert abs(float(selection_entropy_loss(logits)) - float(expected)) < 1e-6


def test_boundary_settings_are_accepted():
    SupernetConfig(router_hidden=1)
    build_ffn("supernet", tiny_moe(num_experts=1, top_k=1), {"router_hidden": 1}, layer_index=0, num_layers=2,
              name="s")
    for coef in (0.01, 0.0):  # 0 disables the BCE router loss
        torch.manual_seed(12)
        mor = MixtureOfRecursions(8, MoRConfig(aux_coef=coef)).train()
        ctx = RoutingContext()
        mor(torch.randn(1, 4, 8), lambda h, c: h, ctx)
        assert ("mor_router_loss" in ctx.losses) == (coef > 0), sorted(ctx.losses)


def test_error_texts_of_mor_and_the_readme_planner_name_the_fix():
    with pytest.raises(ConfigError, match=r"^variant\.capacities and variant\.cap_warmup_steps are for "
                                          r"routing='expert_choice' \(token choice sets each token's depth\); "
                                          r"remove them or use expert choice$"):
        MoRConfig(routing="token_choice", cap_warmup_steps=3)
    with pytest.raises(ConfigError, match=r"^the Read-ME planner plans a dropless softmax top-k; set "
                                          r"router\.capacity_factor=None \(got 1\.0\)$"):
        ReadMEPlanner(tiny_moe(router={"capacity_factor": 1.0}), ReadMEConfig())


def test_mor_recursion_with_no_active_token_does_not_run_the_block():
    calls = []
    h = torch.randn(2, 4, 8)
    out = _run_active(h, torch.zeros(2, 4, dtype=torch.bool), torch.ones(2, 4), lambda x, c: calls.append(x) or x,
                      None, None)
    assert calls == [] and torch.equal(out, h), "no sequence has an active token: nothing runs"


def test_moepp_adds_its_shared_expert_and_reports_shares_of_one_kept_slot():
    torch.manual_seed(11)
    layer = MoEPlusPlus(tiny_moe(num_shared_experts=1), MoEPPConfig(capacity_factor=None)).eval()
    x = torch.randn(5, 8)
    y = layer(x)
    shared = layer.shared_experts(x)
    layer.shared_experts = None
    assert_close(y, layer(x) + shared, "routed experts + the always-on shared expert")
    # one token, one slot, routed to the zero expert: every kept slot is a zero-computation one
    one = MoEPlusPlus(tiny_moe(top_k=1), MoEPPConfig(capacity_factor=None, gating_residual=False), name="pp")
    x1 = torch.randn(1, 8)
    with torch.no_grad():
        one.gate.weight.zero_()
        one.gate.weight[one.zero_ids.start] = 10 * x1[0]
    ctx = RoutingContext(collect_stats=True)
    out = one(x1, ctx)
    assert torch.equal(out, torch.zeros_like(out)), "the zero expert outputs nothing"
    extra = ctx.stats["pp"].extra
    assert float(extra["zc_share"]) == 1.0 and float(extra["zero_share"]) == 1.0


def test_promoe_repr_shows_its_settings():
    layer = ProMoE(tiny_moe(), ProMoEConfig(gate="softmax", rcl_coef=0.5, rcl_temperature=0.07))
    assert "gate=softmax, unconditional_expert=True, rcl_coef=0.5, rcl_temperature=0.07" in repr(layer)


# ------------------------------------------------------------------ seed 7's live survivors


def test_zero_coefficients_add_no_loss_and_losses_are_keyed_by_the_layer():
    torch.manual_seed(20)
    x = torch.randn(1, 4, 8)
    cos, sin = rope_tables(4, 4, 10000.0)
    for coef in (0.0, 0.1):
        ctx = RoutingContext()
        SelectiveMultiHeadAttention(8, 2, 1, SMHAConfig(aux_loss_coef=coef), name="a")(x, cos, sin, ctx=ctx)
        assert ("smha_aux_loss" in ctx.losses) == (coef > 0), sorted(ctx.losses)
    ctx = RoutingContext()
    TopPMoE(tiny_moe(router={"aux_loss_coef": 0.1}), TopPConfig(threshold=0.5), name="tp")(x, ctx)
    assert "aux_loss" in ctx.layer_losses["tp"], "TopP's balance loss under the layer's name"


BAD_R4 = [
    ("ra-clusters", lambda: RoutingAttentionConfig(num_clusters=0),
     r"^attention_options\.num_clusters=0 must be a positive integer or left out \(sqrt\(context\)\)$"),
    ("ra-window", lambda: RoutingAttentionConfig(local_window=0),
     r"^attention_options\.local_window=0 must be a positive integer$"),
    ("duo-budget", lambda: DuoConfig(budget_target=1.5), r"^variant\.budget_target=1\.5 must be in \[0, 1\]$"),
    ("supernet-granularity", lambda: SupernetConfig(granularity="x"),
     r"^variant\.granularity='x' is not one of \['layer', 'neuron'\]"),
    ("supernet-hidden", lambda: SupernetConfig(router_hidden=0),
     r"^variant\.router_hidden=0 must be a positive integer$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_R4], ids=[b[0] for b in BAD_R4])
def test_bad_configs_name_the_field_and_the_fix_r4(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_routing_attention_centroids_start_on_the_sphere_of_radius_sqrt_head_dim():
    torch.manual_seed(21)
    layer = RoutingAttention(16, 2, 1, 16, RoutingAttentionConfig(num_clusters=3))
    norms = layer.centroids_HCd.norm(dim=-1)
    assert_close(norms, torch.full_like(norms, layer.head_dim**0.5), "each centroid has norm sqrt(d)")


def test_duo_forced_route_as_a_zero_dimensional_tensor_is_the_same_as_an_int():
    torch.manual_seed(22)
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3), name="l").eval()
    x = torch.randn(5, 8)
    outs = []
    for route in (1, torch.tensor(1)):
        ctx = RoutingContext()
        ctx.state[ROUTES_KEY] = {"l": route}
        outs.append(layer(x, ctx))
    assert torch.equal(outs[0], outs[1])


def test_coe_experts_use_the_configured_activation_and_count_integers():
    torch.manual_seed(23)
    layer = ChainOfExperts(tiny_moe(activation="gelu"))
    assert layer.experts.w_gate is None, "GELU experts are not gated"
    x = torch.randn(3, 8)
    expected = F.linear(F.gelu(F.linear(x, layer.experts.w_up[1])), layer.experts.w_down[1])
    assert_close(layer.experts.expert(x, 1), expected, "a GELU expert")
    assert isinstance(layer.active_params(), int)


def test_moma_modality_without_tokens_does_not_stop_the_later_ones():
    torch.manual_seed(24)
    layer = MoMa(tiny_moe(num_experts=4, top_k=1), MoMaConfig(num_modalities=2, routing="topk")).eval()
    x = torch.randn(1, 5, 8)
    only_image = RoutingContext()
    only_image.state[MODALITY_KEY] = torch.ones(1, 5, dtype=torch.long)
    mixed = RoutingContext()
    mixed.state[MODALITY_KEY] = torch.tensor([[1, 1, 1, 1, 1, 0]])
    y = layer(x, only_image)
    y_mixed = layer(torch.cat([x, torch.randn(1, 1, 8)], 1), mixed)
    assert y.abs().sum() > 0 and torch.equal(y, y_mixed[:, :5])


def test_moepp_keeps_raw_probabilities_without_top_k_renormalisation():
    torch.manual_seed(25)
    layer = MoEPlusPlus(tiny_moe(router={"norm_topk_prob": False}), MoEPPConfig(capacity_factor=None,
                                                                               gating_residual=False))
    x = torch.randn(6, 8)
    r = layer.route(x)
    assert_close(r.weights_TK, r.scores_TE.gather(1, r.expert_ids_TK), "the chosen softmax probabilities")
    assert (r.weights_TK.sum(-1) < 1 - 1e-3).all()


def test_uoe_sequence_level_routing_treats_flat_tokens_as_one_sequence():
    torch.manual_seed(26)
    layer = UnionOfMLPExperts(tiny_moe(router={"aux_loss_coef": 0.0}), UoMEConfig(level="sequence"))
    x = torch.randn(5, 8)
    assert_close(layer(x), layer(x[None])[0], "[T, D] = one sequence of T tokens")


def test_promoe_balance_loss_with_a_single_conditional_token():
    torch.manual_seed(27)
    layer = ProMoE(tiny_moe(router={"aux_loss_coef": 0.2}), ProMoEConfig())
    x = torch.randn(4, 8)
    flag = torch.tensor([True, False, True, True])
    ctx = RoutingContext()
    ctx.state[UNCONDITIONAL_KEY] = flag
    layer(x, ctx)
    probs = (F.normalize(x, dim=-1) @ F.normalize(layer.prototypes, dim=-1).t()).softmax(-1)
    ids = probs.topk(2, -1).indices
    assert_close(ctx.losses["aux_loss"], 0.2 * load_balancing_loss(probs[~flag], ids[~flag]),
                 "the balance loss over the one conditional token")


def test_drllm_blocks_receive_the_callers_context():
    torch.manual_seed(28)
    routers = LayerPathRouters(8, 2, DrLLMConfig()).train()
    ctx = RoutingContext()
    seen = []
    blocks = [lambda h, c: seen.append(c) or h + 1.0 for _ in range(2)]
    routers(torch.randn(2, 3, 8), blocks, ctx)
    assert len(seen) >= 2 and all(c is ctx for c in seen)


def test_mumoe_matched_rank_floor_is_one():
    assert matched_rank(MuMoEConfig(), 1, 1, 4) == 1  # 1 * 1 // (4 + 1 + 1 + 1) = 0 -> at least rank 1
    assert matched_rank(MuMoEConfig(), 2, 3, 1) == 1  # 6 // 7 = 0
    assert matched_rank(MuMoEConfig(), 8, 12, 4) == 96 // 25


# ------------------------------------------------------------------ seed 8's live survivors


BAD_R4_SEED8 = [
    ("moma-routing", lambda: MoMaConfig(routing="x"),
     r"^variant\.routing='x' is not one of \['expert_choice', 'topk'\]"),
    ("moma-groups", lambda: MoMa(tiny_moe(num_experts=5), MoMaConfig(num_modalities=2)),
     r"^moe\.num_experts=5 is not divisible by variant\.num_modalities=2; use a multiple of 2 experts \(e\.g\. 4\) "
     r"so every modality gets an equal group$"),
    ("prmoe-residual", lambda: ResidualMoEConfig(residual="x"),
     r"^variant\.residual='x' is not one of \['paper', 'deepspeed'\]"),
    ("ftp-router", lambda: FTPConfig(router="x"), r"^model\.depth_routing\.router='x' must be 'learned' or 'static'$"),
    ("switchhead-heads", lambda: SwitchHeadConfig(num_heads=0),
     r"^attention_options\.num_heads=0 must be a positive integer or left out \(the model's\)$"),
    ("switchhead-head-dim", lambda: SwitchHeadConfig(head_dim=0),
     r"^attention_options\.head_dim=0 must be a positive integer or left out \(the model's\)$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_R4_SEED8], ids=[b[0] for b in BAD_R4_SEED8])
def test_bad_configs_name_the_field_and_the_fix_seed8(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_smha_refuses_a_kv_cache_with_the_fix():
    cos, sin = rope_tables(4, 2, 10000.0)
    with pytest.raises(ValueError, match=r"^SMHA attention has no KV cache; generate without one "
                                         r"\(moekit sample --no-cache\)$"):
        SelectiveMultiHeadAttention(8, 2, 1)(torch.randn(1, 4, 8), cos, sin, cache=object())


def test_routing_attention_and_rmoe_losses_are_keyed_by_the_layer():
    torch.manual_seed(30)
    layer = RoutingAttention(16, 2, 1, 8, RoutingAttentionConfig(num_clusters=2, commitment_coef=0.5),
                             name="ra").train()
    cos, sin = rope_tables(8, 8, 10000.0)
    ctx = RoutingContext()
    layer(torch.randn(1, 8, 16), cos, sin, ctx=ctx)
    assert "routing_commitment_loss" in ctx.layer_losses["ra"]
    for scope in ("concat", "layer"):
        rmoe = build_ffn("rmoe", tiny_moe(router={"aux_loss_coef": 0.1}), {"rnn_dim": 6, "aux_scope": scope},
                         layer_index=0, num_layers=1, name="r")
        ctx = RoutingContext()
        rmoe(torch.randn(5, 8), ctx)
        assert "aux_loss" in ctx.layer_losses["r"], scope


def test_ftp_guide_loss_with_one_routed_block_is_its_bce():
    cfg = with_overrides(load_preset("ftp"), {"model.dim": "16", "model.num_heads": "2", "model.context": "8",
                                              "model.num_layers": "2", "model.dense_hidden_dim": "32"})
    torch.manual_seed(0)
    model = LanguageModel(cfg.model.replace(depth_routing={**cfg.model.depth_routing, "sparsity": [0.0, 0.5]}))
    torch.manual_seed(7)
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    out = training_step_hook(model.train())(lambda ctx: model(x, ctx), y, False)
    keeps, statics = out.ctx.state[KEEP_KEY], out.ctx.state[STATIC_KEY]
    assert_close(out.ctx.losses["ftp_guide_loss"], F.binary_cross_entropy(keeps[1], statics[1]),
                 "one routed block: the mean over routed blocks is its BCE")
    assert_close(out.ctx.losses["ftp_sparsity_loss"], (1 - keeps[1].mean() - 0.5) ** 2, "its sparsity term")


def test_supernet_reports_the_mean_largest_mixture_weight_under_its_default_name():
    torch.manual_seed(31)
    layer = SupernetFFN(tiny_moe(num_experts=1, top_k=1), SupernetConfig(), num_layers=2, layer_index=1)
    ctx = RoutingContext(collect_stats=True)
    arch = (0.5, 1.0)
    ctx.state[ARCH_KEY] = arch
    layer(torch.randn(3, 8), ctx)
    extra = ctx.stats["supernet"].extra
    assert_close(torch.as_tensor(extra["alpha_max"]), layer.mixture(arch).max(0).values.mean(), "mean max alpha")
    assert extra["width"] == float(layer.width(1.0))


def test_mod_router_and_tr_output_core_start_at_their_scales():
    torch.manual_seed(32)
    mod = MixtureOfDepths(256)
    assert abs(mod.router.weight.std().item() * 16 - 1) < 0.2, "MoD router N(0, 1/D)"
    tr = TRMultilinear(2, 4, 64, 2, 2, 4)  # G_O [r3=4, O=64, r1=2] ~ U(+-1/sqrt(r3 r1))
    bound = 8**-0.5
    assert tr.g_out.abs().max() <= bound and tr.g_out.max() > 0.5 * bound and tr.g_out.min() < -0.5 * bound


def test_mor_skips_sequences_without_active_tokens_and_reports_zero_for_unreached_steps():
    calls = []
    h = torch.randn(2, 4, 8)
    active = torch.tensor([[True, False, True, False], [False] * 4])
    _run_active(h, active, torch.ones(2, 4), lambda x, c: calls.append(x.shape) or x, None, None)
    assert calls == [(1, 2, 8)], "only the sequence with active tokens runs"
    torch.manual_seed(33)
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3), name="m").eval()
    with torch.no_grad():
        for router in mor.routers:
            router.weight.fill_(-1.0)  # every threshold decision says no after the first (full) step
    ctx = RoutingContext(collect_stats=True)
    mor(torch.ones(1, 4, 8), lambda x, c: torch.zeros_like(x), ctx)
    extra = ctx.stats["m"].extra
    assert float(extra["fraction_processed"]) == pytest.approx(1 / 3), "steps 1 and 2 process no token"
    assert float(extra["mean_depth"]) == pytest.approx(1.0)


def test_topp_sequence_level_balance_loss_averages_over_sequences_and_flat_input_is_one_sequence():
    torch.manual_seed(34)
    layer = TopPMoE(tiny_moe(router={"aux_loss_coef": 0.1, "aux_loss_level": "sequence"}), TopPConfig(threshold=0.6))
    x = torch.randn(2, 4, 8)
    x[1] = x[1] * 3 + 1  # the two sequences route differently
    ctx = RoutingContext()
    layer(x, ctx)
    r = layer.route(x.reshape(-1, 8))
    per_sequence = [load_balancing_loss(r.scores_TE[s:s + 4], r.expert_ids_TK[s:s + 4]) for s in (0, 4)]
    assert_close(ctx.losses["aux_loss"], 0.1 * (per_sequence[0] + per_sequence[1]) / 2, "mean over sequences")
    whole = load_balancing_loss(r.scores_TE, r.expert_ids_TK)
    gap = (whole - (per_sequence[0] + per_sequence[1]) / 2).detach()
    assert abs(float(gap)) > 1e-4, "the test needs distinct sequences"
    assert flatten(torch.randn(5, 8), 8)[1] == 1 and flatten(torch.randn(3, 5, 8), 8)[1] == 3
    ctx = RoutingContext()
    layer(x[0], ctx)
    assert_close(ctx.losses["aux_loss"], 0.1 * per_sequence[0], "[T, D] input is one sequence")


# ------------------------------------------------------------------ seed 9's live survivors (a sample drawn after
# the tests above)


def test_mom_and_routing_attention_weights_start_at_their_documented_scales():
    torch.manual_seed(40)
    dim = 64
    mom = MixtureOfMemories(dim, 4, 2, MoMConfig())
    for name, w in (("w_k", mom.w_k_NDD), ("router", mom.w_router.weight), ("q", mom.w_q.weight),
                    ("z", mom.w_z.weight)):
        assert abs(w.std().item() * dim**0.5 - 1) < 0.2, f"MoM {name}: N(0, 1/D)"
    ra = RoutingAttention(dim, 2, 1, 16, RoutingAttentionConfig(num_clusters=2))
    expected = dim**-0.5 / 2**0.5  # GPT-2's residual scaling 1 / sqrt(2 L) with L = 1
    assert abs(ra.w_out.weight.std().item() / expected - 1) < 0.1


def test_routing_attention_boundary_settings_are_accepted():
    cfg = RoutingAttentionConfig(local_window=1, ema_decay=0.0)  # a window of itself only; no moving average
    torch.manual_seed(41)
    layer = RoutingAttention(16, 2, 1, 8, cfg)
    cos, sin = rope_tables(8, 8, 10000.0)
    assert torch.isfinite(layer(torch.randn(1, 8, 16), cos, sin)).all()


def test_readme_planner_rotary_uses_the_frequencies_10000_to_the_minus_2i_over_d():
    torch.manual_seed(42)
    q = torch.randn(1, 1, 5, 6)  # d = 6: pairs (i, i + 3) rotated by s * 10000^(-2i/6), i = 0, 1, 2
    out = _readme_rope(q)
    for s in range(5):
        for i in range(3):
            a = s * 10000.0 ** (-2 * i / 6)
            x0, x1 = q[0, 0, s, i], q[0, 0, s, i + 3]
            assert_close(out[0, 0, s, i], x0 * math.cos(a) - x1 * math.sin(a), f"position {s} pair {i}")
            assert_close(out[0, 0, s, i + 3], x1 * math.cos(a) + x0 * math.sin(a), f"position {s} pair {i}")


def test_thor_evaluation_routes_are_drawn_from_the_given_generator():
    x = torch.randn(8, 3, 8)
    for level, shape in ((1, (8, 1)), (0, (24,))):
        layer = THOR(tiny_moe(top_k=1), THORConfig(eval_level=level)).eval()
        torch.manual_seed(43)  # the global generator must not matter
        ids = layer.route(x, torch.Generator().manual_seed(5)).expert_ids_TK[:, 0]
        expected = torch.randint(4, shape, generator=torch.Generator().manual_seed(5))
        assert torch.equal(ids, expected.expand(8, 3).reshape(-1) if level == 1 else expected), level


def test_moma_groups_record_their_losses_in_the_callers_context():
    torch.manual_seed(44)
    layer = MoMa(tiny_moe(num_experts=4, top_k=1, router={"aux_loss_coef": 0.1}),
                 MoMaConfig(num_modalities=2, routing="topk"), name="mm")
    ctx = RoutingContext()
    ctx.state[MODALITY_KEY] = torch.tensor([[0, 1, 0, 1, 1]])
    layer(torch.randn(1, 5, 8), ctx)
    assert "aux_loss" in ctx.layer_losses["mm.m0"] and "aux_loss" in ctx.layer_losses["mm.m1"]


def test_residual_moe_builder_applies_its_options():
    moe = tiny_moe()
    x = torch.randn(5, 8)
    torch.manual_seed(45)
    built = build_ffn("residual-moe", moe, {"residual": "deepspeed"}, layer_index=0, num_layers=1, name="r")
    torch.manual_seed(45)
    direct = ResidualMoE(moe, ResidualMoEConfig(residual="deepspeed"), name="r")
    assert_close(built(x), direct(x), "the builder passes residual='deepspeed' on")
    torch.manual_seed(45)
    paper = ResidualMoE(moe, ResidualMoEConfig(), name="r")
    assert not torch.allclose(paper(x), direct(x)), "the two residual forms differ"


def test_moepp_gating_residual_has_no_bias_and_losses_are_keyed_by_the_layer():
    torch.manual_seed(46)
    layer = MoEPlusPlus(tiny_moe(router={"z_loss_coef": 0.1}), MoEPPConfig(), name="pp")
    x = torch.randn(5, 8)
    ctx = RoutingContext()
    ctx.state[MOEPP_STATE_KEY] = torch.zeros(5, layer.pool)
    assert_close(layer.logits(x, ctx), layer.logits(x, None), "W_g applied to zero logits adds nothing")
    ctx = RoutingContext()
    layer(x, ctx)
    assert "z_loss" in ctx.layer_losses["pp"]
    topp = TopPMoE(tiny_moe(router={"aux_loss_coef": 0.0}), TopPConfig(threshold=0.5, entropy_coef=0.1), name="tp")
    ctx = RoutingContext()
    topp(x, ctx)
    assert "topp_entropy_loss" in ctx.layer_losses["tp"]


def test_promoe_rcl_coefficient_zero_adds_no_loss():
    torch.manual_seed(47)
    for coef in (0.0, 0.5):
        ctx = RoutingContext()
        ProMoE(tiny_moe(), ProMoEConfig(rcl_coef=coef))(torch.randn(5, 8), ctx)
        assert ("promoe_rcl_loss" in ctx.losses) == (coef > 0), sorted(ctx.losses)


def test_smoe_dropout_cosine_schedule_grows_slower_at_first_and_faster_late():
    # frac 0.2: linear round(3 * 0.2) = 1 -> k = 2; cosine (1 - cos(0.2 pi)) / 2 = 0.095 -> round(0.29) = 0 -> k = 1
    assert k_schedule(2, 1, 4, 10, "linear") == 2 and k_schedule(2, 1, 4, 10, "cosine") == 1
    # frac 0.8: linear round(2.4) = 2 -> k = 3; cosine (1 - cos(0.8 pi)) / 2 = 0.905 -> round(2.71) = 3 -> k = 4
    assert k_schedule(8, 1, 4, 10, "linear") == 3 and k_schedule(8, 1, 4, 10, "cosine") == 4
    assert k_schedule(0, 1, 4, 10, "cosine") == 1 and k_schedule(10, 1, 4, 10, "cosine") == 4


def test_topp_batch_level_balance_loss_pools_the_sequences():
    torch.manual_seed(48)
    layer = TopPMoE(tiny_moe(router={"aux_loss_coef": 0.1, "aux_loss_level": "batch"}), TopPConfig(threshold=0.6))
    x = torch.randn(2, 4, 8)
    x[1] = x[1] * 3 + 1
    ctx = RoutingContext()
    layer(x, ctx)
    r = layer.route(x.reshape(-1, 8))
    pooled = load_balancing_loss(r.scores_TE, r.expert_ids_TK)
    assert_close(ctx.losses["aux_loss"], 0.1 * pooled, "one loss over both sequences' tokens")
    assert abs(float((pooled - load_balancing_loss(r.scores_TE, r.expert_ids_TK, 2)).detach())) > 1e-4


# ------------------------------------------------------------------ seed 10's live survivors (drawn with seed 9 on
# the same suite)


BAD_R4_SEED10 = [
    ("duo-budget-coef", lambda: DuoConfig(budget_coef=-1.0), r"^variant\.budget_coef=-1\.0 must be >= 0$"),
    ("promoe-rcl-temperature", lambda: ProMoEConfig(rcl_temperature=0.0),
     r"^variant\.rcl_temperature=0\.0 must be positive \(0\.1\)$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_R4_SEED10], ids=[b[0] for b in BAD_R4_SEED10])
def test_bad_configs_name_the_field_and_the_fix_seed10(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_zero_coefficients_are_accepted_as_off():
    FTPConfig(guide_coef=0.0, sparsity_coef=0.0, distill_coef=0.0)
    torch.manual_seed(50)
    ctx = RoutingContext()
    TopPMoE(tiny_moe(router={"aux_loss_coef": 0.0}), TopPConfig(threshold=0.5, entropy_coef=0.0))(torch.randn(4, 8),
                                                                                                  ctx)
    assert "topp_entropy_loss" not in ctx.losses


def test_moma_modality_error_names_the_number_of_boundaries():
    layer = MoMa(tiny_moe(num_experts=6), MoMaConfig(num_modalities=3), name="mm")
    ctx = RoutingContext()
    ctx.state[MODALITY_KEY] = torch.tensor([[0, 3]])
    with pytest.raises(ValueError, match=r"^mm: modality id 3 is outside 0\.\.2; make model\.modality_starts list 2 "
                                         r"boundaries \(\[\] for one modality\), or set variant\.num_modalities"):
        layer(torch.randn(1, 2, 8), ctx)


def test_moma_expert_choice_groups_carry_no_token_choice_balance_loss():
    torch.manual_seed(51)
    layer = MoMa(tiny_moe(num_experts=4, router={"aux_loss_coef": 0.1}), MoMaConfig(num_modalities=2)).train()
    ctx = RoutingContext()
    ctx.state[MODALITY_KEY] = torch.tensor([[0, 1, 0, 1, 1, 0]])
    layer(torch.randn(1, 6, 8), ctx)
    assert "aux_loss" not in ctx.losses and "moma_aux_router" in ctx.losses, sorted(ctx.losses)


def test_readme_soft_plan_weights_are_renormalised_over_the_top_k():
    torch.manual_seed(52)
    planner = ReadMEPlanner(tiny_moe(router={"aux_loss_coef": 0.0}), ReadMEConfig(weights="soft"))
    plan = planner(torch.randn(1, 5, 8))
    assert_close(plan.weights_LTK.sum(-1), torch.ones_like(plan.weights_LTK[..., 0]), "top-2 weights sum to 1")


def test_thor_step_adds_both_passes_auxiliary_losses():
    torch.manual_seed(53)
    layer = THOR(tiny_moe(top_k=1), THORConfig(consistency_coef=3.0), name="l")
    moe = build_ffn("moe", tiny_moe(router={"aux_loss_coef": 0.5}), {}, layer_index=1, num_layers=2, name="m")
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "moe": moe, "head": head}).train()
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))
    seen = []

    def forward(ctx):
        logits = head(moe(layer(x, ctx), ctx))
        seen.append((logits, ctx.total_loss()))
        return logits, ctx

    out = training_step_hook(model)(forward, targets, False)
    (l1, a1), (l2, a2) = seen
    assert float(a1.detach()) > 0 and float(a2.detach()) > 0
    expected = (next_token_ce(l1, targets) + next_token_ce(l2, targets) + a1 + a2
                + 3.0 / targets.numel() * consistency_loss(l1, l2))
    assert_close(out.loss, expected, "CE1 + CE2 + aux1 + aux2 + alpha / N * consistency")


def test_mor_token_choice_balances_two_recursions():
    torch.manual_seed(54)
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=2, routing="token_choice", balance_coef=0.1)).train()
    ctx = RoutingContext()
    mor(torch.randn(2, 4, 8), lambda h, c: h, ctx)
    assert "mor_balance_loss" in ctx.losses


def test_moepp_zero_computation_share_counts_the_first_constant_expert():
    one = MoEPlusPlus(tiny_moe(top_k=1), MoEPPConfig(capacity_factor=None, gating_residual=False), name="pp")
    x1 = torch.randn(1, 8)
    with torch.no_grad():
        one.gate.weight.zero_()
        one.gate.weight[one.constant_ids.start] = 10 * x1[0]  # id num_ffn: the first zero-computation expert
    ctx = RoutingContext(collect_stats=True)
    one(x1, ctx)
    assert float(ctx.stats["pp"].extra["zc_share"]) == 1.0 and float(ctx.stats["pp"].extra["zero_share"]) == 0.0


def test_drllm_statistics_count_skipped_layers_and_searches_refuse_beyond_max_paths():
    routers = LayerPathRouters(8, 3, DrLLMConfig(), name="d")
    ctx = RoutingContext(collect_stats=True)
    ctx.state[DRLLM_PATH_KEY] = torch.tensor([[0, 1, 2], [0, 0, 0]])  # skips 1 and 3 layers, executes 3 and 0
    routers(torch.randn(2, 3, 8), [lambda h, c: h + 1.0] * 3, ctx)
    extra = ctx.stats["d"].extra
    assert float(extra["layers_skipped"]) == pytest.approx(2.0) and float(extra["layers_executed"]) == 1.5
    cfg = with_overrides(load_preset("drllm"), {"model.dim": "16", "model.num_heads": "2", "model.context": "8",
                                                "model.num_layers": "2", "model.dense_hidden_dim": "32",
                                                "model.depth_routing.max_paths": "8"})
    torch.manual_seed(55)
    model = LanguageModel(cfg.model).train()
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    with pytest.raises(ConfigError, match=r"^9 layer paths exceed model\.depth_routing\.max_paths=8"):
        training_step_hook(model)(lambda ctx: model(x, ctx), y, False)


def test_mumoe_with_one_expert_reports_zero_token_entropy():
    torch.manual_seed(56)
    layer = MultilinearMoE(tiny_moe(num_experts=1, top_k=1, router={"aux_loss_coef": 0.0}), MuMoEConfig(),
                           name="mu")
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(3, 8), ctx)
    assert float(ctx.stats["mu"].token_entropy) == 0.0


def test_hierarchical_mumoe_second_gate_norm_has_no_affine_parameters():
    layer = MultilinearMoE(tiny_moe(router={"aux_loss_coef": 0.0}), MuMoEConfig(hierarchy_experts=3))
    assert not any(n.startswith(("gate_norm.", "gate_norm2.")) for n, _ in layer.named_parameters())


def test_moepp_second_layer_trains_every_parameter_it_has():
    torch.manual_seed(57)
    layers = [MoEPlusPlus(tiny_moe(), MoEPPConfig(capacity_factor=None), name=f"pp{i}") for i in range(2)]
    ctx = RoutingContext()
    x = torch.randn(6, 8)
    y = layers[1](layers[0](x, ctx), ctx)  # the second layer adds W_g z of the first layer's logits
    (y.square().sum() + ctx.total_loss()).backward()
    dead = [n for n, p in layers[1].named_parameters() if p.grad is None and not n.startswith("experts.")]
    assert dead == [], f"parameters that nothing trains: {dead}"


# ------------------------------------------------------------------ seed 11's live survivors (a sample drawn after
# every test above up to seed 10)


def test_attention_and_selector_linears_are_bias_free():
    D, H = 8, 2
    smha = SelectiveMultiHeadAttention(D, H, 1)
    assert sum(p.numel() for p in smha.parameters()) == H * D + 3 * D * D + D * D, "gate, qkv and output: no bias"
    sh = SwitchHead(D, H, 1, SwitchHeadConfig())
    E, Dh = sh.num_experts, sh.head_dim
    expected = 2 * H * E * D * Dh + 2 * D * H * Dh + 2 * D * H * E  # values, outputs, q, k, two selectors
    assert sum(p.numel() for p in sh.parameters()) == expected
    uoe = UnionOfMLPExperts(tiny_moe())
    assert sum(p.numel() for p in uoe.parameters()) == 4 * 8 + 4 * 3 * 8 * 12, "selector D x E, SwiGLU experts"


def test_rope_tables_are_computed_in_float64_before_the_cast():
    cos, sin = rope_tables(4096, 8, 10000.0)
    s = 4095
    for i in range(4):
        angle = s * 10000.0 ** (-2 * i / 8)
        assert abs(float(cos[s, i]) - math.cos(angle)) < 1e-6 and abs(float(sin[s, i]) - math.sin(angle)) < 1e-6, i


def test_readme_experts_use_the_configured_activation():
    torch.manual_seed(60)
    layer = ReadMEMoE(tiny_moe(activation="gelu"), ReadMEConfig())
    assert layer.experts.w_gate is None, "GELU experts are not gated"


def test_supernet_down_projection_starts_at_one_over_sqrt_f():
    torch.manual_seed(61)
    sup = SupernetFFN(tiny_moe(dim=16, hidden_dim=64, num_experts=1, top_k=1), SupernetConfig())
    assert abs(sup.w_down_MDF.std().item() * 64**0.5 - 1) < 0.1


def test_moma_expert_choice_load_counts_only_chosen_tokens():
    torch.manual_seed(62)
    layer = MoMa(tiny_moe(num_experts=4, top_k=1), MoMaConfig(num_modalities=2), name="mm").train()
    ctx = RoutingContext(collect_stats=True)
    ctx.state[MODALITY_KEY] = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    layer(torch.randn(1, 8, 8), ctx)
    # modality 0: 5 tokens, 2 experts, capacity ceil(1 * 1 * 5 / 2) = 3 each; modality 1: 3 tokens -> 2 each
    assert ctx.stats["mm.m0"].counts_E.tolist() == [3, 3] and ctx.stats["mm.m1"].counts_E.tolist() == [2, 2]


def test_mor_expert_choice_divides_router_logits_by_the_temperature():
    x = torch.randn(2, 6, 8)
    outs = []
    for temperature, scale in ((2.0, 1.0), (1.0, 0.5)):
        torch.manual_seed(63)
        mor = MixtureOfRecursions(8, MoRConfig(num_recursions=2, temperature=temperature, aux_coef=0.0)).train()
        with torch.no_grad():
            for router in mor.routers:
                router.weight.mul_(scale)
        outs.append(mor(x, lambda h, c: torch.tanh(h), RoutingContext()))
    assert_close(outs[0], outs[1], "logits / 2 with W equals logits with W / 2")


def test_router_requirements_list_every_wrong_field():
    with pytest.raises(ConfigError, match=r"; set router\.capacity_factor=None \(got 1\.0\), "
                                          r"router\.eval_capacity_factor=None \(got 2\.0\)$"):
        ReadMEPlanner(tiny_moe(router={"capacity_factor": 1.0, "eval_capacity_factor": 2.0}), ReadMEConfig())


# ------------------------------------------------------------------ seeds 12 and 13's live survivors (drawn with
# seed 11 on the same suite)


BAD_R4_SEED13 = [
    ("gmoe-temperature", lambda: GMoEConfig(temperature=0.0),
     r"^variant\.temperature=0\.0 must be positive, or None for sqrt\(dim\)$"),
    ("mor-capacities", lambda: MoRConfig(num_recursions=2, capacities=(1.0, 0.0)),
     r"^variant\.capacities=\(1\.0, 0\.0\) must be in \(0, 1\]$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_R4_SEED13], ids=[b[0] for b in BAD_R4_SEED13])
def test_bad_configs_name_the_field_and_the_fix_seed13(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_boundary_settings_are_accepted_seed12():
    MoEPPConfig(tau=1.0)  # ZC experts weighted like FFN experts
    torch.manual_seed(70)
    smha = SelectiveMultiHeadAttention(12, 3, 1)  # an odd head count: half of it, rounded down, at least 1
    assert smha.top_k == 1
    cos, sin = rope_tables(4, 4, 10000.0)
    assert torch.isfinite(smha(torch.randn(1, 4, 12), cos, sin)).all()


def test_sparse_sigmoid_gates_drop_nothing_by_default_even_in_training():
    torch.manual_seed(71)
    logits = torch.randn(2, 3, 2, 4)
    train = sparse_sigmoid_gates(logits, 2, training=True)
    plain = sparse_sigmoid_gates(logits, 2)
    assert torch.equal(train[0], plain[0]) and torch.equal(train[1], plain[1])


def test_switchhead_expert_dropout_masks_both_selections_in_training_only():
    torch.manual_seed(72)
    layer = SwitchHead(16, 2, 1, SwitchHeadConfig(expert_dropout=0.9, top_k=2))
    x = torch.randn(2, 8, 16)
    layer.train()
    *_, (gates_v, ids_v), (gates_o, ids_o) = layer.select(x)
    for name, gates, ids in (("value", gates_v, ids_v), ("output", gates_o, ids_o)):
        chosen = gates.gather(-1, ids)
        assert (chosen == 0).float().mean() > 0.3, f"{name} side: masked experts get gate 0 in training"
    layer.eval()
    *_, (gates_v, ids_v), (gates_o, ids_o) = layer.select(x)
    assert (gates_v.gather(-1, ids_v) > 0).all() and (gates_o.gather(-1, ids_o) > 0).all()


def test_zero_coefficients_add_no_loss_seed12_13():
    torch.manual_seed(73)
    x = torch.randn(1, 4, 8)
    rmoe = build_ffn("rmoe", tiny_moe(router={"aux_loss_coef": 0.0, "z_loss_coef": 0.0}), {"rnn_dim": 6},
                     layer_index=0, num_layers=1, name="r")
    ctx = RoutingContext()
    rmoe(x, ctx)
    assert "z_loss" not in ctx.losses
    bf = BlockFFN(tiny_moe(num_experts=6, activation="gelu"), BlockFFNConfig(locality_coef=0.0, chunk_coef=0.1))
    ctx = RoutingContext()
    bf(x, ctx)
    assert "blockffn_locality_loss" not in ctx.losses and "blockffn_chunk_loss" in ctx.losses


def test_residual_moe_dense_branch_uses_the_configured_activation_and_moma_counts_integers():
    layer = ResidualMoE(tiny_moe(activation="gelu"), ResidualMoEConfig())
    assert layer.dense.w_gate is None, "a GELU MLP is not gated"
    ec = MoMa(tiny_moe(), MoMaConfig(routing="expert_choice"))
    assert isinstance(ec.active_params(), int)


def test_blockffn_flat_tokens_are_one_sequence_and_sum_normalisation_is_applied():
    torch.manual_seed(74)
    layer = BlockFFN(tiny_moe(num_experts=6, activation="gelu"), BlockFFNConfig(locality_coef=0.3, chunk_len=2))
    x = torch.randn(6, 8)
    flat, seq = RoutingContext(), RoutingContext()
    layer(x, flat)
    layer(x[None], seq)
    for name in ("blockffn_locality_loss", "blockffn_chunk_loss"):
        assert_close(flat.losses[name], seq.losses[name], f"{name}: [T, D] is one sequence of T tokens")
    summed = BlockFFN(tiny_moe(num_experts=6, activation="gelu"), BlockFFNConfig(norm="sum"))
    r = summed.route(torch.randn(5, 8))
    active = r.scores_TE > 0
    expected = r.scores_TE / r.scores_TE.sum(-1, keepdim=True)
    assert_close(r.weights_TK[active.any(-1)], expected[active.any(-1)], "a = r / sum r")


def test_mumoe_default_name_and_batchnorm_gates_without_affine_parameters():
    layer = MultilinearMoE(tiny_moe(router={"aux_loss_coef": 0.0}), MuMoEConfig(gate_norm="batchnorm",
                                                                               hierarchy_experts=3))
    assert not any(n.startswith(("gate_norm.", "gate_norm2.")) for n, _ in layer.named_parameters())
    ctx = RoutingContext(collect_stats=True)
    MultilinearMoE(tiny_moe(router={"aux_loss_coef": 0.0}))(torch.randn(3, 8), ctx)
    assert "mumoe" in ctx.stats


def test_readme_planner_head_init_and_layer_switch_rates():
    torch.manual_seed(75)
    planner = ReadMEPlanner(tiny_moe(router={"aux_loss_coef": 0.0}), ReadMEConfig(planner_dim=64, planner_heads=2,
                                                                                 per_layer=True), num_layers=2)
    assert abs(planner.head.weight.std().item() * 64**0.5 - 1) < 0.15, "head N(0, 1/P)"
    ctx = RoutingContext(collect_stats=True)
    plan = planner(torch.randn(1, 6, 8), ctx)
    layer = ReadMEMoE(tiny_moe(router={"aux_loss_coef": 0.0}), ReadMEConfig(per_layer=True), layer_index=1, name="l1")
    layer(torch.randn(1, 6, 8), ctx)
    ids = plan.expert_ids_LTK[:, :, 0]
    assert_close(torch.as_tensor(ctx.stats["l1"].extra["switch_rate"]), (ids[1] != ids[0]).float().mean(),
                 "layer 1 against layer 0's plan")


def test_mofme_batch_balance_loss_pools_every_token_under_the_layer_name():
    torch.manual_seed(76)
    layer = MoFME(tiny_moe(router={"aux_loss_coef": 0.2}), name="fm").eval()
    x = torch.randn(2, 3, 8)
    x[1] = 2 * x[1] + 1
    ctx = RoutingContext()
    layer(x, ctx)
    r, _ = layer.route(x.reshape(-1, 8))
    pooled = load_balancing_loss(r.scores_TE, r.expert_ids_TK)
    assert_close(ctx.layer_losses["fm"]["aux_loss"], 0.2 * pooled, "batch level: one loss over all tokens")
    assert abs(float((pooled - load_balancing_loss(r.scores_TE, r.expert_ids_TK, 2)).detach())) > 1e-5


def test_thor_step_returns_the_first_pass_logits():
    torch.manual_seed(77)
    layer = THOR(tiny_moe(top_k=1), THORConfig(), name="l")
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "head": head}).train()
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))
    seen = []

    def forward(ctx):
        seen.append(head(layer(x, ctx)))
        return seen[-1], ctx

    out = training_step_hook(model)(forward, targets, False)
    assert out.logits_BSV is seen[0]


def test_mor_expert_choice_reuses_shared_kv_from_the_second_recursion_on():
    torch.manual_seed(78)
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3, kv_sharing=True)).train()
    flags = []

    def block(h, c):
        flags.append(c.state[KV_SHARE_KEY]["reuse"])
        return h

    mor(torch.randn(1, 6, 8), block, RoutingContext())
    assert flags == [False, True, True]


def test_smoe_dropout_on_step_follows_the_configured_schedule():
    layer = SMoEDropout(tiny_moe(num_experts=4, top_k=1, router={"aux_loss_coef": 0.0}),
                        SMoEDropoutConfig(total_steps=10, schedule="cosine"))
    layer.on_step(2)
    assert layer.train_top_k == k_schedule(2, 1, 4, 10, "cosine") == 1
    layer.on_step(8)
    assert layer.train_top_k == 4


def test_promoe_top1_cosine_with_a_single_conditional_token():
    torch.manual_seed(79)
    layer = ProMoE(tiny_moe(), ProMoEConfig(), name="p")
    x = torch.randn(4, 8)
    ctx = RoutingContext(collect_stats=True)
    ctx.state[UNCONDITIONAL_KEY] = torch.tensor([True, True, False, True])
    layer(x, ctx)
    cos = F.normalize(x[2], dim=-1) @ F.normalize(layer.prototypes, dim=-1).t()
    assert_close(torch.as_tensor(ctx.stats["p"].extra["top1_cosine"]), cos.max(), "its best cosine")


def test_drllm_search_prefers_fewer_applications_even_against_a_much_lower_loss():
    table = {(0,): 6.0, (1,): 5.0, (2,): 0.0}  # skip is worse than all-execute; repeat is far better

    def run(path_BL):
        return torch.tensor([table[tuple(path_BL[0].tolist())]])

    assert search_paths(run, 1, 1).tolist() == [[1]], "one application within tolerance beats two"


def test_duo_random_routes_report_the_load_of_its_three_options():
    torch.manual_seed(80)
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3), name="d").train()
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(6, 8), ctx)
    counts = ctx.stats["d"].counts_E
    assert counts.shape == (3,) and int(counts.sum()) == 6, "skip, small and big: one route per token"


# ------------------------------------------------------------------ seed 14's live survivors (drawn with seeds 11
# to 13 on the same suite)


BAD_R4_SEED14 = [
    ("smha-heads", lambda: SMHAConfig(heads_per_token=0),
     r"^attention_options\.heads_per_token=0 must be a positive integer or left out \(half\)$"),
    ("supernet-sampling", lambda: SupernetConfig(sampling="x"),
     r"^variant\.sampling='x' is not one of \['sandwich', 'random'\]"),
    ("mor-coefs", lambda: MoRConfig(temperature=0.0),
     r"^variant\.temperature must be > 0, aux_coef and balance_coef >= 0$"),
    ("mor-inference-router", lambda: MoRConfig(routing="token_choice", inference_router="aux"),
     r"^variant\.inference_router='aux' is for routing='expert_choice' \(token choice is causal already\); "
     r"remove it or use expert choice$"),
    ("moepp-tau", lambda: MoEPPConfig(tau=0.0), r"^variant\.tau=0\.0 must be in \(0, 1\] \(paper: 0\.75\)$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_R4_SEED14], ids=[b[0] for b in BAD_R4_SEED14])
def test_bad_configs_name_the_field_and_the_fix_seed14(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_sparse_sigmoid_gates_default_to_sigmoid_values():
    logits = torch.randn(1, 2, 2, 4)
    gates, ids = sparse_sigmoid_gates(logits, 2)
    assert_close(gates.gather(-1, ids), logits.sigmoid().gather(-1, ids), "sigmoid of the chosen logits")


def test_ftp_routers_are_two_layer_gelu_mlps_and_its_step_collects_statistics_when_asked():
    cfg = with_overrides(load_preset("ftp"), {"model.dim": "16", "model.num_heads": "2", "model.context": "8",
                                              "model.num_layers": "2", "model.dense_hidden_dim": "32"})
    torch.manual_seed(81)
    model = LanguageModel(cfg.model.replace(depth_routing={**cfg.model.depth_routing, "sparsity": [0.0, 0.5]}))
    router = model.depth_router.routers[1]
    f = torch.randn(5, 4)
    assert_close(router(f), router[-1](F.gelu(router[0](f))), "Linear -> GELU -> Linear")
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    step = training_step_hook(model.train())
    assert step(lambda ctx: model(x, ctx), y, True).ctx.stats, "statistics when asked"
    assert not step(lambda ctx: model(x, ctx), y, False).ctx.stats


def test_supernet_step_collects_statistics_only_when_asked():
    torch.manual_seed(82)
    layer = build_ffn("supernet", tiny_moe(hidden_dim=12, num_experts=1, top_k=1), {"widths": [0.25, 0.5]},
                      layer_index=0, num_layers=1, name="l")
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "head": head})
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))
    step = training_step_hook(model)
    assert not step(lambda ctx: (head(layer(x, ctx)), ctx), targets, False).ctx.stats
    assert "l" in step(lambda ctx: (head(layer(x, ctx)), ctx), targets, True).ctx.stats


def test_mor_one_step_capacity_warmup_starts_at_full_capacity():
    c = MoRConfig(num_recursions=3, cap_warmup_steps=1)
    assert c.warmed(0) == (1, 1, 1), "step 0 of the cosine warm-up: every token recurses"
    assert c.warmed(1) == c.schedule()


def test_moepp_reports_its_load_and_names_mismatched_gating_residuals():
    torch.manual_seed(83)
    layer = MoEPlusPlus(tiny_moe(), MoEPPConfig(capacity_factor=None), name="pp")
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(5, 8), ctx)
    counts = ctx.stats["pp"].counts_E
    assert counts.shape == (layer.pool,) and int(counts.sum()) == 5 * 2, "top-2 slots of 5 tokens over the pool"
    ctx = RoutingContext()
    ctx.state[MOEPP_STATE_KEY] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"^MoE\+\+ gating residual: previous layer's logits have shape \(5, 3\), "
                                         r"this layer's \(5, 8\); every MoE\+\+ layer needs the same pool"):
        layer.logits(torch.randn(5, 8), ctx)


def test_smoe_dropout_accepts_a_one_step_schedule():
    layer = SMoEDropout(tiny_moe(num_experts=4, top_k=1, router={"aux_loss_coef": 0.0}),
                        SMoEDropoutConfig(total_steps=1))
    layer.on_step(1)
    assert layer.train_top_k == 4, "k_max after the single step"


def test_drllm_statistics_with_an_odd_number_of_decisions():
    routers = LayerPathRouters(8, 3, DrLLMConfig(), name="d")
    ctx = RoutingContext(collect_stats=True)
    ctx.state[DRLLM_PATH_KEY] = torch.tensor([[0, 1, 2]])  # one sequence, three layers
    routers(torch.randn(1, 3, 8), [lambda h, c: h + 1.0] * 3, ctx)
    assert ctx.stats["d"].counts_E.tolist()[:3] == [1, 1, 1]


def test_topp_z_loss_is_its_coefficient_times_the_z_loss():
    torch.manual_seed(84)
    layer = TopPMoE(tiny_moe(router={"aux_loss_coef": 0.0, "z_loss_coef": 0.3}), TopPConfig(threshold=0.5))
    x = torch.randn(5, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    assert_close(ctx.losses["z_loss"], 0.3 * z_loss(layer.route(x).logits_TE), "coef * z")


def test_mumoe_tensor_ring_matched_rank_formula():
    cfg = MuMoEConfig(factorization="tr")  # r1 = r2 = 4; r3 = (D F - 16 N) / (4 (D + F + 1))
    assert cfg.tr_rank == 4
    assert matched_rank(cfg, 16, 64, 4) == 2  # (1024 - 64) // 324 = 2 (with D + F - 1: 960 // 316 = 3)
    assert matched_rank(cfg, 768, 3072, 64) == 153  # GPT-2, as the docstring says
    assert matched_rank(cfg, 8, 12, 4) == 1  # (96 - 64) // 84 = 0 -> at least 1


def test_moma_causal_evaluation_load_counts_the_auxiliary_routers_choices_only():
    torch.manual_seed(85)
    layer = MoMa(tiny_moe(num_experts=4, top_k=1), MoMaConfig(num_modalities=2), name="mm").eval()
    x = torch.randn(1, 8, 8)
    ctx = RoutingContext(collect_stats=True)
    ctx.state[MODALITY_KEY] = torch.zeros(1, 8, dtype=torch.long)
    layer(x, ctx)
    chosen = layer.aux_routers[0](x[0]) > 0  # [T, 2]: the experts each token joins
    assert 0 < int(chosen.sum()) < chosen.numel(), "the test needs some tokens left out"
    assert ctx.stats["mm.m0"].counts_E.tolist() == chosen.sum(0).tolist()


# ------------------------------------------------------------------ seed 15's live survivors (a sample drawn on the
# final suite of round 4)


def test_build_attention_passes_the_context_length_on():
    layer = build_attention("routing", {}, dim=16, num_heads=2, num_layers=1, context=64)
    assert layer.num_clusters == 8, "C = round(sqrt(context)) by default"


def test_rmoe_z_loss_is_keyed_by_the_layer():
    torch.manual_seed(90)
    rmoe = build_ffn("rmoe", tiny_moe(router={"aux_loss_coef": 0.0, "z_loss_coef": 0.1}), {"rnn_dim": 6},
                     layer_index=0, num_layers=1, name="r")
    ctx = RoutingContext()
    rmoe(torch.randn(5, 8), ctx)
    assert "z_loss" in ctx.layer_losses["r"]


def test_smoe_dropout_scores_are_per_token_probabilities():
    torch.manual_seed(91)
    layer = SMoEDropout(tiny_moe(router={"aux_loss_coef": 0.0}))
    scores = layer.route(torch.randn(5, 8)).scores_TE
    assert_close(scores.sum(-1), torch.ones(5), "each token's scores sum to 1")


# ------------------------------------------------------------------ seed 16's live survivors (drawn with seed 15 on
# the final suite of round 4)


BAD_R4_SEED16 = [
    ("smoe-k-range", lambda: SMoEDropout(tiny_moe(num_experts=4), SMoEDropoutConfig(k_min=3, k_max=2)),
     r"^SMoE-Dropout needs 1 <= k_min=3 <= k_max=2 <= num_experts=4$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_R4_SEED16], ids=[b[0] for b in BAD_R4_SEED16])
def test_bad_configs_name_the_field_and_the_fix_seed16(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_mom_output_projection_starts_at_the_residual_scale():
    torch.manual_seed(92)
    dim = 64
    for num_layers in (1, 2):
        mom = MixtureOfMemories(dim, 4, num_layers, MoMConfig())
        expected = dim**-0.5 / (2 * num_layers) ** 0.5
        assert abs(mom.w_out.weight.std().item() / expected - 1) < 0.1, num_layers


def test_zero_coefficients_are_accepted_seed16():
    THORConfig(consistency_coef=0.0)
    torch.manual_seed(93)
    layer = MoEPlusPlus(tiny_moe(), MoEPPConfig(balance_coef=0.0))
    ctx = RoutingContext()
    layer(torch.randn(4, 8), ctx)
    assert "moepp_balance_loss" not in ctx.losses


def test_ftp_evaluation_applies_a_routed_block_where_its_keep_probability_exceeds_one_half():
    pruner = TokenPruner(2, FTPConfig(sparsity=[0.0, 0.5])).eval()
    with torch.no_grad():
        pruner.routers[1][-1].bias.fill_(5.0)  # keep ~ 0.99 for every token
    x = torch.randn(1, 4, 8)
    ctx = RoutingContext()
    y = pruner(x, [lambda h, c: torch.ones_like(h)] * 2, ctx)
    assert (ctx.state[KEEP_KEY][1] > 0.5).all()
    assert_close(y, x + 2.0, "block 0 always runs; block 1 runs on the kept tokens")


def test_ftp_step_without_routed_blocks_reports_zero_router_losses_as_tensors():
    cfg = with_overrides(load_preset("ftp"), {"model.dim": "16", "model.num_heads": "2", "model.context": "8",
                                              "model.num_layers": "2", "model.dense_hidden_dim": "32"})
    torch.manual_seed(94)
    model = LanguageModel(cfg.model.replace(depth_routing={**cfg.model.depth_routing, "sparsity": [0.0, 0.0]}))
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    out = training_step_hook(model.train())(lambda ctx: model(x, ctx), y, False)
    for name in ("ftp_guide_loss", "ftp_sparsity_loss"):
        value = out.ctx.losses[name]
        assert torch.is_tensor(value) and float(value) == 0.0, name


def test_uoe_balance_loss_is_its_coefficient_times_the_switch_loss():
    torch.manual_seed(95)
    layer = UnionOfMLPExperts(tiny_moe(router={"aux_loss_coef": 0.3}), UoMEConfig())
    x = torch.randn(5, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    r = layer.route(x[None])
    assert_close(ctx.losses["aux_loss"], 0.3 * load_balancing_loss(r.scores_TE, r.expert_ids_TK), "coef * loss")


# ------------------------------------------------------------------ seeds 17 to 20's live survivors (drawn on the
# final suite of round 4, with the seed 15-16 tests)


BAD_R4_SEED17 = [
    ("prmoe-dense", lambda: ResidualMoEConfig(dense_hidden_dim=-1),
     r"^variant\.dense_hidden_dim=-1 must be >= 0 \(0 means the default\)$"),
    ("duo-eval-route", lambda: DuoConfig(eval_route="x"),
     r"^variant\.eval_route='x' is not one of \['big', 'random'\]"),
    ("readme-planner", lambda: ReadMEConfig(planner_dim=0),
     r"^variant\.planner_dim and planner_heads must be positive, planner_layers >= 0$"),
    ("mor-threshold", lambda: MoRConfig(threshold=1.0), r"^variant\.threshold=1\.0 must be in \(0, 1\)"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_R4_SEED17], ids=[b[0] for b in BAD_R4_SEED17])
def test_bad_configs_name_the_field_and_the_fix_seed17(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_small_defaults_at_their_floors():
    DuoConfig(temperature=0.5, min_temperature=0.5)  # no annealing: the floor equals the start
    assert RoutingAttention(16, 2, 1, 2, RoutingAttentionConfig()).num_clusters == 1, "round(sqrt(2)) = 1"
    duo = DuoFFN(tiny_moe(hidden_dim=12, num_experts=1, top_k=1), DuoConfig())  # F // 16 = 0 -> at least 1
    assert duo.small.hidden_dim == 1


def test_gmoe_combine_records_the_layer_load_in_the_callers_context():
    torch.manual_seed(100)
    layer = GraphOfTokensMoE(tiny_moe(router={"aux_loss_coef": 0.0}), GMoEConfig(), name="g")
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(1, 5, 8), ctx)
    assert int(ctx.stats["g"].counts_E.sum()) == 5 * 2, "top-2 of 5 tokens"


def test_losses_are_keyed_by_the_layer_seed17_18():
    torch.manual_seed(101)
    x = torch.randn(1, 4, 8)
    bf = BlockFFN(tiny_moe(num_experts=6, activation="gelu"), BlockFFNConfig(locality_coef=0.0, chunk_coef=0.1),
                  name="bf")
    ctx = RoutingContext()
    bf(x, ctx)
    assert "blockffn_chunk_loss" in ctx.layer_losses["bf"]
    uoe = UnionOfMLPExperts(tiny_moe(router={"aux_loss_coef": 0.1}), UoMEConfig(), name="u")
    ctx = RoutingContext()
    uoe(x, ctx)
    assert "aux_loss" in ctx.layer_losses["u"]
    topp = TopPMoE(tiny_moe(router={"aux_loss_coef": 0.0, "z_loss_coef": 0.1}), TopPConfig(threshold=0.5), name="tp")
    ctx = RoutingContext()
    topp(x, ctx)
    assert "z_loss" in ctx.layer_losses["tp"] and "aux_loss" not in ctx.losses, "z-loss keyed; aux off at 0"


def test_smha_qkv_starts_at_one_over_sqrt_d():
    torch.manual_seed(102)
    smha = SelectiveMultiHeadAttention(64, 4, 1)
    assert abs(smha.w_qkv.weight.std().item() * 64**0.5 - 1) < 0.1


def test_duo_router_without_skip_never_skips_and_its_step_returns_the_logits():
    torch.manual_seed(103)
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3, routing="router",
                                                              allow_skip=False), name="d")
    w, probs = layer.eval().route_weights(torch.randn(6, 8), None)
    assert torch.equal(probs[:, 0], torch.zeros(6)) and torch.equal(w[:, 0], torch.zeros(6)), "skip has no mass"
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "head": head}).train()
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))
    seen = []

    def forward(ctx):
        seen.append(head(layer(x, ctx)))
        return seen[-1], ctx

    out = training_step_hook(model)(forward, targets, False)
    assert "duo_budget_loss" in out.ctx.losses and out.logits_BSV is seen[0]


def test_rmoe_route_takes_its_tokens_as_one_sequence_by_default():
    torch.manual_seed(104)
    layer = build_ffn("rmoe", tiny_moe(router={"aux_loss_coef": 0.1, "aux_loss_level": "sequence"}),
                      {"rnn_dim": 6, "aux_scope": "layer"}, layer_index=0, num_layers=1, name="r")
    x = torch.randn(6, 8)
    x[3:] = 3 * x[3:] + 1
    default, one = RoutingContext(), RoutingContext()
    layer.route(x, default)
    layer.route(x, one, 1)
    assert_close(default.losses["aux_loss"], one.losses["aux_loss"], "num_sequences defaults to 1")


def test_ftp_static_router_reads_the_attention_the_previous_block_received():
    pruner = TokenPruner(2, FTPConfig(sparsity=[0.0, 0.5]))
    B, S = 1, 4
    probs = torch.zeros(B, 1, S, S)
    probs[..., 0] = 1.0  # every query attends to key 0 only
    probs[0, 0, 3, :] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # ... except the last one, which attends to itself

    def delta(h, c):
        c.state[ATTENTION_PROBS_KEY] = probs
        return torch.zeros_like(h)

    ctx = RoutingContext()
    pruner(torch.randn(B, S, 8), [delta, delta], ctx)
    expected = static_keep(attention_received(probs, B, S, "cpu"), 0.5)
    assert torch.equal(ctx.state[STATIC_KEY][1], expected)
    assert not torch.equal(expected, static_keep(torch.zeros(B, S), 0.5)), "the test needs scores that matter"


BAD_R4_SEED19 = [
    ("mod-capacity", lambda: MoDConfig(capacity=1.5),
     r"^variant\.capacity=1\.5 must be in \(0, 1\] \(paper: 0\.125\)$"),
    ("promoe-rcl-coef", lambda: ProMoEConfig(rcl_coef=-1.0), r"^variant\.rcl_coef=-1\.0 must be >= 0; 0 disables it$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_R4_SEED19], ids=[b[0] for b in BAD_R4_SEED19])
def test_bad_configs_name_the_field_and_the_fix_seed19(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_duo_router_and_tr_input_core_start_at_their_scales():
    torch.manual_seed(105)
    duo = DuoFFN(tiny_moe(dim=256, hidden_dim=16, num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3,
                                                                                   routing="router"))
    assert abs(duo.router.weight.std().item() * 16 - 1) < 0.2, "router N(0, 1/D)"
    tr = TRMultilinear(2, 16, 4, 2, 4, 4)  # G_I [r2=4, I+1=17, r3=4] ~ U(+-1/sqrt(I))
    bound = 16**-0.5
    assert tr.g_in.abs().max() <= bound and tr.g_in.max() > 0.5 * bound and tr.g_in.min() < -0.5 * bound


def test_default_layer_names_of_gmoe():
    ctx = RoutingContext()
    GraphOfTokensMoE(tiny_moe(router={"z_loss_coef": 0.1}), GMoEConfig())(torch.randn(1, 4, 8), ctx)
    assert "z_loss" in ctx.layer_losses["gmoe"]


def test_moepp_mlp_gate_gating_residual_switch_and_zero_z_loss():
    torch.manual_seed(106)
    x = torch.randn(5, 8)
    mlp = MoEPlusPlus(tiny_moe(), MoEPPConfig(gate="mlp", gating_residual=False))
    first, _, last = mlp.gate
    assert_close(mlp.logits(x, None), last(torch.tanh(first(x))), "Linear -> tanh -> Linear (the released code)")
    ctx = RoutingContext()
    ctx.state[MOEPP_STATE_KEY] = torch.randn(5, mlp.pool)
    assert_close(mlp.logits(x, ctx), mlp.logits(x, None), "gating_residual=false ignores the previous logits")
    ctx = RoutingContext()
    MoEPlusPlus(tiny_moe(router={"z_loss_coef": 0.0}), MoEPPConfig())(x, ctx)
    assert "z_loss" not in ctx.losses


def test_mumoe_cp_matched_rank_and_repr():
    assert matched_rank(MuMoEConfig(), 16, 64, 4) == 12  # 1024 // (4 + 16 + 64 + 1) = 12 (with + 2: 11)
    assert matched_rank(MuMoEConfig(), 768, 3072, 64) == 604  # GPT-2, 64 experts, as the docstring says
    layer = MultilinearMoE(tiny_moe(router={"aux_loss_coef": 0.0}), MuMoEConfig())
    assert f"factorization=cp, rank={layer.rank}, tr_rank=4, gate=entmax15, gate_norm=layernorm" in repr(layer)


BAD_R4_SEED20 = [
    ("mom-memories", lambda: MoMConfig(num_memories=0),
     r"^attention_options\.num_memories=0 must be a positive integer$"),
    ("readme-layers", lambda: ReadMEPlanner(tiny_moe(router={"aux_loss_coef": 0.0}), ReadMEConfig(), num_layers=0),
     r"^num_layers=0 must be positive$"),
    ("drllm-tolerance", lambda: DrLLMConfig(tolerance=-0.5),
     r"^model\.depth_routing\.tolerance=-0\.5 must be >= 0$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_R4_SEED20], ids=[b[0] for b in BAD_R4_SEED20])
def test_bad_configs_name_the_field_and_the_fix_seed20(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_mor_threshold_evaluation_reuses_shared_kv_from_the_second_recursion_on():
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3, kv_sharing=True)).eval()
    with torch.no_grad():
        for router in mor.routers:
            router.weight.fill_(1.0)  # every token passes every threshold
    flags = []

    def block(h, c):
        flags.append(c.state[KV_SHARE_KEY]["reuse"])
        return torch.zeros_like(h)

    mor(torch.ones(1, 4, 8), block, RoutingContext())
    assert flags == [False, True, True]


def test_moepp_renormalises_its_top_k_by_default():
    torch.manual_seed(107)
    layer = MoEPlusPlus(tiny_moe(), MoEPPConfig(capacity_factor=None, gating_residual=False))
    r = layer.route(torch.randn(6, 8))
    assert_close(r.weights_TK.sum(-1), torch.ones(6), "norm_topk_prob (the default) renormalises the top-2")


def test_statistics_are_detached_and_default_names_of_blockffn():
    torch.manual_seed(108)
    layer = ProMoE(tiny_moe(), ProMoEConfig(), name="p")
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(4, 8), ctx)
    extra = ctx.stats["p"].extra
    assert "top1_cosine" in extra
    assert not any(torch.is_tensor(v) and v.requires_grad for v in extra.values()), "statistics hold no graph"
    ctx = RoutingContext()
    BlockFFN(tiny_moe(num_experts=6, activation="gelu"), BlockFFNConfig(chunk_len=2))(torch.randn(1, 4, 8), ctx)
    assert "blockffn_chunk_loss" in ctx.layer_losses["blockffn"]


def test_topp_route_takes_its_tokens_as_one_sequence_by_default():
    torch.manual_seed(109)
    layer = TopPMoE(tiny_moe(router={"aux_loss_coef": 0.1, "aux_loss_level": "sequence"}), TopPConfig(threshold=0.6))
    x = torch.randn(6, 8)
    x[3:] = 3 * x[3:] + 1
    default, one = RoutingContext(), RoutingContext()
    layer.route(x, default)
    layer.route(x, one, 1)
    assert_close(default.losses["aux_loss"], one.losses["aux_loss"], "num_sequences defaults to 1")

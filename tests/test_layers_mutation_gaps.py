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
from moekit.layers import build_ffn
from moekit.layers.attention import rope_tables
from moekit.layers.attention.mom import MixtureOfMemories, MoMConfig
from moekit.layers.attention.registry import check_attention_kind
from moekit.layers.attention.rope import apply_rope, apply_rope_any_width
from moekit.layers.attention.routing_attention import RoutingAttention, RoutingAttentionConfig
from moekit.layers.attention.smha import SelectiveMultiHeadAttention, SMHAConfig
from moekit.layers.attention.switchhead import (
    SwitchHead,
    SwitchHeadConfig,
    selection_entropy_loss,
    sparse_sigmoid_gates,
)
from moekit.layers.step_hook import next_token_ce, training_step_hook
from moekit.layers.variants.blockffn import BlockFFN, BlockFFNConfig
from moekit.layers.variants.coe import ChainOfExperts
from moekit.layers.variants.drllm import LOGITS_KEY, PATH_KEY, DrLLMConfig, focal_loss, search_paths
from moekit.layers.variants.duo import DuoConfig, DuoFFN
from moekit.layers.variants.ftp import DENSE_KEY, KEEP_KEY, STATIC_KEY, FTPConfig
from moekit.layers.variants.gmoe import GMoEConfig, GraphOfTokensMoE
from moekit.layers.variants.mod import MixtureOfDepths, MoDConfig
from moekit.layers.variants.moepp import MoEPlusPlus, MoEPPConfig
from moekit.layers.variants.mofme import MoFME, MoFMEConfig
from moekit.layers.variants.moma import MoMa, MoMaConfig
from moekit.layers.variants.mor import MixtureOfRecursions, MoRConfig
from moekit.layers.variants.mumoe import CPMultilinear, MultilinearMoE, MuMoEConfig, matched_rank
from moekit.layers.variants.promoe import UNCONDITIONAL_KEY, ProMoE, ProMoEConfig, routing_contrastive_loss
from moekit.layers.variants.readme import ReadMEConfig, ReadMEMoE, ReadMEPlanner
from moekit.layers.variants.rmoe import RecurrentRouterMoE, RMoEConfig
from moekit.layers.variants.smoe_dropout import SMoEDropout, SMoEDropoutConfig
from moekit.layers.variants.supernet import ARCH_KEY
from moekit.layers.variants.thor import THOR, THORConfig, consistency_loss
from moekit.layers.variants.topp import TopPConfig, TopPMoE
from moekit.layers.variants.uoe import UnionOfMLPExperts, UoMEConfig
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.routing import load_balancing_loss, z_loss
from moekit.training import with_overrides

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


# ------------------------------------------------------------------ per-sequence, per-layer and per-step losses

def test_rmoe_layer_scope_sequence_level_aux_is_the_mean_of_each_sequences_own():
    torch.manual_seed(6)
    moe = tiny_moe(router={"aux_loss_level": "sequence", "aux_loss_coef": 0.1})
    layer = RecurrentRouterMoE(moe, RMoEConfig(rnn_dim=6, aux_scope="layer"), name="l0")
    x = torch.randn(2, 5, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    alone = []
    for b in range(2):
        one = RoutingContext()
        layer(x[b:b + 1], one)
        alone.append(one.losses["aux_loss"])
    assert_close(ctx.losses["aux_loss"], torch.stack(alone).mean(), "per-sequence balance, averaged")


def _ftp_model(sparsity):
    cfg = with_overrides(load_preset("ftp"), {"model.dim": "16", "model.num_heads": "2", "model.context": "8",
                                              "model.num_layers": "3", "model.dense_hidden_dim": "32"})
    routing = {**cfg.model.depth_routing, "sparsity": sparsity}
    torch.manual_seed(0)
    return LanguageModel(cfg.model.replace(depth_routing=routing)).train()


def test_ftp_sparsity_guide_and_distillation_losses_follow_their_formulas():
    model = _ftp_model([0.0, 0.5, 0.25])  # block 0 is never routed and takes no part in the router losses
    torch.manual_seed(7)
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    out = training_step_hook(model)(lambda ctx: model(x, ctx), y, False)
    keeps, statics = out.ctx.state[KEEP_KEY], out.ctx.state[STATIC_KEY]
    routed = {1: 0.5, 2: 0.25}
    sparse = sum((1 - keeps[i].mean() - s) ** 2 for i, s in routed.items()) / 2
    guide = sum(F.binary_cross_entropy(keeps[i], statics[i]) for i in routed) / 2
    with torch.no_grad():
        teacher = RoutingContext()
        teacher.state[DENSE_KEY] = True
        p_log = model(x, teacher)[0].float().log_softmax(-1)
    q_log = out.logits_BSV.float().log_softmax(-1)
    distill = (p_log.exp() * (p_log - q_log)).sum(-1).mean()  # KL(dense || routed) per token, summed over vocab
    assert_close(out.ctx.losses["ftp_sparsity_loss"], sparse, "(1 - mean keep - s_b)^2 over routed blocks")
    assert_close(out.ctx.losses["ftp_guide_loss"], guide, "BCE to the static router over routed blocks")
    assert_close(out.ctx.losses["ftp_distill_loss"], distill, "KL summed over the vocabulary, mean over tokens")


def test_thor_step_is_two_passes_plus_the_token_mean_consistency():
    torch.manual_seed(8)
    layer = THOR(tiny_moe(top_k=1), THORConfig(consistency_coef=3.0), name="l")
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "head": head}).train()
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))
    seen = []

    def forward(ctx):
        seen.append(head(layer(x, ctx)))
        return seen[-1], ctx

    out = training_step_hook(model)(forward, targets, True)
    assert len(seen) == 2
    ce = [next_token_ce(logits, targets) for logits in seen]
    expected = ce[0] + ce[1] + 3.0 / targets.numel() * consistency_loss(seen[0], seen[1])
    assert_close(out.loss, expected, "CE1 + CE2 + alpha / N * consistency")
    assert_close(out.ce, (ce[0] + ce[1]) / 2, "reported CE")


def test_supernet_random_sampling_runs_one_sub_architecture_from_the_widths():
    torch.manual_seed(9)
    layer = build_ffn("supernet", tiny_moe(hidden_dim=12, num_experts=1, top_k=1),
                      {"sampling": "random", "widths": [0.25, 0.5]}, layer_index=0, num_layers=1, name="l")
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "head": head})
    archs, logits = [], []
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))

    def forward(ctx):
        archs.append(ctx.state[ARCH_KEY])
        logits.append(head(layer(x, ctx)))
        return logits[-1], ctx

    out = training_step_hook(model)(forward, targets, False)
    assert len(archs) == 1 and archs[0] in ((0.25,), (0.5,))
    assert_close(out.ce, next_token_ce(logits[0], targets), "one pass, its CE")


# ------------------------------------------------------------------ routing details

def test_promoe_weights_follow_the_routed_scaling_factor():
    x = torch.randn(6, 8)
    weights = []
    for scale in (1.0, 2.5):
        torch.manual_seed(0)
        layer = ProMoE(tiny_moe(router={"routed_scaling_factor": scale}), ProMoEConfig())
        weights.append(layer.route(x).weights_TK)
    assert_close(weights[1], 2.5 * weights[0], "weights scaled by routed_scaling_factor")


def test_promoe_unconditional_rows_of_the_scores_are_one_hot_on_the_unconditional_expert():
    torch.manual_seed(1)
    layer = ProMoE(tiny_moe(num_shared_experts=1), ProMoEConfig())
    x = torch.randn(4, 8)
    ctx = RoutingContext()
    flag = torch.tensor([True, False, True, False])
    ctx.state[UNCONDITIONAL_KEY] = flag
    scores = layer.route(x, ctx).scores_TE
    plain = layer.route(x).scores_TE
    assert torch.equal(scores[flag], F.one_hot(torch.tensor([4, 4]), 5).float())
    assert_close(scores[~flag], plain[~flag], "conditional rows unchanged")
    assert torch.equal(plain[:, 4], torch.zeros(4)), "no mass on the unconditional expert for conditional tokens"


def test_topp_records_the_load_of_its_routing_under_its_name():
    torch.manual_seed(2)
    layer = TopPMoE(tiny_moe(), TopPConfig(threshold=0.5), name="l0")
    x = torch.randn(2, 5, 8)
    ctx = RoutingContext(collect_stats=True)
    layer(x, ctx)
    ids = layer.route(x.reshape(-1, 8)).expert_ids_TK
    assert torch.equal(ctx.stats["l0"].counts_E, torch.bincount(ids[ids >= 0], minlength=4))


def test_readme_planner_has_no_bias_terms_and_each_plan_carries_its_logits():
    torch.manual_seed(3)
    moe = tiny_moe(router={"aux_loss_coef": 0.0})
    planner = ReadMEPlanner(moe, ReadMEConfig(per_layer=True), num_layers=2)
    plan = planner(torch.zeros(1, 4, 8))
    assert torch.equal(plan.logits_LTE, torch.zeros_like(plan.logits_LTE)), "zero embeddings, zero logits"
    plan = planner(torch.randn(1, 4, 8))
    for i in range(2):
        routing = plan.routing(i)
        assert torch.equal(routing.logits_TE, plan.logits_LTE[i]) and torch.equal(routing.scores_TE, plan.probs_LTE[i])


def test_mor_warm_up_starts_at_full_capacity_before_any_step():
    torch.manual_seed(4)
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=2, cap_warmup_steps=10)).train()
    seen = []
    mor(torch.randn(2, 6, 8), lambda h, c: seen.append(h.shape[1]) or h, RoutingContext())
    assert seen == [6, 6], "step 0 of the cosine warm-up: every token recurses"


# ------------------------------------------------------------------ Dr.LLM per-sequence bookkeeping

def _drllm_model():
    cfg = with_overrides(load_preset("drllm"), {"model.dim": "16", "model.num_heads": "2", "model.context": "8",
                                                "model.num_layers": "3", "model.dense_hidden_dim": "32"})
    torch.manual_seed(0)
    return LanguageModel(cfg.model)


def test_drllm_statistics_count_executed_and_skipped_layers_per_sequence():
    model = _drllm_model().eval()
    ctx = RoutingContext(collect_stats=True)
    ctx.state[PATH_KEY] = torch.tensor([[2, 0, 1], [0, 0, 1]])  # 3 and 1 block applications; 1 and 2 skips
    model(torch.randint(0, 256, (2, 8)), ctx)
    (extra,) = [s.extra for s in ctx.stats.values() if "layers_executed" in s.extra]
    assert float(extra["layers_executed"]) == 2.0 and float(extra["layers_skipped"]) == 1.5


def test_drllm_router_loss_pairs_each_sequences_router_logits_with_its_searched_path():
    model = _drllm_model().train()
    c = model.depth_router.config
    torch.manual_seed(10)
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))

    def forced(path_BL):
        ctx = RoutingContext()
        ctx.state[PATH_KEY] = path_BL
        return model(x, ctx)[1]

    def run(path_BL):
        ctx = RoutingContext()
        ctx.state[PATH_KEY] = path_BL
        return F.cross_entropy(model(x, ctx)[0].float().transpose(1, 2), y, reduction="none").mean(1)

    out = training_step_hook(model)(lambda ctx: model(x, ctx), y, False)
    with torch.no_grad():
        labels_BL = search_paths(run, 2, 3, c.tolerance, c.max_paths)
        logits_BL3 = torch.stack(forced(labels_BL).state[LOGITS_KEY], dim=1)
    expected = c.router_coef * focal_loss(logits_BL3.reshape(-1, 3), labels_BL.reshape(-1), c.focal_gamma)
    assert_close(out.ctx.losses["drllm_router_loss"], expected, "focal loss over (sequence, layer) pairs")
    assert_close(out.aux, out.ctx.total_loss(), "the router loss is part of the reported auxiliary loss")
    assert_close(out.ce, next_token_ce(model(x)[0], y), "the reported CE is the all-execute pass's")


# ------------------------------------------------------------------ gaps of the fresh sample (seed 1)

BAD_2 = [
    ("ftp-coef", lambda: FTPConfig(distill_coef=-1.0), r"distill_coef=-1\.0 must be >= 0"),
    ("mofme-samples", lambda: MoFMEConfig(mc_samples=0), r"variant\.mc_samples=0 must be a positive integer "
                                                         r"\(1 disables averaging\)"),
    ("moepp-balance", lambda: MoEPPConfig(balance_coef=-1.0), r"variant\.balance_coef=-1\.0 must be >= 0"),
    ("drllm-stage", lambda: DrLLMConfig(stage="x"), r"\.stage='x' is not one of \['routers', 'joint'\]"),
    ("attention-kind-close", lambda: check_attention_kind("smhaa"),
     r"^model\.attention='smhaa' is not an attention kind; did you mean 'smha'\?; available: \["),
    ("attention-kind-far", lambda: check_attention_kind("zzzzzz"),
     r"^model\.attention='zzzzzz' is not an attention kind; available: \["),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_2], ids=[b[0] for b in BAD_2])
def test_more_bad_configs_name_the_field_and_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_routing_attention_refuses_a_kv_cache_with_the_fix():
    layer = RoutingAttention(16, 2, 1, 8, RoutingAttentionConfig(num_clusters=2))
    cos, sin = rope_tables(8, 8, 10000.0)
    with pytest.raises(ValueError, match=r"^routing attention has no KV cache; generate without one \(moekit "
                                         r"sample --no-cache\)$"):
        layer(torch.randn(1, 4, 16), cos, sin, cache=object())


def test_readme_planner_of_odd_width_names_the_rotary_pairs():
    with pytest.raises(ConfigError, match=r"planner_heads=1 must divide planner_dim=1 into an even head size"):
        ReadMEConfig(planner_dim=1, planner_heads=1)


def test_readme_planner_attention_depends_on_relative_position_only():
    from moekit.layers.variants.readme import _rope
    torch.manual_seed(11)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    S = 6
    rq, rk = _rope(q.expand(1, 1, S, 8).clone()), _rope(k.expand(1, 1, S, 8).clone())
    scores = rq[0, 0] @ rk[0, 0].T  # [S, S]: the same q and k at every position
    for shift in range(1, S):
        diag = torch.diagonal(scores, -shift)
        assert_close(diag, diag[0].expand_as(diag), f"score of q at t and k at t-{shift} is the same for every t")
    assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, 1, S), "a rotation keeps the norm")


def test_rmoe_layer_scope_batch_level_aux_counts_the_whole_batch_and_its_coefficient():
    torch.manual_seed(12)
    x = torch.randn(2, 5, 8)
    values = {}
    for coef in (0.1, 0.3):
        torch.manual_seed(13)
        layer = RecurrentRouterMoE(tiny_moe(router={"aux_loss_coef": coef}), RMoEConfig(rnn_dim=6, aux_scope="layer"))
        batched, flat = RoutingContext(), RoutingContext()
        layer(x, batched)
        layer(x.reshape(-1, 8), flat)  # the same tokens as one sequence
        assert_close(batched.losses["aux_loss"], flat.losses["aux_loss"], "batch level: one balance over all")
        routing = layer.route(x.reshape(-1, 8))
        assert_close(batched.losses["aux_loss"], coef * load_balancing_loss(routing.scores_TE, routing.expert_ids_TK),
                     "coef x the Switch loss of the layer's own routing")
        values[coef] = batched.losses["aux_loss"]
    assert_close(values[0.3], 3 * values[0.1], "coefficient applied")


def test_duo_default_name_keys_its_statistics():
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3))
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(3, 8), ctx)
    assert layer.name == "duo" and list(ctx.stats) == ["duo"]


def test_duo_random_routes_of_single_tokens_always_run():
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3)).train()
    torch.manual_seed(14)
    x = torch.randn(1, 8)
    outputs = {tuple(layer(x).flatten().tolist()) for _ in range(30)}  # skip, small and big all drawn
    assert len(outputs) == 3


def test_duo_step_in_evaluation_is_the_plain_loss():
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3, routing="router"))
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "head": head}).eval()
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))
    out = training_step_hook(model)(lambda ctx: (head(layer(x, ctx)), ctx), targets, False)
    assert_close(out.loss, next_token_ce(head(layer(x)), targets), "no routed probabilities, no budget loss")


def test_thor_step_reports_the_consistency_as_auxiliary_and_routes_one_weight_per_token():
    torch.manual_seed(15)
    layer = THOR(tiny_moe(top_k=1), THORConfig(consistency_coef=2.0), name="l")
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "head": head}).train()
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))
    out = training_step_hook(model)(lambda ctx: (head(layer(x, ctx)), ctx), targets, False)
    assert_close(out.aux, out.ctx.losses["thor_consistency_loss"], "the consistency is the auxiliary loss")
    for mode in (True, False):
        routing = layer.train(mode).route(x)
        assert routing.weights_TK.shape == routing.expert_ids_TK.shape == (8, 1)


def test_moepp_shared_expert_and_z_loss():
    torch.manual_seed(16)
    moe = tiny_moe(num_shared_experts=2, router={"z_loss_coef": 0.5})
    layer = MoEPlusPlus(moe, MoEPPConfig(num_zero=1, num_copy=1, num_constant=1))
    x = torch.randn(5, 8)
    ctx = RoutingContext()
    y = layer(x, ctx)
    assert layer.shared_experts.hidden_dim == 2 * 12, "the shared FFN is num_shared_experts x hidden_dim wide"
    assert y.shape == x.shape
    logits = F.linear(x.float(), layer.gate.weight.float())  # the first layer: no gating residual yet
    assert_close(ctx.losses["z_loss"], 0.5 * z_loss(logits), "ST-MoE z-loss over the pool's logits, coefficient")


def test_smoe_dropout_router_bias_is_within_one_over_sqrt_dim():
    torch.manual_seed(17)
    D = 64
    layer = SMoEDropout(tiny_moe(dim=D, hidden_dim=8, num_experts=256, top_k=2, router={"aux_loss_coef": 0.0}))
    bias = layer.router_bias
    assert bias.abs().max() <= D**-0.5 and bias.min() < -0.5 * D**-0.5 and bias.max() > 0.5 * D**-0.5


def test_promoe_experts_use_the_layers_activation():
    torch.manual_seed(18)
    gelu = ProMoE(tiny_moe(activation="gelu"), ProMoEConfig())
    relu = ProMoE(tiny_moe(activation="relu"), ProMoEConfig())
    relu.load_state_dict(gelu.state_dict())
    x = torch.randn(5, 8)
    assert not torch.allclose(gelu(x), relu(x)), "the experts' activation is the layer's"


def test_blockffn_rmsnorm_router_scale_is_learned():
    torch.manual_seed(19)
    layer = BlockFFN(tiny_moe(), BlockFFNConfig(norm="rmsnorm"))
    y = layer(torch.randn(6, 8), RoutingContext())
    y.square().sum().backward()
    assert layer.router_scale is not None and layer.router_scale.grad.abs().sum() > 0


# ------------------------------------------------------------------ gaps of the second fresh sample (seed 2)

BAD_3 = [
    ("duo-small-0", lambda: DuoConfig(small_hidden_dim=0), r"variant\.small_hidden_dim=0 must be a positive integer"),
    ("moepp-gate", lambda: MoEPPConfig(gate="x"), r"^variant\.gate='x' is not one of \['linear', 'mlp'\]"),
    ("blockffn-norm", lambda: BlockFFNConfig(norm="x"), r"^variant\.norm='x' is not one of \['rmsnorm', 'sum'\]"),
    ("topp-entropy", lambda: TopPConfig(entropy_coef=-1.0), r"variant\.entropy_coef=-1\.0 must be >= 0"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_3], ids=[b[0] for b in BAD_3])
def test_seed2_bad_configs_name_the_field_and_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("make", [
    lambda: DuoConfig(eval_route="random"),
    lambda: MoDConfig(aux_coef=0.0),
    lambda: MuMoEConfig(rank=1),
], ids=["duo-eval-random", "mod-aux-0", "mumoe-rank-1"])
def test_seed2_boundary_configs_are_accepted(make):
    make()


def test_rope_tables_follow_the_rotary_frequencies():
    cos, sin = rope_tables(4, 8, 10000.0)
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # 1, 0.1, 0.01, 0.001
    for t in range(4):
        assert_close(cos[t].double(), torch.cos(t * inv_freq), f"cos at position {t}", atol=1e-6, rtol=1e-6)
        assert_close(sin[t].double(), torch.sin(t * inv_freq), f"sin at position {t}", atol=1e-6, rtol=1e-6)


def test_mom_memory_norm_uses_eps_1e_5():
    layer = MixtureOfMemories(8, 2, 2, MoMConfig())
    x = torch.full((1, layer.head_dim), 1e-3)
    expected = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5) * layer.norm.weight
    assert_close(layer.norm(x), expected, "RMSNorm with eps 1e-5 (visible on small vectors)")


def test_mod_threshold_evaluation_adds_the_router_weighted_block_output():
    torch.manual_seed(20)
    mod = MixtureOfDepths(8, MoDConfig(eval_mode="threshold")).eval()
    x = torch.randn(2, 5, 8)
    lin = torch.nn.Linear(8, 8)
    y = mod(x, lambda h, c: lin(h), RoutingContext())
    r = mod.router(x)[..., 0]
    assert_close(y, x + ((r.sigmoid() > 0.5) * r)[..., None] * lin(x), "x + [sigmoid(r) > 1/2] r f(x)")


def test_rmoe_errors_on_a_state_of_another_batch_and_records_its_z_loss():
    torch.manual_seed(21)
    layers = [build_ffn("rmoe", tiny_moe(router={"z_loss_coef": 0.2}), {"rnn_dim": 6}, layer_index=i,
                        num_layers=2, name=f"l{i}") for i in range(2)]
    ctx = RoutingContext()
    x = torch.randn(5, 8)
    layers[0](x, ctx)
    first = RoutingContext()
    routing = layers[0].route(x, first)
    assert_close(first.losses["z_loss"], 0.2 * z_loss(routing.logits_TE), "z-loss under its name, coefficient")
    with pytest.raises(ValueError, match=r"^RMoE: the recurrent state holds 5 tokens, this layer got 3; use one "
                                         r"RoutingContext per forward pass$"):
        layers[1](torch.randn(3, 8), ctx)


def test_gmoe_two_dimensional_input_is_one_sequence_and_no_aux_loss_at_coefficient_zero():
    torch.manual_seed(22)
    layer = GraphOfTokensMoE(tiny_moe(router={"aux_loss_coef": 0.0}), GMoEConfig())
    x = torch.randn(6, 8)
    ctx = RoutingContext()
    assert_close(layer(x, ctx), layer(x[None], RoutingContext())[0], "[T, D] is one sequence of T tokens")
    assert "aux_loss" not in ctx.losses and "z_loss" not in ctx.losses, "coefficients 0: no loss entries"


def test_supernet_router_is_nonlinear():
    torch.manual_seed(23)
    layer = build_ffn("supernet", tiny_moe(hidden_dim=12, num_experts=1, top_k=1), {}, layer_index=0,
                      num_layers=1, name="l")
    a, b = torch.randn(4, 1), torch.randn(4, 1)
    f = layer.router
    assert not torch.allclose(f(a) + f(b), f(a + b) + f(torch.zeros(4, 1)), atol=1e-4), "an MLP, not affine"


def test_moma_without_a_context_gives_every_token_modality_zero():
    layer = MoMa(tiny_moe(), MoMaConfig())
    assert torch.equal(layer.modality_ids(None, 5, torch.device("cpu")), torch.zeros(5, dtype=torch.long))


def test_moepp_mlp_gate_has_no_bias_terms():
    layer = MoEPlusPlus(tiny_moe(), MoEPPConfig(num_zero=1, num_copy=1, num_constant=1, gate="mlp"))
    routing = layer.route(torch.zeros(3, 8))
    assert torch.equal(routing.logits_TE, torch.zeros_like(routing.logits_TE)), "zero input, zero logits"


def test_uoe_selector_starts_with_std_one_over_sqrt_dim():
    torch.manual_seed(24)
    D = 256
    layer = UnionOfMLPExperts(tiny_moe(dim=D, hidden_dim=8), UoMEConfig())
    assert abs(layer.selector.weight.std().item() * D**0.5 - 1) < 0.1


def test_promoe_topk_contrastive_assignment_uses_every_choice():
    torch.manual_seed(25)
    x = torch.randn(2, 5, 8)
    layer = ProMoE(tiny_moe(), ProMoEConfig(rcl_coef=1.0, rcl_assignment="topk"), name="l0")
    ctx = RoutingContext()
    layer(x, ctx)
    assert list(ctx.layer_losses["l0"]) == ["aux_loss", "promoe_rcl_loss"], "recorded under the layer's name"
    ids = layer.route(x.reshape(-1, 8)).expert_ids_TK
    expected = routing_contrastive_loss(layer.prototypes, x.reshape(-1, 8), ids, layer.config.rcl_temperature)
    assert_close(ctx.losses["promoe_rcl_loss"], expected, "InfoNCE over all k assignments")


def test_drllm_search_chooses_among_skip_execute_and_repeat():
    def more_is_better(path_BL):  # all-execute (1, 1): -2.1; among 2 applications (2, 0) is lowest
        return -path_BL.float().sum(1) - 0.1 * path_BL[:, 0].float()

    assert torch.equal(search_paths(more_is_better, 1, 2), torch.tensor([[2, 0]])), "repeat block 0, skip block 1"
    assert torch.equal(search_paths(lambda p: torch.zeros(p.shape[0]), 1, 2), torch.tensor([[0, 0]])), \
        "equal losses: the fewest applications"


def test_mumoe_adds_its_shared_experts():
    torch.manual_seed(26)
    layer = MultilinearMoE(tiny_moe(num_shared_experts=1, router={"aux_loss_coef": 0.0}))
    x = torch.randn(4, 8)
    before = layer(x)
    with torch.no_grad():
        for p in layer.shared_experts.parameters():
            p.mul_(2.0)
    assert not torch.allclose(layer(x), before), "the shared expert's output is part of the layer's"


# ------------------------------------------------------------------ gaps of the third fresh sample (seed 3)

BAD_4 = [
    ("duo-anneal-0", lambda: DuoConfig(anneal_steps=0), r"anneal_steps"),
    ("gmoe-similarity", lambda: GMoEConfig(similarity="x"), r"^variant\.similarity='x' is not one of \['learned', "),
    ("gmoe-router", lambda: GraphOfTokensMoE(tiny_moe(router={"capacity_factor": 1.0})),
     r"^graph-of-tokens routing mixes softmax probabilities for a dropless top-k; set router\.capacity_factor=None"),
    ("mofme-router", lambda: MoFME(tiny_moe(router={"capacity_factor": 1.0})),
     r"^MoFME averages softmax probabilities for a dropless top-k; set router\.capacity_factor=None"),
    ("mor-recursions", lambda: MoRConfig(num_recursions=0), r"variant\.num_recursions=0 must be >= 1"),
    ("blockffn-chunk", lambda: BlockFFNConfig(chunk_len=0), r"variant\.chunk_len and variant\.interval must be >= 1"),
    ("drllm-stage-prefix", lambda: DrLLMConfig(stage="x"), r"^model\.depth_routing\.stage='x' is not one of"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_4], ids=[b[0] for b in BAD_4])
def test_seed3_bad_configs_name_the_field_and_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_moma_aux_router_coefficient_zero_is_accepted():
    assert MoMaConfig(aux_router_coef=0.0).aux_router_coef == 0.0


def _stats_keys(layer, run):
    ctx = RoutingContext(collect_stats=True)
    run(layer, ctx)
    return list(ctx.stats)


@pytest.mark.parametrize("make,run,name", [
    (lambda: SwitchHead(16, 2, 1, SwitchHeadConfig(num_experts=2, top_k=1)),
     lambda m, ctx: m(torch.randn(1, 4, 16), *rope_tables(4, 8, 1e4), ctx=ctx),
     "switchhead"),
    (lambda: ChainOfExperts(tiny_moe()), lambda m, ctx: m(torch.randn(3, 8), ctx), "coe"),
    (lambda: MoEPlusPlus(tiny_moe(), MoEPPConfig(num_zero=1, num_copy=1, num_constant=1)),
     lambda m, ctx: m(torch.randn(3, 8), ctx), "moepp"),
    (lambda: SMoEDropout(tiny_moe(router={"aux_loss_coef": 0.0})), lambda m, ctx: m(torch.randn(3, 8), ctx),
     "smoe_dropout"),
], ids=["switchhead", "coe", "moepp", "smoe_dropout"])
def test_default_names_key_the_statistics(make, run, name):
    torch.manual_seed(27)
    layer = make()
    assert layer.name == name
    keys = _stats_keys(layer, run)
    assert keys and all(k == name or k.startswith(name + ".") for k in keys), keys


def test_smha_output_projection_has_the_gpt2_residual_scale():
    torch.manual_seed(28)
    dim, layers = 256, 3
    layer = SelectiveMultiHeadAttention(dim, 4, layers)
    expected = dim**-0.5 / (2 * layers) ** 0.5
    assert abs(layer.w_out.weight.std().item() / expected - 1) < 0.1


def test_routing_attention_commitment_loss_is_the_sum_of_both_sides():
    torch.manual_seed(29)
    coef, Dh = 0.3, 8
    layer = RoutingAttention(8, 1, 1, 8, RoutingAttentionConfig(num_clusters=2, commitment_coef=coef))
    x = torch.randn(2, 8, 8)
    cos, sin = rope_tables(8, Dh, 10000.0)
    ctx = RoutingContext()
    layer.eval()(x, cos, sin, ctx=ctx)
    q, k, _ = layer.w_qkv(x).view(2, 8, 3, 1, Dh).permute(2, 0, 3, 1, 4)
    mu = layer.centroids_HCd[0]
    expected = 0.0
    for side in (q, k):
        n = F.layer_norm(side, (Dh,))
        expected = expected + F.mse_loss(n, mu[(n @ mu.T).argmax(-1)])
    assert_close(ctx.losses["routing_commitment_loss"], coef * expected, "coef (|q - mu_q|^2 + |k - mu_k|^2)")


def test_rmoe_raw_probabilities_when_not_renormalised():
    torch.manual_seed(30)
    layer = RecurrentRouterMoE(tiny_moe(router={"norm_topk_prob": False}), RMoEConfig(rnn_dim=6))
    routing = layer.route(torch.randn(5, 8))
    assert_close(routing.weights_TK, routing.scores_TE.gather(1, routing.expert_ids_TK), "the raw top-k probabilities")


def test_ftp_statistics_report_no_skipping_at_sparsity_zero():
    model = _ftp_model(0.0).eval()
    ctx = RoutingContext(collect_stats=True)
    model(torch.randint(0, 256, (2, 8)), ctx)
    (extra,) = [s.extra for s in ctx.stats.values() if "token_sparsity" in s.extra]
    assert float(extra["token_sparsity"]) == 0.0 and float(extra["skip_ratio_0"]) == 0.0


def test_gmoe_weights_follow_the_routed_scaling_factor():
    x = torch.randn(1, 6, 8)
    weights = []
    for scale in (1.0, 2.5):
        torch.manual_seed(31)
        layer = GraphOfTokensMoE(tiny_moe(router={"routed_scaling_factor": scale}), GMoEConfig())
        weights.append(layer.route(x)[0].weights_TK)
    assert_close(weights[1], 2.5 * weights[0], "weights scaled by routed_scaling_factor")


def test_readme_defaults_one_plan_and_keep_the_layers_config():
    planner = ReadMEPlanner(tiny_moe(router={"aux_loss_coef": 0.0}), ReadMEConfig(per_layer=True))
    assert planner(torch.randn(1, 3, 8)).logits_LTE.shape[0] == 1, "one layer by default, so one plan"
    layer = ReadMEMoE(tiny_moe(), ReadMEConfig(weights="soft"))
    assert layer.config.weights == "soft"


def test_supernet_sandwich_loss_sums_every_sub_architecture():
    torch.manual_seed(32)
    layer = build_ffn("supernet", tiny_moe(hidden_dim=12, num_experts=1, top_k=1), {}, layer_index=0,
                      num_layers=1, name="l")
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "head": head})
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))
    passes = []

    def forward(ctx):
        passes.append((head(layer(x, ctx)), ctx))
        return passes[-1]

    out = training_step_hook(model)(forward, targets, False)
    assert len(passes) == 3
    expected = sum(next_token_ce(logits, targets) + ctx.total_loss() for logits, ctx in passes)
    assert_close(out.loss, expected, "largest + smallest + random")


def test_mofme_adds_its_shared_experts():
    torch.manual_seed(33)
    layer = MoFME(tiny_moe(num_shared_experts=1)).eval()
    x = torch.randn(4, 8)
    before = layer(x)
    with torch.no_grad():
        for p in layer.shared_experts.parameters():
            p.mul_(2.0)
    assert not torch.allclose(layer(x), before), "the shared expert's output is part of the layer's"


def test_moepp_zero_share_counts_assignments_to_zero_experts():
    torch.manual_seed(34)
    layer = MoEPlusPlus(tiny_moe(), MoEPPConfig(num_zero=2, num_copy=1, num_constant=1))
    x = torch.randn(40, 8)
    ctx = RoutingContext(collect_stats=True)
    layer(x, ctx)
    ids = layer.route(x).expert_ids_TK
    zero = (ids >= layer.zero_ids.start).sum() / (ids >= 0).sum()
    assert zero > 0
    assert_close(torch.as_tensor(ctx.stats[layer.name].extra["zero_share"]).float(), zero.float(), "zero share")


# ------------------------------------------------------------------ gaps of the fourth fresh sample (seed 4)

BAD_5 = [
    ("duo-anneal-neg", lambda: DuoConfig(anneal_steps=-1), r"anneal_steps"),
    ("ftp-sparsity-1", lambda: FTPConfig(sparsity=1.0), r"sparsity=1\.0 must be in \[0, 1\)"),
    ("mumoe-hierarchy", lambda: MuMoEConfig(hierarchy_experts=-1), r"hierarchy_experts"),
    ("mumoe-gate-norm", lambda: MuMoEConfig(gate_norm="x"), r"^variant\.gate_norm='x' is not one of"),
    ("moepp-no-zc", lambda: MoEPPConfig(num_zero=0, num_copy=0, num_constant=0),
     r"^MoE\+\+ needs at least one zero-computation expert; raise variant\.num_zero"),
    ("promoe-cosine", lambda: ProMoE(tiny_moe(), ProMoEConfig(gate="cosine")),
     r"^variant\.gate='cosine' uses raw cosines as weights; set router\.norm_topk_prob=false$"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_5], ids=[b[0] for b in BAD_5])
def test_seed4_bad_configs_name_the_field_and_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("make", [
    lambda: SwitchHeadConfig(num_heads=1, head_dim=1),
    lambda: DuoConfig(anneal_steps=1),
    lambda: RMoEConfig(rnn_dim=1),
], ids=["switchhead-1", "duo-anneal-1", "rmoe-rnn-1"])
def test_seed4_boundary_configs_are_accepted(make):
    make()


def test_switchhead_selection_entropy_is_zero_for_a_uniform_batch_mean():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    assert abs(float(selection_entropy_loss(logits))) < 1e-6, "each token peaked, the batch mean uniform"
    peaked = torch.tensor([[5.0, 0.0, 0.0]] * 3)
    p = torch.tensor([5.0, 0.0, 0.0]).softmax(0)
    assert_close(selection_entropy_loss(peaked), math.log(3) + (p * p.log()).sum(), "log E - H(mean)")


def test_mom_beta_gate_starts_with_std_one_over_sqrt_dim():
    torch.manual_seed(35)
    dim = 64
    layer = MixtureOfMemories(dim, 4, 2, MoMConfig())
    assert abs(layer.w_beta_NDH.std().item() * dim**0.5 - 1) < 0.1


def test_duo_active_params_skip_costs_nothing_and_budget_counts_as_auxiliary():
    for width in (1, 2, 3):  # parameter totals with every remainder modulo 3
        layer = DuoFFN(tiny_moe(num_experts=1, top_k=1, activation="gelu"), DuoConfig(small_hidden_dim=width))
        small = sum(p.numel() for p in layer.small.parameters())
        big = sum(p.numel() for p in layer.big.parameters())
        assert layer.active_params() == (0 + small + big) // 3, "the mean over skip (0), small and big"
    torch.manual_seed(36)
    routed = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3, routing="router"))
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": routed, "head": head}).train()
    x, targets = torch.randn(2, 4, 8), torch.randint(0, 11, (2, 4))
    out = training_step_hook(model)(lambda ctx: (head(routed(x, ctx)), ctx), targets, False)
    assert_close(out.loss, out.ce + out.aux, "loss = CE + auxiliary, the budget loss included in both")


def test_duo_statistics_count_the_routes():
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3), name="l")
    ctx = RoutingContext(collect_stats=True)
    ctx.state["duo.routes"] = {"l": torch.tensor([0, 2, 2, 1])}
    layer(torch.randn(4, 8), ctx)
    assert torch.equal(ctx.stats["l"].counts_E, torch.tensor([1, 1, 2]))


def test_rmoe_cell_option_picks_the_recurrent_cell():
    assert isinstance(RecurrentRouterMoE(tiny_moe(), RMoEConfig(rnn_dim=6, cell="gru")).cell, torch.nn.GRUCell)
    assert isinstance(RecurrentRouterMoE(tiny_moe(), RMoEConfig(rnn_dim=6, cell="rnn")).cell, torch.nn.RNNCell)


def test_rmoe_layer_scope_first_choice_aux():
    torch.manual_seed(37)
    moe = tiny_moe(router={"aux_loss_coef": 0.1, "aux_loss_first_choice": True})
    layer = RecurrentRouterMoE(moe, RMoEConfig(rnn_dim=6, aux_scope="layer"))
    x = torch.randn(6, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    routing = layer.route(x)
    expected = 0.1 * load_balancing_loss(routing.scores_TE, routing.expert_ids_TK, first_choice=True)
    assert_close(ctx.losses["aux_loss"], expected, "GShard's first-choice f")


def test_layer_losses_are_keyed_by_the_layer():
    torch.manual_seed(38)
    gmoe = GraphOfTokensMoE(tiny_moe(router={"z_loss_coef": 0.1}), GMoEConfig(), name="g")
    ctx = RoutingContext()
    gmoe(torch.randn(1, 5, 8), ctx)
    assert "z_loss" in ctx.layer_losses["g"]
    mod = MixtureOfDepths(8, MoDConfig(capacity=0.5, aux_coef=0.3), name="m")
    ctx = RoutingContext()
    mod(torch.randn(2, 4, 8), lambda h, c: h, ctx)
    assert ctx.layer_losses["m"], "MoD's router loss under the layer's name"


def test_readme_planner_takes_flat_token_embeddings_as_one_sequence():
    torch.manual_seed(39)
    planner = ReadMEPlanner(tiny_moe(router={"aux_loss_coef": 0.0}), ReadMEConfig())
    x = torch.randn(5, 8)
    assert_close(planner(x).logits_LTE, planner(x[None]).logits_LTE, "[T, D] = one sequence of T tokens")


def test_mofme_router_follows_the_configured_router():
    torch.manual_seed(40)
    layer = MoFME(tiny_moe(router={"norm_topk_prob": False}))
    assert layer.router.config.norm_topk_prob is False


def test_mor_token_choice_router_has_no_bias():
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3, routing="token_choice"))
    assert all(r.bias is None for r in mor.routers)


def test_residual_moe_default_name_keys_its_statistics():
    from moekit.layers.variants.pr_moe import ResidualMoE
    layer = ResidualMoE(tiny_moe())
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(3, 8), ctx)
    assert layer.name == "residual_moe" and list(ctx.stats) and all(k.startswith("residual_moe") for k in ctx.stats)


# ------------------------------------------------------------------ gaps of the fifth fresh sample (seed 5)

BAD_6 = [
    ("rmoe-cell", lambda: RMoEConfig(cell="lstm"), r"^variant\.cell='lstm' is not one of \['gru', 'rnn'\]"),
    ("mumoe-factorization", lambda: MuMoEConfig(factorization="x"),
     r"^variant\.factorization='x' is not one of \['cp', 'tr'\]"),
    ("moma-modalities", lambda: MoMaConfig(num_modalities=0), r"variant\.num_modalities=0 must be a positive integer"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_6], ids=[b[0] for b in BAD_6])
def test_seed5_bad_configs_name_the_field_and_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_ftp_router_of_width_one_is_accepted():
    assert FTPConfig(hidden=1).hidden == 1


def test_variant_input_of_the_wrong_width_names_the_shape():
    with pytest.raises(ValueError, match=r"expected inputs of shape \[\.\.\., 8\], got \(3, 5\); check MoEConfig\.dim"):
        ProMoE(tiny_moe(), ProMoEConfig())(torch.randn(3, 5))


def test_wide_heads_rotate_their_first_dimensions_with_the_whole_table():
    torch.manual_seed(41)
    cos, sin = rope_tables(4, 4, 10000.0)  # R = 2 frequencies, S = 4 = 2R
    x = torch.randn(1, 2, 4, 8)  # 8-wide heads: the first 4 dimensions rotate, the rest pass
    out = apply_rope_any_width(x, cos, sin)
    assert_close(out[..., :4], apply_rope(x[..., :4], cos, sin), "partial rotary")
    assert torch.equal(out[..., 4:], x[..., 4:])


def test_initial_scales_of_mom_supernet_and_mumoe():
    torch.manual_seed(42)
    dim = 64
    mom = MixtureOfMemories(dim, 4, 2, MoMConfig())
    assert abs(mom.w_v_NDD.std().item() * dim**0.5 - 1) < 0.1
    sup = build_ffn("supernet", tiny_moe(dim=dim, hidden_dim=64, num_experts=1, top_k=1), {}, layer_index=0,
                    num_layers=1, name="s")
    assert abs(sup.w_gate_MFD.std().item() * dim**0.5 - 1) < 0.1
    cp = CPMultilinear(4, dim, 8, 16)
    bound = dim**-0.5
    assert cp.u_in.abs().max() <= bound and cp.u_in.min() < -0.5 * bound and cp.u_in.max() > 0.5 * bound


def test_duo_router_softmax_divides_by_the_temperature():
    torch.manual_seed(43)
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3, routing="router",
                                                              temperature=4.0)).train()
    x = torch.randn(5, 8)
    weights, _ = layer.route_weights(x, None)
    assert_close(weights, (layer.router(x) / 4.0).softmax(-1), "softmax(logits / tau)")


def test_mofme_first_choice_aux_and_moma_parameter_counts():
    torch.manual_seed(44)
    x = torch.randn(6, 8)
    values = []
    for first in (False, True):
        torch.manual_seed(45)
        layer = MoFME(tiny_moe(router={"aux_loss_first_choice": first})).eval()
        ctx = RoutingContext()
        layer(x, ctx)
        values.append(float(ctx.losses["aux_loss"].detach()))
    assert values[0] != values[1], "aux_loss_first_choice changes which choices count"
    topk = MoMa(tiny_moe(), MoMaConfig(routing="topk"))
    ec = MoMa(tiny_moe(), MoMaConfig(routing="expert_choice"))
    assert len(topk.aux_routers) == 0 and len(ec.aux_routers) == 2, "auxiliary routers for expert choice only"
    aux = ec.aux_routers[0].weight.numel()
    assert ec.active_params() - topk.active_params() == aux, "one auxiliary router per token, none for top-k"


def test_smoe_dropout_and_promoe_renormalise_their_top_k():
    torch.manual_seed(46)
    layer = SMoEDropout(tiny_moe(router={"aux_loss_coef": 0.0}))
    w = layer.route(torch.randn(5, 8)).weights_TK
    assert_close(w.sum(-1), torch.ones(5), "SMoE-Dropout renormalises its top-k")
    pro = ProMoE(tiny_moe(), ProMoEConfig(gate="softmax"))
    w = pro.route(torch.randn(5, 8)).weights_TK
    assert_close(w.sum(-1), torch.ones(5), "ProMoE's softmax gate renormalises its top-k by default")


def test_mor_token_choice_reports_the_mean_fraction_processed():
    torch.manual_seed(47)
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3, routing="token_choice"), name="m")
    ctx = RoutingContext(collect_stats=True)
    mor(torch.randn(2, 6, 8), lambda h, c: h, ctx)
    assert 0.0 < float(ctx.stats["m"].extra["fraction_processed"]) <= 1.0

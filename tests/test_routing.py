"""Router behaviour: selection, capacity, expert choice, balancing losses, auxiliary-loss-free bias."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from moekit import MoE, MoEConfig, Router, RouterConfig, RoutingContext, update_expert_biases
from moekit.routing import capacity, limit_capacity, load_balancing_loss, select_topk, z_loss

from .reference import assert_close, dense_ffn


def test_topk_weights_renormalised_and_match_softmax_over_selected_logits():
    logits = torch.randn(6, 5)
    ids, w = select_topk(logits.softmax(-1), 2)
    assert_close(w.sum(-1), torch.ones(6), "weights sum")
    assert_close(w, logits.gather(1, ids).softmax(-1), "softmax over the selected logits")
    _, raw = select_topk(logits.softmax(-1), 2, normalize=False)
    assert_close(raw, logits.softmax(-1).gather(1, ids), "unnormalised weights are the probabilities")


def test_group_limited_topk_only_uses_kept_groups():
    scores = torch.tensor([[0.9, 0.1, 0.85, 0.8, 0.2, 0.3, 0.0, 0.05]])
    # groups of 2: sums of top-2 = [1.0, 1.65, 0.5, 0.05]; keep 1 group -> experts 2, 3 only
    ids, _ = select_topk(scores, 2, num_groups=4, topk_groups=1)
    assert sorted(ids[0].tolist()) == [2, 3]
    ids_max, _ = select_topk(scores, 2, num_groups=4, topk_groups=1, group_score="max")
    assert sorted(ids_max[0].tolist()) == [0, 1]  # the group holding the single best expert


def test_capacity_priority_first_choices_then_sequence_order():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    w = torch.ones(4, 2)
    kept, kw = limit_capacity(ids, w, num_experts=3, capacity_per_expert=2)
    # expert 0 takes the first choices of tokens 0 and 1 (token 2's first choice and token 3's second drop);
    # expert 1 takes token 3's first choice before token 0's second, so token 1's second choice drops
    assert kept.tolist() == [[0, 1], [0, -1], [-1, 2], [1, -1]]
    assert kw.tolist() == [[1, 1], [1, 0], [0, 1], [1, 0]]
    assert capacity(num_tokens=10, num_experts=4, top_k=2, capacity_factor=1.25) == math.ceil(1.25 * 2 * 10 / 4)


def test_dropped_tokens_get_exactly_zero_moe_output():
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1, router=RouterConfig(capacity_factor=0.25)))
    x = torch.randn(16, 8)
    routing = moe.route(x)
    dropped = (routing.expert_ids_TK < 0).all(-1)
    assert dropped.any()
    assert torch.equal(moe(x)[dropped], torch.zeros(int(dropped.sum()), 8))


def test_unlimited_capacity_equals_dropless():
    cfg = MoEConfig(dim=12, hidden_dim=10, num_experts=4, top_k=2)
    moe = MoE(cfg)
    big = MoE(replace(cfg, router=RouterConfig(capacity_factor=float(cfg.num_experts))))
    big.load_state_dict(moe.state_dict())
    x = torch.randn(2, 9, 12)
    assert torch.equal(big(x), moe(x))


def test_one_expert_top1_equals_dense_ffn():
    for activation in ("swiglu", "gelu", "relu"):
        moe = MoE(MoEConfig(dim=10, hidden_dim=14, num_experts=1, top_k=1, activation=activation))
        b = moe.experts
        x = torch.randn(3, 5, 10)
        w_gate = b.w_gate[0] if b.gated else None
        assert_close(moe(x), dense_ffn(x, w_gate, b.w_up[0], b.w_down[0], activation), activation)


def test_shared_experts_only_layer_equals_mlp():
    moe = MoE(MoEConfig(dim=10, hidden_dim=6, num_experts=3, top_k=1, num_shared_experts=2))
    with torch.no_grad():
        moe.experts.w_down.zero_()  # routed experts contribute nothing: only the shared MLP remains
    s = moe.shared_experts
    x = torch.randn(7, 10)
    assert_close(moe(x), dense_ffn(x, s.w_gate, s.w_up, s.w_down), "shared")
    assert s.w_up.shape == (12, 10)


def test_uniform_router_gives_aux_loss_alpha():
    T, E, K = 64, 8, 2
    probs = torch.full((T, E), 1.0 / E)
    ids = torch.arange(T * K).view(T, K) % E  # perfectly even assignment
    assert_close(load_balancing_loss(probs, ids), torch.tensor(1.0), "unweighted aux loss")
    router = Router(16, E, K, RouterConfig(aux_loss_coef=0.01))
    with torch.no_grad():
        router.weight.zero_()  # all logits 0 -> uniform softmax
    ctx = RoutingContext()
    router(torch.randn(T, 16), ctx)
    # top-k of ties picks the same experts for every token, so f is concentrated: E * sum f_i / E = 1 still
    assert_close(ctx.losses["aux_loss"], torch.tensor(0.01), "alpha * 1")


def test_aux_loss_sequence_level_averages_per_sequence():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    ids = torch.tensor([[0], [0], [1], [1]])
    batch = load_balancing_loss(probs, ids, num_sequences=1)
    seq = load_balancing_loss(probs, ids, num_sequences=2)
    assert_close(batch, torch.tensor(1.0), "batch level is balanced overall")
    assert_close(seq, torch.tensor(2 * 0.9), "each sequence is imbalanced: E * f * P = 2 * 1 * 0.9")


def test_zero_logits_give_z_loss_c_log_e_squared():
    E, c = 8, 1e-3
    router = Router(4, E, 2, RouterConfig(z_loss_coef=c, aux_loss_coef=0))
    with torch.no_grad():
        router.weight.zero_()
    ctx = RoutingContext()
    router(torch.randn(5, 4), ctx)
    assert_close(ctx.losses["z_loss"], torch.tensor(c * math.log(E) ** 2), "z-loss")
    assert "aux_loss" not in ctx.losses
    assert_close(z_loss(torch.zeros(3, E)), torch.tensor(math.log(E) ** 2), "unweighted")


@pytest.mark.parametrize("loss,coef_field", [("aux_loss", "aux_loss_coef"), ("z_loss", "z_loss_coef")])
def test_loss_coefficient_applied_and_gradient_reaches_router_only(loss, coef_field):
    x = torch.randn(2, 10, 12)
    values = {}
    for coef in (0.01, 0.03):
        router_cfg = RouterConfig(**{"aux_loss_coef": 0.0, "z_loss_coef": 0.0, coef_field: coef})
        torch.manual_seed(1)
        moe = MoE(MoEConfig(dim=12, hidden_dim=8, num_experts=4, top_k=2, router=router_cfg))
        ctx = RoutingContext()
        moe(x, ctx)
        values[coef] = ctx.losses[loss]
        ctx.total_loss().backward()
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in moe.experts.parameters()), "balancing losses must not touch experts"
    assert_close(values[0.03], 3 * values[0.01], f"{loss} scales with its coefficient")


def test_aux_free_bias_changes_selection_not_weights():
    router = Router(8, 4, 2, RouterConfig(score_func="sigmoid", bias_update_rate=1e-3, aux_loss_coef=0))
    x = torch.randn(20, 8)
    r0 = router(x)
    with torch.no_grad():
        router.expert_bias[:] = torch.tensor([5.0, 0.0, 0.0, -5.0])
    r1 = router(x)
    assert (r1.expert_ids_TK == 0).any(-1).all() and not (r1.expert_ids_TK == 3).any()
    assert not torch.equal(r0.expert_ids_TK, r1.expert_ids_TK)
    # the weights are the unbiased scores of the selected experts, renormalised
    expected = r1.scores_TE.gather(1, r1.expert_ids_TK)
    assert_close(r1.weights_TK, expected / expected.sum(-1, keepdim=True), "weights ignore the bias")
    with torch.no_grad():
        router.expert_bias += 3.0  # a constant shift changes nothing
    r2 = router(x)
    assert torch.equal(r2.expert_ids_TK, r1.expert_ids_TK) and torch.equal(r2.weights_TK, r1.weights_TK)


def test_aux_free_bias_step_moves_overloaded_expert_down_by_gamma():
    gamma = 1e-3
    moe = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=1,
                        router=RouterConfig(score_func="sigmoid", bias_update_rate=gamma)))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0  # expert 2 takes every token
    moe.train()
    moe(torch.ones(6, 8))
    assert moe.router.expert_bias.abs().sum() == 0, "forward must never change the bias"
    assert moe.router.pending_counts.tolist() == [0, 0, 6, 0]
    assert update_expert_biases(moe) == 1
    assert_close(moe.router.expert_bias, torch.tensor([gamma, gamma, -gamma, gamma]), "sign update")
    assert moe.router.pending_counts.sum() == 0
    moe.eval()
    moe(torch.ones(6, 8))
    assert moe.router.pending_counts.sum() == 0, "eval forwards do not count"


def test_expert_choice_each_expert_takes_capacity_tokens():
    router = Router(8, 4, 2, RouterConfig(selector="expert_choice", capacity_factor=1.0))
    routing = router(torch.randn(10, 8))
    counts = routing.counts_E()
    assert counts.tolist() == [capacity(10, 4, 2, 1.0)] * 4
    ids = routing.expert_ids_TK
    assert ((ids == torch.arange(4)) | (ids == -1)).all()
    assert torch.equal(routing.weights_TK == 0, ids == -1)


def test_jitter_only_in_training():
    router = Router(8, 4, 2, RouterConfig(jitter_eps=0.1))
    x = torch.randn(5, 8)
    router.eval()
    assert torch.equal(router.logits(x), router.logits(x))
    router.train()
    assert not torch.equal(router.logits(x), router.logits(x))


def test_stats_table_reports_load():
    moe = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=1, router=RouterConfig(capacity_factor=0.5)),
              name="layer0")
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[1] = 1.0
    ctx = RoutingContext(collect_stats=True)
    moe(torch.ones(8, 8), ctx)
    row = ctx.stats_summary()["layer0"]
    # capacity = ceil(0.5 * 8 / 4) = 1: expert 1 keeps one token, 7 of 8 slots dropped, 3 experts dead
    assert row["dead_experts"] == 3 and row["drop_rate"] == 7 / 8 and row["tokens"] == 1
    assert row["load_cv"] == pytest.approx(math.sqrt(3))
    assert "layer0" in ctx.stats_table()


def test_router_runs_in_float32_for_bfloat16_inputs():
    router = Router(8, 4, 2)
    routing = router(torch.randn(5, 8).bfloat16())
    assert routing.logits_TE.dtype == torch.float32 and routing.weights_TK.dtype == torch.float32

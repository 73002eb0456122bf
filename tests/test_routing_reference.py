"""Routing pieces against readable per-token loops, at sizes where shortcuts would show (many assignments,
groups of one expert, unused last experts, sequences of two tokens, sigmoid scores summing below one).
Written to kill the survivors of a mutation run over ``moekit/routing`` (see docs/testing.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig, Router, RouterConfig, RoutingContext
from moekit.routing import limit_capacity, load_balancing_loss, select_topk
from moekit.routing.blockffn import chunk_sparsity_loss, chunk_union_fraction, locality_loss, relu_router_weights
from moekit.routing.heterogeneous import heterogeneous_balance_loss, heterogeneous_capacities, limit_capacity_per_expert
from moekit.routing.topp import router_entropy, select_topp

from .reference import assert_close


def _capacity_loop(ids_TK: torch.Tensor, cap_E: list[int]) -> torch.Tensor:
    """Keep slots in GShard priority (all first choices in token order, then all second choices, ...)."""
    T, K = ids_TK.shape
    used = [0] * len(cap_E)
    keep = torch.zeros(T, K, dtype=torch.bool)
    for k in range(K):
        for t in range(T):
            e = int(ids_TK[t, k])
            if e >= 0 and used[e] < cap_E[e]:
                used[e] += 1
                keep[t, k] = True
    return keep


@pytest.mark.parametrize("T,E,K", [(200, 4, 2), (9, 5, 3), (1, 3, 1)])
def test_limit_capacity_matches_priority_loop_on_many_assignments(T, E, K):
    g = torch.Generator().manual_seed(T)
    ids, w = select_topk(torch.rand(T, E, generator=g), K, normalize=False)
    for cap in (1, max(1, T * K // (2 * E)), T):
        kept, kw = limit_capacity(ids, w, E, cap)
        keep = _capacity_loop(ids, [cap] * E)
        assert torch.equal(kept, ids.masked_fill(~keep, -1))
        assert torch.equal(kw, w.masked_fill(~keep, 0.0))


@pytest.mark.parametrize("T,E,K", [(200, 5, 2), (11, 4, 3)])
def test_limit_capacity_per_expert_matches_priority_loop(T, E, K):
    g = torch.Generator().manual_seed(E)
    ids, w = select_topk(torch.rand(T, E, generator=g), K, normalize=False)
    ids[::7, -1] = -1  # some empty slots (dynamic k) must be skipped, never counted
    w = w.masked_fill(ids < 0, 0.0)
    cap_E = torch.tensor([(e * 37 + 3) % (T // 2 + 2) for e in range(E)])
    kept, kw = limit_capacity_per_expert(ids, w, cap_E)
    keep = _capacity_loop(ids, cap_E.tolist())
    assert torch.equal(kept, ids.masked_fill(~keep, -1))
    assert torch.equal(kw, w.masked_fill(~keep, 0.0))


def test_heterogeneous_balance_loss_by_hand_with_unused_last_experts():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.6, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]])
    ids = torch.tensor([[0, 1], [1, 2], [0, -1]])  # experts 3 and 4 (the zero-computation ones) unused
    f = torch.tensor([2, 2, 1, 0, 0]) / 3
    eta = torch.tensor([1, 1, 1, 0.25, 0.25])
    expected = (eta * f * probs.mean(0)).sum()
    assert_close(heterogeneous_balance_loss(probs, ids, num_ffn=3, tau=0.25), expected, "MoE++ eq. 7")
    ids_zc = torch.tensor([[3, 4], [4, 1], [3, 0]])
    f = torch.tensor([1, 1, 0, 2, 2]) / 3
    assert_close(heterogeneous_balance_loss(probs, ids_zc, num_ffn=3, tau=0.25), (eta * f * probs.mean(0)).sum(),
                 "zero-computation experts weighted by tau")


def test_heterogeneous_capacities_floor_at_one():
    assert heterogeneous_capacities(1, 8, 4, 0.5, 1.0) == (1, 1)  # 0.5 / 8 and 1 / 8 round up to 1
    assert heterogeneous_capacities(24, 4, 2, 1.0, 1.0) == (4, 4)
    assert heterogeneous_capacities(24, 4, 2, 0.5, 1.0) == (3, 6)


def test_group_limited_topk_matches_a_loop_over_tokens():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(13, 12, generator=g)
    for num_groups, keep, score in [(4, 2, "top2_sum"), (4, 1, "max"), (12, 3, "top2_sum"), (3, 2, "max")]:
        ids, _ = select_topk(scores, 3, num_groups=num_groups, topk_groups=keep, group_score=score)
        size = 12 // num_groups
        for t in range(13):
            groups = scores[t].view(num_groups, size)
            if score == "top2_sum" and size >= 2:
                value = groups.topk(2, dim=-1).values.sum(-1)
            else:  # a group of one expert scores its only expert
                value = groups.amax(-1)
            allowed = [e for gi in value.topk(keep).indices.tolist() for e in range(gi * size, (gi + 1) * size)]
            masked = torch.full((12,), -1.0)
            masked[allowed] = scores[t, allowed]
            assert sorted(ids[t].tolist()) == sorted(masked.topk(3).indices.tolist()), (num_groups, keep, score, t)


def test_batch_level_aux_loss_ignores_sequences_and_sequence_level_uses_them():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8)
    losses = {}
    for level in ("batch", "sequence"):
        torch.manual_seed(1)
        moe = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, engine="reference",
                            router=RouterConfig(aux_loss_coef=1.0, aux_loss_level=level)), name="l2")
        ctx = RoutingContext()
        moe(x, ctx)
        r = moe.route(x.reshape(-1, 8))
        expected = load_balancing_loss(r.scores_TE, r.expert_ids_TK, 3 if level == "sequence" else 1)
        assert_close(ctx.losses["aux_loss"], expected, level)
        assert ctx.layer_losses["l2"]["aux_loss"] is ctx.losses["aux_loss"]
        losses[level] = ctx.losses["aux_loss"]
    assert not torch.allclose(losses["batch"], losses["sequence"])


def test_losses_are_recorded_per_layer_and_absent_when_disabled():
    router = Router(6, 4, 2, RouterConfig(aux_loss_coef=0.0, z_loss_coef=0.0))
    ctx = RoutingContext()
    router(torch.randn(5, 6), ctx, layer="blocks.1")
    assert ctx.losses == {} and ctx.layer_losses == {}
    router = Router(6, 4, 2, RouterConfig(aux_loss_coef=0.1, z_loss_coef=0.2))
    ctx = RoutingContext()
    router(torch.randn(5, 6), ctx, layer="blocks.1")
    assert set(ctx.layer_losses["blocks.1"]) == {"aux_loss", "z_loss"}


def test_sigmoid_aux_loss_normalises_scores_that_sum_below_one():
    router = Router(4, 6, 2, RouterConfig(score_func="sigmoid", aux_loss_coef=1.0))
    with torch.no_grad():
        router.weight.fill_(-2.0)
    x = torch.rand(8, 4) + 1.0  # logits <= -8: every sigmoid score is tiny, their sum far below 1
    ctx = RoutingContext()
    routing = router(x, ctx)
    s = routing.scores_TE
    assert s.sum(-1).max() < 0.1
    assert_close(ctx.losses["aux_loss"], load_balancing_loss(s / s.sum(-1, keepdim=True), routing.expert_ids_TK),
                 "P from s / sum(s)")


def test_z_loss_is_over_experts_per_token():
    logits = torch.randn(5, 3)
    expected = torch.stack([torch.logsumexp(row, 0) ** 2 for row in logits]).mean()
    router = Router(2, 3, 1, RouterConfig(z_loss_coef=1.0, aux_loss_coef=0.0))
    ctx = RoutingContext()
    router(torch.randn(5, 2), ctx, logits_TE=logits)
    assert_close(ctx.losses["z_loss"], expected, "z-loss")


def _locality_loop(logits_BSE, s=100.0):
    terms = [F.binary_cross_entropy_with_logits(s * logits_BSE[b, t - 1], torch.sigmoid(s * logits_BSE[b, t]),
                                                reduction="none")
             for b in range(logits_BSE.shape[0]) for t in range(1, logits_BSE.shape[1])]
    return torch.stack(terms).mean()


def test_blockffn_losses_defaults_and_short_sequences():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3) * 0.03  # sequences of two tokens: one pair each
    assert_close(locality_loss(logits), _locality_loop(logits), "default steepness 100, S = 2")
    assert locality_loss(logits[:, :1]) == 0
    q = torch.rand(1, 130, 4)
    q = q / q.sum(-1, keepdim=True)
    padded = torch.cat([q, q.new_zeros(1, 62, 4)], 1).view(1, 3, 64, 4)
    expected = (1 - torch.exp(torch.log(1 - padded + 1e-5).sum(2))).mean()
    assert_close(chunk_sparsity_loss(q), expected, "default chunk length 64")
    active = torch.zeros(1, 4, 3, dtype=torch.bool)
    active[0, 0, 0] = active[0, 3, 2] = True  # chunks of 2: {0}, {2} -> 1/3 of the experts each
    assert chunk_union_fraction(active, 2) == pytest.approx(1 / 3)
    assert chunk_union_fraction(active, 4) == pytest.approx(2 / 3)
    assert math.isclose(chunk_union_fraction(torch.ones(2, 3, 5, dtype=torch.bool), 2).item(), 1.0)


def test_jitter_multiplies_inputs_by_a_uniform_factor_in_training_only():
    router = Router(1, 1, 1, RouterConfig(jitter_eps=0.5, aux_loss_coef=0.0))
    with torch.no_grad():
        router.weight.fill_(1.0)
    x = torch.ones(4000, 1)
    ratio = router.logits(x)[:, 0]
    assert ratio.min() >= 0.5 and ratio.max() <= 1.5  # x * U(1 - eps, 1 + eps), not x / U(...)
    assert ratio.min() < 0.6 and ratio.max() > 1.4 and abs(ratio.mean().item() - 1.0) < 0.03
    router.eval()
    assert torch.equal(router.logits(x)[:, 0], torch.ones(4000))
    no_jitter = Router(1, 1, 1, RouterConfig(jitter_eps=0.0, aux_loss_coef=0.0))
    assert torch.equal(no_jitter.logits(x), F.linear(x, no_jitter.weight))


def test_router_logit_bias_default_layer_name_and_selection_bias_switch():
    torch.manual_seed(0)
    router = Router(6, 4, 2, RouterConfig(use_logit_bias=True, aux_loss_coef=0.1))
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    x = torch.randn(5, 6)
    assert_close(router.logits(x), x @ router.weight.t() + router.bias, "logits = W x + b")
    ctx = RoutingContext()
    router(x, ctx)
    assert set(ctx.layer_losses) == {"moe"}  # the default layer name
    plain = Router(6, 4, 2, RouterConfig(aux_loss_coef=0.0))  # a loaded bias is ignored unless asked for
    with torch.no_grad():
        plain.expert_bias.copy_(torch.tensor([100.0, 0.0, 0.0, 100.0]))
    ids = plain(x).expert_ids_TK
    assert torch.equal(ids, select_topk(plain.scores(plain.logits(x)), 2)[0])
    used = Router(6, 4, 2, RouterConfig(aux_loss_coef=0.0, use_selection_bias=True))
    used.load_state_dict(plain.state_dict())
    assert torch.equal(used(x).expert_ids_TK.sort(-1).values, torch.tensor([[0, 3]] * 5))


@pytest.mark.parametrize("num_groups,topk_groups,group_score", [(4, 2, "top2_sum"), (4, 2, "max"), (2, 1, "max")])
def test_router_passes_every_selection_setting(num_groups, topk_groups, group_score):
    torch.manual_seed(0)
    cfg = RouterConfig(num_groups=num_groups, topk_groups=topk_groups, group_score=group_score,
                       norm_topk_prob=False, routed_scaling_factor=2.5, aux_loss_coef=0.0)
    router = Router(6, 8, 3, cfg)
    x = torch.randn(40, 6)
    routing = router(x)
    ids, w = select_topk(routing.scores_TE, 3, num_groups=num_groups, topk_groups=topk_groups,
                         group_score=group_score, normalize=False, scale=2.5)
    assert torch.equal(routing.expert_ids_TK, ids)
    assert_close(routing.weights_TK, w, "raw probabilities times the scaling factor")
    assert_close(routing.weights_TK, 2.5 * routing.scores_TE.gather(1, ids), "by hand")


def test_select_topk_scale_and_default_groups():
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.3, 0.3, 0.1, 0.3]])
    for scale in (2.0, 2.5, 0.5):
        ids, w = select_topk(p, 2, normalize=False, scale=scale)
        assert_close(w, scale * p.gather(1, ids), f"scale {scale}")
    ids, _ = select_topk(torch.tensor([[0.3, 0.0, 0.29, 0.28]]), 2, num_groups=2)  # topk_groups defaults to 1
    assert sorted(ids[0].tolist()) == [2, 3]  # group sums 0.3 vs 0.57: one group kept, not the best 2 experts


def test_expert_choice_default_capacity_factor_is_one():
    torch.manual_seed(0)
    router = Router(6, 4, 2, RouterConfig(selector="expert_choice", aux_loss_coef=0.0))
    routing = router(torch.randn(10, 6))
    per_expert = (routing.expert_ids_TK >= 0).sum(0)
    assert per_expert.tolist() == [5] * 4  # ceil(1.0 * K * T / E) = ceil(2 * 10 / 4) = 5 tokens each
    r2 = Router(6, 4, 2, RouterConfig(selector="expert_choice", capacity_factor=0.5, aux_loss_coef=0.0))
    assert (r2(torch.randn(10, 6)).expert_ids_TK >= 0).sum(0).tolist() == [3] * 4


def test_aux_free_counts_accumulate_over_forwards():
    router = Router(6, 4, 2, RouterConfig(bias_update_rate=0.1, aux_loss_coef=0.0))
    x1, x2 = torch.randn(7, 6), torch.randn(5, 6)
    c1 = torch.bincount(router(x1).expert_ids_TK.reshape(-1), minlength=4).float()
    c2 = torch.bincount(router(x2).expert_ids_TK.reshape(-1), minlength=4).float()
    assert torch.equal(router.pending_counts, c1 + c2)


def test_load_balancing_loss_one_token_and_ragged_error():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert_close(load_balancing_loss(p, torch.tensor([[0]])), torch.tensor(3 * 0.7), "f = 1 for the only token")
    with pytest.raises(ValueError, match="equal sequences"):
        load_balancing_loss(torch.full((5, 3), 1 / 3), torch.zeros(5, 1, dtype=torch.long), num_sequences=2)


def test_blockffn_router_weights_sum_and_rmsnorm():
    logits = torch.tensor([[1.0, -1.0, 3.0, 0.0], [-1.0, -2.0, -3.0, -4.0], [2.0, -1.0, -1.0, 2.0]])
    r, a = relu_router_weights(logits, None, "sum")
    assert torch.equal(r, logits.clamp_min(0))
    assert_close(a, torch.tensor([[0.25, 0.0, 0.75, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.5]]),
                 "r / sum r, per token")
    tiny = torch.tensor([[1e-3, 0.0, 0.0, 0.0]])  # mean r^2 = 2.5e-7: the 1e-6 epsilon of the default RMSNorm shows
    assert_close(relu_router_weights(tiny, None)[1], tiny * torch.rsqrt(torch.tensor(2.5e-7 + 1e-6)), "default")
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0])
    _, a = relu_router_weights(logits, scale, "rmsnorm")
    rms = torch.sqrt((torch.tensor([1.0, 0.0, 3.0, 0.0]) ** 2).mean() + 1e-6)
    assert_close(a[0], torch.tensor([1.0, 0.0, 3.0, 0.0]) / rms * scale, "RMSNorm with scale")
    assert torch.equal(a[1], torch.zeros(4))
    _, a = relu_router_weights(logits, None, "rmsnorm")
    assert_close(a[0], torch.tensor([1.0, 0.0, 3.0, 0.0]) / rms, "RMSNorm without scale")


def test_select_topp_exact_ids_weights_and_width():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.8, 0.05, 0.05], [0.3, 0.25, 0.25, 0.2]])
    ids, w = select_topp(p, 0.6)
    # token 0: 0.5 then 0.3 (0.5 <= 0.6) then 0.15 (0.8 > 0.6 stops); token 1: 0.8 alone; token 2: three
    assert ids.tolist() == [[0, 1, -1], [1, -1, -1], [0, 1, 2]] or ids.tolist() == [[0, 1, -1], [1, -1, -1], [0, 2, 1]]
    assert_close(w, p.gather(1, ids.clamp_min(0)) * (ids >= 0), "raw probabilities, 0 in empty slots")
    assert ids.shape == (3, 3)  # K is the widest token's set, not E
    h = router_entropy(p)
    assert_close(h, -(p * p.log()).sum(-1).mean(), "mean over tokens of the entropy over experts")

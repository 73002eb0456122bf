"""Routing behaviours that are easy to get subtly wrong: exact capacities, which choices the aux loss counts,
eval-mode capacity, DeepSeek-V3's sequence-wise normalisation, f taken before dropping (issue 11)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from moekit import MoE, MoEConfig, Router, RouterConfig, RoutingContext
from moekit.routing import capacity, limit_capacity, load_balancing_loss, select_topk, token_count
from moekit.routing.heterogeneous import heterogeneous_capacities

from .reference import assert_close

CF_STRINGS = ["0.3", "0.7", "1.0", "1.1", "1.15", "1.2", "1.25", "1.3", "2.0", "2.3", "0.01"]


def test_capacity_is_exact_where_float_rounding_crosses_a_whole_number():
    assert 1.1 * 1 * 100 / 10 > 11  # the float product is just above 11 ...
    assert capacity(100, 10, 1, 1.1) == 11  # ... but the capacity is ceil(11) = 11
    assert capacity(100, 10, 1, 1.0) == 10 and capacity(101, 10, 1, 1.0) == 11
    assert capacity(1, 64, 1, 1.0) == 1  # at least one slot
    for cf in CF_STRINGS:
        for T, E, K in [(100, 10, 1), (7, 3, 2), (64, 8, 2), (30, 6, 3), (1000, 7, 2), (20, 20, 1)]:
            expected = max(1, math.ceil(Fraction(cf) * K * T / E))
            assert capacity(T, E, K, float(cf)) == expected, (T, E, K, cf)


def test_token_counts_of_fractional_capacities_are_exact_floors():
    assert 0.29 * 100 < 29 and token_count(0.29, 100) == 29
    assert token_count(Fraction(2, 3), 6) == 4 and token_count(0.125, 16) == 2 and token_count(0.125, 7) == 1
    for frac in ["0.29", "0.57", "0.125", "0.3", "0.7", "1.0", "0.33"]:
        for n in (1, 5, 7, 100, 1000, 333):
            assert token_count(float(frac), n) == max(1, math.floor(Fraction(frac) * n)), (frac, n)


def test_heterogeneous_capacities_are_exact():
    # gamma * tau * A / (tau N + M) with tau = 0.5, N = 4, M = 2, A = 44: 1.1 * 0.5 * 44 / 4 = 6.05 -> 7
    assert heterogeneous_capacities(44, 4, 2, 0.5, 1.1) == (7, math.ceil(Fraction(11, 10) * 44 / 4))
    # 1.1 * 1 * 40 / (4 + 0) = 11 exactly (float gives 11.000000000000002 -> 12)
    assert heterogeneous_capacities(40, 4, 0, 1.0, 1.1) == (11, 11)


def _skewed_router(E=4, D=6, **router):
    torch.manual_seed(0)
    r = Router(D, E, 1, RouterConfig(aux_loss_coef=0.0, **router))
    with torch.no_grad():
        r.weight.zero_()
        r.weight[0, 0] = 10.0  # with x[:, 0] > 0 every token's first choice is expert 0
    return r


def _input(T=24, D=6):
    x = torch.randn(T, D)
    x[:, 0] = x[:, 0].abs() + 0.5
    return x


@pytest.mark.parametrize("train_cf,eval_cf", [(0.5, 1.5), (1.5, 0.5), (0.25, None)])
def test_eval_mode_uses_eval_capacity_factor(train_cf, eval_cf):
    r, x = _skewed_router(capacity_factor=train_cf, eval_capacity_factor=eval_cf), _input()
    T, E = x.shape[0], 4
    kept_train = int((r(x).expert_ids_TK == 0).sum())
    r.eval()
    kept_eval = int((r(x).expert_ids_TK == 0).sum())
    assert kept_train == capacity(T, E, 1, train_cf)
    assert kept_eval == capacity(T, E, 1, eval_cf if eval_cf is not None else train_cf)
    if eval_cf is not None:
        assert kept_train != kept_eval


def test_aux_loss_counts_all_k_choices_by_default_and_first_choices_with_gshard_flag():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.6, 0.1, 0.3, 0.0], [0.2, 0.7, 0.1, 0.0], [0.1, 0.2, 0.6, 0.1]])
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1]])
    P = probs.mean(0)
    f_all = torch.tensor([3, 3, 2, 0]) / 8.0
    f_first = torch.tensor([2, 1, 1, 0]) / 4.0
    assert_close(load_balancing_loss(probs, ids), 4 * (f_all * P).sum(), "all k choices (Switch to top-k)")
    assert_close(load_balancing_loss(probs, ids, first_choice=True), 4 * (f_first * P).sum(), "GShard")
    # through the router: the flag selects the form, the coefficient is applied
    x = torch.randn(10, 6)
    losses = {}
    for flag in (False, True):
        torch.manual_seed(0)
        router = Router(6, 4, 2, RouterConfig(aux_loss_coef=0.3, aux_loss_first_choice=flag))
        ctx = RoutingContext()
        routing = router(x, ctx)
        expected = 0.3 * load_balancing_loss(routing.scores_TE, routing.expert_ids_TK[:, : 1 if flag else 2])
        assert_close(ctx.losses["aux_loss"], expected, f"first_choice={flag}")
        losses[flag] = ctx.losses["aux_loss"]
    assert not torch.allclose(losses[False], losses[True])


def test_aux_loss_f_is_taken_from_the_selection_before_capacity_dropping():
    torch.manual_seed(0)
    r = Router(6, 4, 2, RouterConfig(capacity_factor=0.5, aux_loss_coef=1.0))
    with torch.no_grad():
        r.weight[0] += 1.0  # expert 0 overloaded: its overflow is dropped, the others' is not
    ctx = RoutingContext()
    routing = r(_input(T=16), ctx)
    assert (routing.expert_ids_TK < 0).any()  # some tokens were dropped
    selected, _ = select_topk(routing.scores_TE, 2)
    before = load_balancing_loss(routing.scores_TE, selected)
    after = load_balancing_loss(routing.scores_TE, routing.expert_ids_TK)
    assert not torch.allclose(before, after)
    assert_close(ctx.losses["aux_loss"], before, "f before dropping")


def test_deepseek_v3_sequence_wise_loss_normalises_sigmoid_scores_per_token():
    B, S, E, K, D = 3, 5, 6, 2, 8
    torch.manual_seed(0)
    router = Router(D, E, K, RouterConfig(score_func="sigmoid", aux_loss_coef=0.2, aux_loss_level="sequence"))
    x = torch.randn(B * S, D)
    ctx = RoutingContext()
    routing = router(x, ctx, num_sequences=B)
    s = routing.scores_TE.view(B, S, E)
    ids = routing.expert_ids_TK.view(B, S, K)
    expected = 0.0
    for b in range(B):  # DeepSeek-V3 eqs. 17-20, written out per sequence
        f = torch.stack([(ids[b] == i).sum() for i in range(E)]).float() * E / (K * S)
        P = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        expected = expected + 0.2 * (f * P).sum() / B
    assert_close(ctx.losses["aux_loss"], expected, "sequence-wise complementary loss")
    unnormalised = sum(0.2 * (torch.stack([(ids[b] == i).sum() for i in range(E)]).float() * E / (K * S)
                              * s[b].mean(0)).sum() / B for b in range(B))
    assert not torch.allclose(ctx.losses["aux_loss"], unnormalised)


def test_limit_capacity_keeps_exactly_capacity_per_expert_and_never_reorders_a_token():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        T, E, K = 17 + trial, 5, 2
        scores = torch.rand(T, E, generator=g)
        ids, w = select_topk(scores, K, normalize=False)
        cap = 1 + trial % 4
        kept, kw = limit_capacity(ids, w, E, cap)
        counts = torch.bincount(kept[kept >= 0], minlength=E)
        full = torch.bincount(ids.reshape(-1), minlength=E)
        assert torch.equal(counts, full.clamp(max=cap))
        assert torch.equal(kept[kept >= 0], ids[kept >= 0]) and torch.equal(kw[kept >= 0], w[kept >= 0])
        assert torch.all(kw[kept < 0] == 0)


def test_moe_layer_capacity_in_eval_follows_eval_factor():
    cfg = MoEConfig(dim=6, hidden_dim=4, num_experts=4, top_k=1, engine="reference",
                    router=RouterConfig(capacity_factor=0.25, eval_capacity_factor=4.0))
    moe = MoE(cfg)
    x = _input()
    train_drops = int((moe.route(x).expert_ids_TK < 0).sum())
    moe.eval()
    assert train_drops > 0 and int((moe.route(x).expert_ids_TK < 0).sum()) == 0

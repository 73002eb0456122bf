"""The ``sorted_blocked`` engine and :func:`moekit.ops.blocked_moe_ffn` (issue 20) against the reference engine:
outputs and the gradients of the input, the router and every expert weight, over odd sizes, empty experts, one
token, all tokens on one expert, top_k == num_experts, dropped slots, and block sizes that split segments
unevenly; a float64 gradcheck of the op itself, including the combine weights and the per-expert biases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.dispatch.sorted as sorted_module
from moekit import MoE, MoEConfig, RouterConfig, Routing
from moekit.bench.timing import saved_activation_bytes
from moekit.dispatch import get_engine
from moekit.ops import blocked_moe_ffn, sorted_moe_ffn
from moekit.ops.blocked_moe import _scale_hidden, row_blocks

from .reference import assert_close
from .test_engines import CASES, _grads, check_against_reference


@pytest.fixture(params=[None, 1, 3], ids=["one-block-per-expert", "block1", "block3"])
def block_rows(request, monkeypatch):
    """Run the engine with segments split into blocks of at most this many rows."""
    monkeypatch.setattr(sorted_module, "BLOCK_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_matches_reference(case, block_rows):
    check_against_reference(MoEConfig(**CASES[case]), (3, 7), engine="sorted_blocked")


def test_one_token(block_rows):
    check_against_reference(MoEConfig(dim=12, hidden_dim=8, num_experts=4, top_k=2), (1,), engine="sorted_blocked")


def test_all_tokens_on_one_expert_leave_the_others_a_zero_gradient(block_rows):
    moe = MoE(MoEConfig(dim=16, hidden_dim=8, num_experts=6, top_k=1))
    with torch.no_grad():  # expert 0 wins for every token: experts 1..5 receive nothing
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    x = torch.randn(7, 16).abs()
    assert (moe.route(x).expert_ids_TK == 0).all()
    g = torch.randn(7, 16)
    y_ref, grads_ref = _grads(moe, "reference", x, g)
    y, grads = _grads(moe, "sorted_blocked", x, g)
    assert_close(y, y_ref, "output")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], name)
    for name in ("experts.w_up", "experts.w_gate", "experts.w_down"):
        assert grads[name][1:].abs().sum() == 0, name
        assert grads[name][0].abs().sum() > 0, name


def test_top_k_equal_to_the_number_of_experts_with_biases(block_rows):
    cfg = MoEConfig(dim=10, hidden_dim=6, num_experts=3, top_k=3, use_ffn_bias=True)
    moe = MoE(cfg)
    with torch.no_grad():
        for b in (moe.experts.b_gate, moe.experts.b_up, moe.experts.b_down):
            b.normal_()
    x, g = torch.randn(5, 10), torch.randn(5, 10)
    y_ref, grads_ref = _grads(moe, "reference", x, g)
    y, grads = _grads(moe, "sorted_blocked", x, g)
    assert_close(y, y_ref, "output")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], name)
    assert grads["experts.b_down"].abs().sum() > 0


def test_all_slots_dropped_gives_zeros(block_rows):
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1))
    x = torch.randn(4, 8, requires_grad=True)
    routing = moe.route(x)
    empty = Routing(expert_ids_TK=torch.full_like(routing.expert_ids_TK, -1),
                    weights_TK=routing.weights_TK * 0, scores_TE=routing.scores_TE, logits_TE=routing.logits_TE)
    y = get_engine("sorted_blocked")(x, empty, moe.experts)
    assert torch.equal(y, torch.zeros_like(y))


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(1, 20), hidden=st.integers(1, 20), num_experts=st.integers(1, 7), data=st.data(),
       tokens=st.integers(1, 15), activation=st.sampled_from(["swiglu", "gelu", "relu"]),
       cf=st.sampled_from([None, 0.3, 4.0]), block=st.sampled_from([None, 1, 2, 5]))
def test_property_blocked_equals_reference(dim, hidden, num_experts, data, tokens, activation, cf, block):
    top_k = data.draw(st.integers(1, num_experts))
    cfg = MoEConfig(dim=dim, hidden_dim=hidden, num_experts=num_experts, top_k=top_k, activation=activation,
                    router=RouterConfig(capacity_factor=cf))
    old = sorted_module.BLOCK_ROWS
    sorted_module.BLOCK_ROWS = block
    try:
        check_against_reference(cfg, (tokens,), engine="sorted_blocked", atol=2e-5)
    finally:
        sorted_module.BLOCK_ROWS = old


@pytest.mark.parametrize("activation,use_bias", [("swiglu", False), ("gelu", False), ("relu", False),
                                                 ("swiglu", True), ("clamped_swiglu", True), ("gelu", True)])
@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize("D,F", [(5, 4), (4, 5)], ids=["hidden-narrower", "hidden-wider"])
def test_blocked_moe_ffn_gradcheck_float64(activation, use_bias, block, D, F):
    """Both ways of applying the combine weights (to the hidden activation when it is the narrower and there is
    no down bias, else to the expert output) are the same function, with the same gradients."""
    torch.manual_seed(0)
    E, T = 3, 6
    counts = [3, 0, 4]  # expert 1 gets nothing; with block=2 the segments split as 2+1 and 2+2
    token_N = torch.tensor([0, 2, 5, 1, 2, 3, 4])
    dbl = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(T, D, **dbl)
    w = torch.rand(7, **dbl)
    gated = activation.endswith("swiglu")
    w_gate = torch.randn(E, F, D, **dbl) if gated else None
    w_up, w_down = torch.randn(E, F, D, **dbl), torch.randn(E, D, F, **dbl)
    biases = (torch.randn(E, F, **dbl) if gated else None, torch.randn(E, F, **dbl),
              torch.randn(E, D, **dbl)) if use_bias else (None, None, None)

    def f(x, w, w_gate, w_up, w_down, *biases):
        return blocked_moe_ffn(x, w, token_N, counts, w_gate, w_up, w_down, activation, *biases, block_rows=block)

    inputs = (x, w, w_gate, w_up, w_down, *biases)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)
    # and it is the same function as the whole-segment op
    assert_close(f(*inputs), sorted_moe_ffn(x, w, token_N, counts, w_gate, w_up, w_down, activation, *biases),
                 "blocked vs sorted_moe_ffn", atol=1e-10)


@pytest.mark.parametrize("block", [None, 1, 2, 3, 7, 100])
def test_row_blocks_cover_every_row_once_in_near_equal_blocks(block):
    counts = [0, 7, 1, 0, 12, 3]
    blocks = list(row_blocks(counts, block))
    rows = [i for _, s, _ in blocks for i in range(s.start, s.stop)]
    assert rows == list(range(sum(counts)))
    starts = [sum(counts[:e]) for e in range(len(counts))]
    for e, n in enumerate(counts):
        mine = [(s, first) for ee, s, first in blocks if ee == e]
        assert len(mine) == (0 if n == 0 else 1 if block is None else -(-n // block))
        if mine:
            sizes = [s.stop - s.start for s, _ in mine]
            assert sum(sizes) == n and mine[0][0].start == starts[e]
            assert max(sizes) - min(sizes) <= 1 and (block is None or max(sizes) <= block)
            assert [first for _, first in mine] == [True] + [False] * (len(mine) - 1)


def test_bad_block_rows_is_refused_with_the_allowed_values():
    x = torch.randn(2, 4)
    w = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="block_rows must be a positive int or None, got 0"):
        blocked_moe_ffn(x, torch.ones(2), torch.tensor([0, 1]), [2], w, w, w.transpose(1, 2), "swiglu",
                        block_rows=0)


def test_blocked_saves_less_for_backward_than_sorted():
    """The hidden activation is recomputed in backward, not saved: 2 N F saved floats instead of 3 N F."""
    cfg = MoEConfig(dim=32, hidden_dim=64, num_experts=4, top_k=2)
    moe = MoE(cfg)
    x = torch.randn(50, 32, requires_grad=True)
    saved = {}
    for engine in ("sorted", "sorted_blocked"):
        moe.config = MoEConfig(dim=32, hidden_dim=64, num_experts=4, top_k=2, engine=engine)
        saved[engine] = saved_activation_bytes(lambda: moe(x), moe)
    N, F = 50 * 2, 64
    assert saved["sorted"] - saved["sorted_blocked"] == N * F * 4


def test_the_combine_weights_scale_the_narrower_of_hidden_and_output_unless_a_down_bias_needs_them():
    assert _scale_hidden(4, 5, None) and _scale_hidden(5, 5, None)
    assert not _scale_hidden(6, 5, None)  # the output is narrower
    assert not _scale_hidden(4, 5, torch.zeros(2, 5))  # w * (W a + b) needs the weights on the bias too

"""Every fast engine against the reference: forward output and gradients of the input, the router and every
expert weight, over odd sizes, empty experts, top_k == num_experts, one token, capacity and expert choice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig, RouterConfig, Routing
from moekit.dispatch import get_engine, grouped_mm_engine

from .reference import assert_close, per_token_moe


def _grads(moe: MoE, engine: str, x: torch.Tensor, g: torch.Tensor):
    """Output and gradients of (x, router weight, every expert weight, shared experts) for one engine."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    moe.config = _with_engine(moe.config, engine)
    y = moe(x)
    (y * g).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in moe.named_parameters()})
    return y.detach(), grads


def _with_engine(cfg: MoEConfig, engine: str) -> MoEConfig:
    from dataclasses import replace
    return replace(cfg, engine=engine)


def check_against_reference(cfg: MoEConfig, shape, engine="sorted", atol=1e-5):
    moe = MoE(cfg)
    x = torch.randn(*shape, cfg.dim)
    g = torch.randn(*shape, cfg.dim)
    y_ref, grads_ref = _grads(moe, "reference", x, g)
    y, grads = _grads(moe, engine, x, g)
    assert_close(y, y_ref, "output", atol=atol)
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], f"grad {name}", atol=atol)
    return moe, grads_ref


CASES = {
    "odd_dims": dict(dim=100, hidden_dim=60, num_experts=5, top_k=2),
    "odd_600": dict(dim=60, hidden_dim=600, num_experts=3, top_k=1),
    "k_equals_e": dict(dim=16, hidden_dim=24, num_experts=4, top_k=4),
    "non_pow2_experts": dict(dim=32, hidden_dim=20, num_experts=7, top_k=3),
    "gelu": dict(dim=24, hidden_dim=40, num_experts=6, top_k=2, activation="gelu"),
    "relu": dict(dim=24, hidden_dim=40, num_experts=6, top_k=2, activation="relu"),
    "shared": dict(dim=24, hidden_dim=16, num_experts=6, top_k=2, num_shared_experts=2),
    "sigmoid_groups": dict(dim=24, hidden_dim=16, num_experts=8, top_k=2,
                           router=RouterConfig(score_func="sigmoid", num_groups=4, topk_groups=2,
                                               routed_scaling_factor=2.5)),
    "capacity_drop": dict(dim=24, hidden_dim=16, num_experts=4, top_k=2,
                          router=RouterConfig(capacity_factor=0.5)),
    "expert_choice": dict(dim=24, hidden_dim=16, num_experts=4, top_k=2,
                          router=RouterConfig(selector="expert_choice", capacity_factor=1.0)),
    "unnormalised": dict(dim=24, hidden_dim=16, num_experts=4, top_k=1,
                         router=RouterConfig(norm_topk_prob=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sorted_matches_reference(case):
    check_against_reference(MoEConfig(**CASES[case]), (3, 7))


def test_reference_matches_per_token_oracle():
    moe = MoE(MoEConfig(dim=20, hidden_dim=12, num_experts=5, top_k=3, router=RouterConfig(capacity_factor=0.7)))
    x = torch.randn(11, 20)
    routing = moe.route(x)
    assert (routing.expert_ids_TK == -1).any(), "the capacity limit should drop some slots here"
    y = get_engine("reference")(x, routing, moe.experts)
    b = moe.experts
    expected = per_token_moe(x, routing.expert_ids_TK, routing.weights_TK, b.w_gate, b.w_up, b.w_down)
    assert_close(y, expected, "reference vs per-token loop")


def test_one_token():
    check_against_reference(MoEConfig(dim=12, hidden_dim=8, num_experts=4, top_k=2), (1,))


def test_experts_with_no_tokens_get_zero_gradient():
    cfg = MoEConfig(dim=16, hidden_dim=8, num_experts=6, top_k=1)
    moe = MoE(cfg)
    with torch.no_grad():  # make expert 0 win for every token: experts 1..5 receive nothing
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    x = torch.randn(5, 16).abs()
    assert (moe.route(x).expert_ids_TK == 0).all()
    g = torch.randn(5, 16)
    y_ref, grads_ref = _grads(moe, "reference", x, g)
    y, grads = _grads(moe, "sorted", x, g)
    assert_close(y, y_ref, "output")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], name)
    assert grads["experts.w_up"][1:].abs().sum() == 0
    assert grads["experts.w_up"][0].abs().sum() > 0


def test_all_slots_dropped():
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1))
    x = torch.randn(4, 8, requires_grad=True)
    routing = moe.route(x)
    empty = Routing(expert_ids_TK=torch.full_like(routing.expert_ids_TK, -1),
                    weights_TK=routing.weights_TK * 0, scores_TE=routing.scores_TE, logits_TE=routing.logits_TE)
    for engine in ("reference", "sorted"):
        y = get_engine(engine)(x, empty, moe.experts)
        assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mm_engine_cpu_twin(activation):
    """The CUDA grouped_mm engine, run on CPU in float32 (dims multiple of 4 for 16-byte strides)."""
    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=5, top_k=2, activation=activation,
                    router=RouterConfig(capacity_factor=0.6))
    moe = MoE(cfg)
    x = torch.randn(13, 16, requires_grad=True)
    routing = moe.route(x)
    assert (routing.expert_ids_TK < 0).any()
    g = torch.randn(13, 16)
    params = [x, moe.router.weight] + list(moe.experts.parameters())
    outs = {}
    for name, fn in (("reference", get_engine("reference")), ("grouped_mm", grouped_mm_engine)):
        routing = moe.route(x)
        y = fn(x, routing, moe.experts)
        outs[name] = (y, torch.autograd.grad((y * g).sum(), params))
    assert_close(outs["grouped_mm"][0], outs["reference"][0], "output")
    for a, b in zip(outs["grouped_mm"][1], outs["reference"][1]):
        assert_close(a, b, "grad")


@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(1, 24), hidden=st.integers(1, 24), num_experts=st.integers(1, 9), data=st.data(),
    tokens=st.integers(1, 17), activation=st.sampled_from(["swiglu", "gelu", "relu"]),
    shared=st.integers(0, 2), cf=st.sampled_from([None, 0.3, 1.0, 4.0]),
    score=st.sampled_from(["softmax", "sigmoid"]),
)
def test_property_sorted_equals_reference(dim, hidden, num_experts, data, tokens, activation, shared, cf, score):
    top_k = data.draw(st.integers(1, num_experts))
    cfg = MoEConfig(dim=dim, hidden_dim=hidden, num_experts=num_experts, top_k=top_k, activation=activation,
                    num_shared_experts=shared, router=RouterConfig(capacity_factor=cf, score_func=score))
    check_against_reference(cfg, (tokens,), atol=2e-5)


def test_permuting_tokens_permutes_output():
    moe = MoE(MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2))
    x = torch.randn(9, 16)
    perm = torch.randperm(9)
    assert_close(moe(x)[perm], moe(x[perm]), "permutation equivariance")


def test_auto_picks_sorted_on_cpu_and_grouped_mm_refuses_clearly():
    from moekit.dispatch import resolve_engine
    bank = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=2, top_k=1)).experts  # wider than the model
    x = torch.randn(3, 8)
    assert resolve_engine("auto", x, bank).name == "sorted"
    with pytest.raises(ValueError, match="grouped_mm.*cannot run here.*CUDA"):
        resolve_engine("grouped_mm", x, bank)
    with pytest.raises(ValueError, match="did you mean 'sorted'"):
        resolve_engine("sortd", x, bank)


@pytest.mark.parametrize("activation,use_bias", [("swiglu", False), ("gelu", False), ("relu", False),
                                                 ("swiglu", True), ("clamped_swiglu", True), ("gelu", True)])
def test_sorted_moe_ffn_gradcheck_float64(activation, use_bias):
    from moekit.ops import sorted_moe_ffn
    torch.manual_seed(0)
    E, D, F, T = 3, 5, 4, 6
    counts = [3, 0, 4]  # expert 1 gets nothing
    token_N = torch.tensor([0, 2, 5, 1, 2, 3, 4])
    dbl = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(T, D, **dbl)
    w = torch.rand(7, **dbl)
    gated = activation.endswith("swiglu")
    w_gate = torch.randn(E, F, D, **dbl) if gated else None
    w_up, w_down = torch.randn(E, F, D, **dbl), torch.randn(E, D, F, **dbl)
    biases = (torch.randn(E, F, **dbl) if gated else None, torch.randn(E, F, **dbl),
              torch.randn(E, D, **dbl)) if use_bias else ()
    inputs = (x, w, token_N, counts, w_gate, w_up, w_down, activation, *biases)
    assert torch.autograd.gradcheck(lambda *a: sorted_moe_ffn(*a), inputs, eps=1e-6, atol=1e-5)

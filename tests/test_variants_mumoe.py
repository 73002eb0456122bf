"""μMoE: the spec's minimal faithful tests (architectures.md §17), the explicit dense mixture as oracle for the
CP and tensor-ring forwards and gradients, entmax15, the parameter-matched rank, causality of the gate."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.experts import hidden
from moekit.layers import build_ffn
from moekit.layers.variants.mumoe import (CPMultilinear, MultilinearMoE, MuMoEConfig, TRMultilinear,
                                          matched_rank)
from moekit.routing.entmax import entmax15

from .variants_util import params_with_grad, tiny_moe

NO_LOSS = dict(aux_loss_coef=0.0)


def _moe(**kw):
    return tiny_moe(num_experts=5, router=NO_LOSS, **kw)


def _dense_mixture(W_NIO, x_TI, a_TN):
    """``y = sum_n a_n W_n^T [x; 1]`` with the materialised tensor (the spec's ``n i o, b n, b i -> b o``)."""
    x1 = torch.cat([x_TI, torch.ones(x_TI.shape[0], 1, dtype=x_TI.dtype)], dim=-1)
    return torch.einsum("nio,tn,ti->to", W_NIO, a_TN, x1)


@pytest.mark.parametrize("kind", ["cp", "tr"])
def test_factorised_map_equals_explicit_dense_mixture_with_gradients(kind):
    torch.manual_seed(0)
    N, I, O = 5, 7, 3
    m = CPMultilinear(N, I, O, rank=4) if kind == "cp" else TRMultilinear(N, I, O, 2, 3, 4)
    m = m.double()
    x = torch.randn(6, I, dtype=torch.float64, requires_grad=True)
    a = entmax15(torch.randn(6, N, dtype=torch.float64)).requires_grad_(True)
    y = m(x, a)
    W = m.materialize()
    assert W.shape == (N, I + 1, O)
    # the loop form: every expert's own affine map, mixed
    y_loop = sum(a[:, n:n + 1] * (x @ W[n, :I] + W[n, I]) for n in range(N))
    y_dense = _dense_mixture(W, x, a)
    torch.testing.assert_close(y, y_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_loop, y_dense, rtol=1e-10, atol=1e-10)
    inputs = [x, a, *m.parameters()]
    for g, g_ref in zip(torch.autograd.grad(y.sin().sum(), inputs), torch.autograd.grad(y_dense.sin().sum(), inputs)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,activation", [("cp", "gelu"), ("tr", "swiglu")])
def test_layer_equals_two_dense_mixtures_sharing_one_gate(kind, activation):
    torch.manual_seed(1)
    layer = MultilinearMoE(_moe(activation=activation), MuMoEConfig(factorization=kind, rank=3)).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    x_TD = x.reshape(-1, 8)
    with torch.no_grad():
        layer.gate_weight.normal_()
    a = entmax15(F.layer_norm(x_TD @ layer.gate_weight, (5,)))
    gate = _dense_mixture(layer.gate_proj.materialize(), x_TD, a) if layer.gate_proj is not None else None
    h = hidden(activation, gate, _dense_mixture(layer.up.materialize(), x_TD, a))
    torch.testing.assert_close(layer(x), _dense_mixture(layer.down.materialize(), h, a).view_as(x),
                               rtol=1e-5, atol=1e-5)


def test_one_expert_with_unit_gate_is_a_low_rank_linear_layer():
    torch.manual_seed(2)
    m = CPMultilinear(1, 6, 5, rank=2)
    x = torch.randn(4, 6)
    W = m.materialize()[0]
    torch.testing.assert_close(m(x, torch.ones(4, 1)), F.linear(x, W[:6].t(), W[6]))
    assert torch.linalg.matrix_rank(W) <= 2
    layer = MultilinearMoE(tiny_moe(num_experts=1, top_k=1, router=NO_LOSS))
    assert torch.equal(layer.expert_coefficients(torch.randn(3, 8)), torch.ones(3, 1))


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_zero_initialised_gate_is_uniform_at_step_zero(norm):
    layer = MultilinearMoE(_moe(), MuMoEConfig(gate_norm=norm))
    assert torch.equal(layer.gate_weight, torch.zeros(8, 5))
    torch.testing.assert_close(layer.expert_coefficients(torch.randn(6, 8)), torch.full((6, 5), 0.2))


def test_entmax15_is_sparse_on_the_simplex_matches_bisection_and_gradchecks():
    torch.manual_seed(3)
    z = torch.randn(50, 9, dtype=torch.float64) * 3
    p = entmax15(z)
    torch.testing.assert_close(p.sum(-1), torch.ones(50, dtype=torch.float64))
    assert (p == 0).any() and torch.all(p >= 0)
    lo, hi = (z / 2).amax(-1, keepdim=True) - 1, (z / 2).amax(-1, keepdim=True)
    for _ in range(100):  # bisection on sum(max(z/2 - tau, 0)^2) = 1
        mid = (lo + hi) / 2
        too_low = ((z / 2 - mid).clamp_min(0).square().sum(-1, keepdim=True) > 1)
        lo, hi = torch.where(too_low, mid, lo), torch.where(too_low, hi, mid)
    torch.testing.assert_close(p, (z / 2 - lo).clamp_min(0).square())
    assert torch.autograd.gradcheck(entmax15, (torch.randn(4, 6, dtype=torch.float64, requires_grad=True),))
    torch.testing.assert_close(entmax15(z.t(), dim=0), p.t())


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(1, 9), scale=st.floats(0.01, 100.0), shift=st.floats(-50, 50),
       seed=st.integers(0, 2**16))
def test_entmax15_properties(rows, n, scale, shift, seed):
    z = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    p = entmax15(z)
    torch.testing.assert_close(p.sum(-1), torch.ones(rows, dtype=torch.float64))
    assert torch.all(p >= 0)
    torch.testing.assert_close(entmax15(z + shift), p)  # shift invariant
    order = z.argsort(-1)
    assert torch.all(p.gather(1, order).diff(dim=-1) >= -1e-12)  # monotone in the scores


def test_matched_rank_matches_dense_parameters_and_the_released_gpt2_settings():
    D, F_, N = 768, 3072, 64
    assert abs(matched_rank(MuMoEConfig(), D, F_, N) - int(0.78 * D)) <= 0.02 * D
    assert abs(matched_rank(MuMoEConfig(factorization="tr"), D, F_, N) - int(0.2 * D)) <= 1
    cfg = _moe(dim=16, hidden_dim=40, activation="gelu")
    dense = 2 * 16 * 40
    for kind in ("cp", "tr"):
        layer = MultilinearMoE(cfg, MuMoEConfig(factorization=kind))
        n = sum(p.numel() for p in layer.parameters()) - layer.gate_weight.numel()
        step = (2 * (5 + 16 + 40 + 1) if kind == "cp" else 2 * 4 * (16 + 40 + 1))  # params per unit of rank
        assert dense - step < n <= dense


def test_gradients_reach_every_factor_and_the_gate_and_no_router_losses():
    torch.manual_seed(4)
    layer = build_ffn("mumoe", _moe(activation="gelu"), {"factorization": "tr", "rank": 3})
    ctx = RoutingContext()
    y = layer(torch.randn(2, 3, 8), ctx)
    assert ctx.losses == {}
    names = params_with_grad(layer, y.square().sum())
    assert names == {n for n, _ in layer.named_parameters()}  # the zero-initialised gate included
    with pytest.raises(ConfigError, match="aux_loss_coef=0"):
        build_ffn("mumoe", tiny_moe(), {})


def test_layernorm_gate_is_per_token_and_batchnorm_mixes_tokens_in_training():
    torch.manual_seed(5)
    x = torch.randn(1, 6, 8)
    x2 = x.clone()
    x2[0, 5] += 5.0
    for norm, per_token in (("layernorm", True), ("batchnorm", False)):
        layer = MultilinearMoE(_moe(), MuMoEConfig(gate_norm=norm))
        with torch.no_grad():
            layer.gate_weight.normal_()
        same = torch.allclose(layer(x)[0, :5], layer(x2)[0, :5])
        assert same == per_token


def test_stats_count_active_experts_and_builder_options():
    torch.manual_seed(6)
    layer = build_ffn("mumoe", _moe(), {"rank": 2}, name="layers.0.ffn")
    assert isinstance(layer, MultilinearMoE) and layer.rank == 2
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(2, 4, 8), ctx)
    s = ctx.stats_summary()["layers.0.ffn"]
    assert s["active_experts"] == 5.0 and s["dead_experts"] == 0 and abs(s["token_entropy"] - 1) < 1e-6
    with torch.no_grad():
        layer.gate_weight.normal_(std=3.0)
    ctx = RoutingContext(collect_stats=True)
    x = torch.randn(2, 4, 8)
    layer(x, ctx)
    a = layer.expert_coefficients(x.reshape(-1, 8))
    assert ctx.stats_summary()["layers.0.ffn"]["active_experts"] == pytest.approx((a > 0).sum(-1).float().mean())
    assert (a == 0).any()
    with pytest.raises(ConfigError, match="variant.factorization"):
        build_ffn("mumoe", _moe(), {"factorisation": "cp"})
    with pytest.raises(ConfigError, match="gate_norm"):
        build_ffn("mumoe", _moe(), {"gate_norm": "rmsnorm"})


def test_hierarchical_cp_equals_its_materialised_tensor_and_starts_as_one_level():
    torch.manual_seed(11)
    cp = CPMultilinear(5, 6, 4, 7, num_experts2=3)
    with torch.no_grad():
        cp.u_expert2.normal_()
    x, a, a2 = torch.randn(9, 6), torch.rand(9, 5), torch.rand(9, 3)
    W = cp.materialize()
    assert W.shape == (5, 3, 7, 4)
    expected = torch.einsum("nmio,tn,tm,ti->to", W, a, a2, torch.cat([x, torch.ones(9, 1)], -1))
    torch.testing.assert_close(cp(x, a, a2), expected, rtol=1e-5, atol=1e-5)
    moe = tiny_moe(num_experts=4, router={"aux_loss_coef": 0.0})
    torch.manual_seed(12)
    flat = build_ffn("mumoe", moe, {"gate": "softmax"})
    torch.manual_seed(12)
    deep = build_ffn("mumoe", moe, {"gate": "softmax", "hierarchy_experts": 3})
    xs = torch.randn(2, 5, 8)
    a2 = deep.expert_coefficients(xs.view(-1, 8), 2)
    assert torch.allclose(a2, torch.full_like(a2, 1 / 3)), "zero-initialised second gate: uniform"
    torch.testing.assert_close(deep(xs), flat(xs), rtol=1e-5, atol=1e-6)  # ones factor: the one-level layer
    deep(xs).sum().backward()
    assert deep.up.u_expert2.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="hierarchy_experts=2 needs variant.factorization='cp'"):
        build_ffn("mumoe", moe, {"factorization": "tr", "hierarchy_experts": 2})

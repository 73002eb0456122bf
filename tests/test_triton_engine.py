"""The ``triton`` engine's CPU twin: its Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``,
set here before Triton is first imported) against the reference engine, on outputs and gradients of the input,
the router and every expert weight and bias; a float64 gradcheck of the kernels' backward; the tile schedule
against a loop; and the engine's refusals. The CUDA twins are in tests/test_gpu.py.

Small tiles (16 x 32 x 32) so that the cases here span several row, column and depth tiles.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig, RouterConfig, Routing
from moekit.dispatch import fused_triton, get_engine, resolve_engine

from .reference import assert_close
from .test_engines import CASES, _grads, check_against_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (the 'triton' extra)")


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """The Triton interpreter on, before ``moekit.ops.triton_moe`` (and Triton) is first imported, and small
    tiles. Skips if Triton was already imported without the interpreter (its kernels would target a GPU)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import moekit.ops.triton_moe as tm
    if not _interpreted(tm):
        pytest.skip("Triton's kernels were built for a GPU earlier in this process; run this file alone")
    blocks = tm.BLOCKS
    tm.BLOCKS = (16, 32, 32)
    yield tm
    tm.BLOCKS = blocks
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


def _interpreted(tm) -> bool:
    return type(tm._grouped_mm_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_reference(case):
    check_against_reference(MoEConfig(**CASES[case]), (3, 7), engine="triton")


def test_triton_one_token():
    check_against_reference(MoEConfig(dim=12, hidden_dim=8, num_experts=4, top_k=2), (1,), engine="triton")


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu", "gelu", "relu"])
def test_triton_with_biases_matches_reference(activation):
    """Random per-expert biases: their gradients, the combine weights' gradient through the down bias, and
    dropped slots."""
    torch.manual_seed(2)
    cfg = MoEConfig(dim=20, hidden_dim=36, num_experts=5, top_k=2, activation=activation, use_ffn_bias=True,
                    router=RouterConfig(capacity_factor=0.7))
    moe = MoE(cfg)
    with torch.no_grad():
        for name in ("b_gate", "b_up", "b_down"):
            if getattr(moe.experts, name) is not None:
                getattr(moe.experts, name).normal_()
    x, g = torch.randn(18, 20), torch.randn(18, 20)
    assert (moe.route(x).expert_ids_TK < 0).any(), "some slots should be dropped here"
    outs = {engine: _grads(moe, engine, x, g) for engine in ("reference", "triton")}
    assert_close(outs["triton"][0], outs["reference"][0], "output", atol=1e-5)
    ref = outs["reference"][1]
    assert {"experts.b_up", "experts.b_down"} <= {n for n, t in ref.items() if t.abs().sum() > 0}
    for name, t in ref.items():
        assert_close(outs["triton"][1][name], t, name, atol=1e-5)


def test_triton_float64_many_tiles():
    """Rows, columns and depth over several tiles each, at float64 precision: a tight check of the kernels'
    arithmetic (the expert weights to 1e-10)."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=70, hidden_dim=100, num_experts=3, top_k=2)
    moe = MoE(cfg).double()
    x = torch.randn(40, 70, dtype=torch.float64)
    g = torch.randn(40, 70, dtype=torch.float64)
    outs = {engine: _grads(moe, engine, x, g) for engine in ("reference", "triton")}
    counts = torch.bincount(moe.route(x).expert_ids_TK.reshape(-1), minlength=3)
    assert (counts > 16).sum() >= 2, "several row tiles per expert expected"
    assert_close(outs["triton"][0], outs["reference"][0], "output", atol=1e-10, rtol=1e-10)
    for name, ref in outs["reference"][1].items():
        tol = 1e-10 if name.startswith("experts.") else 1e-6  # router and x pass through softmax/top-k
        assert_close(outs["triton"][1][name], ref, name, atol=tol, rtol=tol)


@pytest.mark.parametrize("needs", ["x", "weights"])
def test_triton_gradient_reaches_only_what_needs_it(needs):
    """Only the input, or only the combine weights, requiring a gradient: that one still gets the reference's."""
    torch.manual_seed(3)
    moe = MoE(MoEConfig(dim=16, hidden_dim=24, num_experts=4, top_k=2)).requires_grad_(False)
    x0, g = torch.randn(9, 16), torch.randn(9, 16)
    routing = moe.route(x0)
    grads = {}
    for engine in ("reference", "triton"):
        x = x0.clone().requires_grad_(needs == "x")
        w = routing.weights_TK.detach().clone().requires_grad_(needs == "weights")
        y = get_engine(engine)(x, Routing(routing.expert_ids_TK, w, routing.scores_TE, routing.logits_TE),
                               moe.experts)
        (y * g).sum().backward()
        grads[engine] = x.grad if needs == "x" else w.grad
    assert grads["triton"] is not None
    assert_close(grads["triton"], grads["reference"], needs)


def test_triton_all_slots_dropped():
    moe = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=2, top_k=1))
    x = torch.randn(4, 8, requires_grad=True)
    routing = moe.route(x)
    empty = Routing(expert_ids_TK=torch.full_like(routing.expert_ids_TK, -1),
                    weights_TK=routing.weights_TK, scores_TE=routing.scores_TE, logits_TE=routing.logits_TE)
    y = get_engine("triton")(x, empty, moe.experts)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(moe.experts.w_up.grad, torch.zeros_like(moe.experts.w_up))


def _op_inputs(tm, activation, bias, T=9, K=2, E=4, D=20, F=24, drop=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if drop:
        ids[::3, 1] = -1
    ids_N = torch.where(ids.reshape(-1) < 0, E, ids.reshape(-1))
    order = torch.argsort(ids_N, stable=True)
    kw = dict(dtype=torch.float64)
    leaves = {
        "x": torch.randn(T, D, generator=gen, **kw),
        "w": torch.rand(T * K, generator=gen, **kw),
        "w_up": torch.randn(E, F, D, generator=gen, **kw) * 0.3,
        "w_down": torch.randn(E, D, F, generator=gen, **kw) * 0.3,
    }
    if activation in ("swiglu", "clamped_swiglu"):
        leaves["w_gate"] = torch.randn(E, F, D, generator=gen, **kw) * 0.3
    if bias:
        leaves.update(b_up=torch.randn(E, F, generator=gen, **kw), b_down=torch.randn(E, D, generator=gen, **kw))
        if "w_gate" in leaves:
            leaves["b_gate"] = torch.randn(E, F, generator=gen, **kw)
    expert_N = ids_N[order]
    counts = torch.bincount(ids_N, minlength=E + 1)[:E]

    def fn(*vals):
        v = dict(zip(leaves, vals))
        weights_N = torch.where(expert_N < E, v["w"][order], 0.0)
        return tm.triton_moe_ffn(v["x"], weights_N, order // K, expert_N, counts, v.get("w_gate"), v["w_up"],
                                 v["w_down"], activation, v.get("b_gate"), v.get("b_up"), v.get("b_down"))

    return fn, [t.requires_grad_(True) for t in leaves.values()]


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("swiglu", True), ("clamped_swiglu", True),
                                             ("gelu", False), ("gelu", True), ("relu", True)])
def test_triton_op_gradcheck(interpreter, activation, bias):
    """The hand-written backward against finite differences, in float64, with dropped slots and an expert
    that may receive nothing."""
    fn, leaves = _op_inputs(interpreter, activation, bias)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True, atol=1e-6)


def test_triton_float16_close_to_float32(interpreter):
    """Half-precision inputs with float32 accumulation stay within float16's rounding of the float32 result."""
    torch.manual_seed(1)
    moe = MoE(MoEConfig(dim=32, hidden_dim=48, num_experts=4, top_k=2))
    x = torch.randn(21, 32)
    routing = moe.route(x)
    y32 = get_engine("reference")(x, routing, moe.experts).detach()
    moe16 = moe.half()
    y16 = get_engine("triton")(x.half(), Routing(routing.expert_ids_TK, routing.weights_TK.half(),
                                                  routing.scores_TE, routing.logits_TE), moe16.experts)
    assert y16.dtype == torch.float16
    err = (y16.float() - y32).abs().max().item()
    assert err < 2e-2 * y32.abs().max().item(), err


def _schedule_oracle(counts, num_rows, bm):
    tiles, start = [], 0
    for e, c in enumerate(counts):
        for r in range(start, start + c, bm):
            tiles.append((e, r, min(r + bm, start + c)))
        start += c
    M = -(-num_rows // bm) + len(counts)
    return tiles + [(0, 0, 0)] * (M - len(tiles))


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=9), extra=st.integers(0, 20),
       bm=st.sampled_from([1, 2, 16, 32]))
def test_tile_schedule_matches_loop(interpreter, counts, extra, bm):
    num_rows = sum(counts) + extra
    got = interpreter.tile_schedule(torch.tensor(counts), num_rows, bm)
    assert got.dtype == torch.int32
    assert [tuple(t) for t in got.t().tolist()] == _schedule_oracle(counts, num_rows, bm)


@settings(max_examples=12, deadline=None)
@given(dim=st.integers(1, 40), hidden=st.integers(1, 40), num_experts=st.integers(1, 7), data=st.data(),
       tokens=st.integers(1, 20), activation=st.sampled_from(["swiglu", "gelu", "relu"]))
def test_triton_property(dim, hidden, num_experts, data, tokens, activation):
    top_k = data.draw(st.integers(1, num_experts))
    cfg = MoEConfig(dim=dim, hidden_dim=hidden, num_experts=num_experts, top_k=top_k, activation=activation)
    check_against_reference(cfg, (tokens,), engine="triton", atol=1e-4)


def test_auto_never_picks_triton():
    bank = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1)).experts
    x = torch.randn(3, 8)
    assert fused_triton._triton_supported(x, bank) is None  # it could run here...
    assert resolve_engine("auto", x, bank).name != "triton"  # ...but is never chosen:
    assert get_engine("triton").rank(x, bank) < get_engine("sorted").rank(x, bank)  # below the engine that runs all


def test_refusals_say_why(monkeypatch):
    bank = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1)).experts
    x = torch.randn(3, 8)
    assert "int64" in fused_triton._triton_supported(x.long(), bank)
    assert "float32" in fused_triton._triton_supported(x.half(), bank)  # weights float32, input float16
    with pytest.raises(ValueError, match="cannot run here"):
        resolve_engine("triton", x.long(), bank)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in fused_triton._triton_supported(x, bank)
    monkeypatch.setattr(fused_triton, "_triton_installed", lambda: False)
    assert "not installed" in fused_triton._triton_supported(x, bank)


@pytest.mark.parametrize("blocks", [(16, 32), (8, 32, 32), (16, 48, 32), (16, 32, True), (16.0, 32, 32)])
def test_bad_blocks_are_refused(interpreter, blocks):
    with pytest.raises(ValueError, match="powers of two >= 16"):
        interpreter._check_blocks(blocks)


def test_mismatched_op_inputs_are_refused(interpreter):
    x = torch.randn(4, 8)
    w_up, w_down = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    with pytest.raises(ValueError, match="one count per expert"):
        interpreter.triton_moe_ffn(x, torch.ones(4), torch.arange(4), torch.zeros(4, dtype=torch.long),
                                   torch.tensor([4, 0]), None, w_up, w_down, "gelu")


def test_refusal_messages_in_full(monkeypatch):
    """The device and dtype rules on CUDA (judged from the tensor's device and dtype alone, so checked here with
    a stand-in for a CUDA tensor) and the exact messages a user reads."""
    from types import SimpleNamespace

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bank = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1)).experts
    cuda = torch.device("cuda")
    assert fused_triton._triton_supported(SimpleNamespace(device=cuda, dtype=torch.float32), bank) is None
    assert fused_triton._triton_supported(SimpleNamespace(device=cuda, dtype=torch.float64), bank) == (
        "the Triton kernels take float16, bfloat16, float32 inputs, got torch.float64")  # float64: CPU twin only
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_triton._triton_supported(torch.zeros(2, 8, dtype=torch.int64), bank) == (
        "the Triton kernels take float16, bfloat16, float32, float64 inputs, got torch.int64")
    monkeypatch.setattr(fused_triton, "_triton_installed", lambda: False)
    assert fused_triton._triton_supported(torch.zeros(2, 8), bank) == (
        "Triton is not installed (pip install 'moekit[triton]', Linux only)")

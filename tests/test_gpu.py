"""GPU twins of the engine tests (skipped without CUDA; their CPU twins are in test_engines.py)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from moekit import MoE, MoEConfig, RouterConfig
from moekit.dispatch import resolve_engine

from .reference import assert_close

pytestmark = pytest.mark.gpu


def _run(moe, x, g):
    x = x.detach().clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    y = moe(x)
    (y * g).sum().backward()
    return y.detach().float(), [x.grad.float()] + [p.grad.float() for p in moe.parameters()]


_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (the 'triton' extra)")


@pytest.mark.parametrize("engine,cf,activation", [
    ("sorted", None, "swiglu"), ("sorted", 0.6, "swiglu"),
    # the triton engine's kernels compiled for the GPU (their CPU twin: tests/test_triton_engine.py)
    *(pytest.param("triton", cf, act, marks=_triton) for cf, act in [(None, "swiglu"), (0.6, "swiglu"), (0.6, "gelu")]),
])
def test_cuda_float32_matches_reference(engine, cf, activation):
    cfg = MoEConfig(dim=96, hidden_dim=136, num_experts=6, top_k=2, activation=activation,
                    router=RouterConfig(capacity_factor=cf))
    moe = MoE(replace(cfg, engine="reference")).cuda()
    fast = MoE(replace(cfg, engine=engine)).cuda()
    fast.load_state_dict(moe.state_dict())
    x, g = torch.randn(2, 33, 96, device="cuda"), torch.randn(2, 33, 96, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    y_ref, grads_ref = _run(moe, x, g)
    y, grads = _run(fast, x, g)
    assert_close(y, y_ref, "output", atol=1e-4)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, "grad", atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("engine", ["auto", pytest.param("triton", marks=_triton)])
def test_cuda_bfloat16_matches_float32_reference(engine):
    """``auto`` must pick grouped_mm here; triton is named explicitly."""
    cfg = MoEConfig(dim=128, hidden_dim=256, num_experts=8, top_k=2, router=RouterConfig(capacity_factor=0.8))
    ref = MoE(replace(cfg, engine="reference")).cuda()
    fast = MoE(replace(cfg, engine=engine)).cuda().bfloat16()
    fast.load_state_dict({k: v.bfloat16() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})  # same (rounded) weights
    x = torch.randn(4, 64, 128, device="cuda").bfloat16()
    if engine == "auto":
        assert resolve_engine("auto", x.view(-1, 128), fast.experts).name == "grouped_mm"
    g = torch.randn_like(x)
    y_ref, grads_ref = _run(ref, x.float(), g.float())
    y, grads = _run(fast, x, g)
    rel = (y - y_ref).abs().max() / y_ref.abs().max()
    assert rel < 3e-2, f"bf16 {engine} output off by {rel:.3g} relative"
    for a, b in zip(grads, grads_ref):
        rel = (a - b).abs().max() / b.abs().max().clamp_min(1e-6)
        assert rel < 6e-2, f"bf16 {engine} gradient off by {rel:.3g} relative"

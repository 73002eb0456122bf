"""CUDA twins of the patch tests: bfloat16 models on the GPU, where moekit's ``auto`` engine is grouped_mm.

Skipped without CUDA. Run: python -m pytest tests/test_hf_gpu.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
transformers = pytest.importorskip("transformers")

import moekit  # noqa: E402
import moekit.hf as mh  # noqa: E402
from moekit.dispatch import get_engine, resolve_engine  # noqa: E402
from moekit.hf.tiny import tiny_model  # noqa: E402


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_patched_bf16_model_on_cuda(arch: str) -> None:
    model = tiny_model(arch, dim=64, hidden_dim=32, init_std=0.1).cuda().to(torch.bfloat16)
    # GPT-OSS's interleaved gate/up weights are strided views that grouped_mm cannot take: copy them
    patched = mh.patch(copy.deepcopy(model), copy=arch == "gpt_oss")
    moe = next(m.moe for m in patched.modules() if isinstance(m, mh.PatchedMoEBlock))
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_engine("auto", x, moe.experts).name == "grouped_mm"
    ids = torch.randint(0, 101, (2, 16), device="cuda")
    want, got = model(ids).logits.float(), patched(ids).logits.float()
    # bf16: compare against the float32 model's error scale, not bit for bit
    ref32 = tiny_model(arch, dim=64, hidden_dim=32, init_std=0.1).cuda()(ids).logits
    err_hf, err_mk = (want - ref32).abs().mean(), (got - ref32).abs().mean()
    assert err_mk < 2 * err_hf + 1e-3, (err_mk, err_hf)
    out = patched(ids, labels=ids)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters() if p.grad is not None)


def test_grouped_mm_engine_on_cuda_matches_reference_with_drops_and_biases() -> None:
    cfg = moekit.MoEConfig(dim=64, hidden_dim=32, num_experts=8, top_k=2, use_ffn_bias=True,
                           activation="clamped_swiglu", router=moekit.RouterConfig(capacity_factor=0.5))
    moe = moekit.MoE(cfg).cuda()
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    assert (moe.route(x).expert_ids_TK < 0).any()
    outs = {}
    for name in ("reference", "grouped_mm"):
        x.grad = None
        moe.zero_grad()
        routing = moe.route(x)  # a fresh graph for each backward
        y = get_engine("reference").fn(x, routing, moe.experts) if name == "reference" else \
            get_engine(name).fn(x, routing, moe.experts)
        y.square().sum().backward()
        outs[name] = (y.detach(), x.grad.clone(), moe.experts.b_up.grad.clone(), moe.experts.w_down.grad.clone())
    for a, b in zip(outs["grouped_mm"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)

"""Core options added for the Hugging Face adapters: per-expert biases, the clamped SwiGLU of GPT-OSS, a router
logit bias, a fixed selection bias, a sized and gated shared FFN.

Each is checked against a per-token loop oracle written here from the formulas, for the forward output and for
the gradients of the input and of every weight, on every engine that runs on CPU.

Run: python -m pytest tests/test_hf_core.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.dispatch import get_engine
from moekit.experts.activations import hidden
from moekit.ops import sorted_moe_ffn

CPU_ENGINES = ["reference", "sorted"]


def oracle(moe: moekit.MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Per token, per slot: the MoE definition written out with ``F.linear``."""
    bank, r = moe.experts, moe.router
    logits = F.linear(x_TD, r.weight, r.bias)
    scores = logits.softmax(-1) if r.config.score_func == "softmax" else logits.sigmoid()
    choice = scores + (r.expert_bias if r.uses_bias else 0)
    rows = []
    for t in range(x_TD.shape[0]):
        ids = choice[t].topk(moe.config.top_k).indices
        w = scores[t, ids]
        w = w / w.sum() if r.config.renormalize(r.top_k) else w
        y = torch.zeros_like(x_TD[t])
        for e, we in zip(ids.tolist(), w):
            b = (lambda p: None if p is None else p[e])
            up = F.linear(x_TD[t], bank.w_up[e], b(bank.b_up))
            gate = F.linear(x_TD[t], bank.w_gate[e], b(bank.b_gate)) if bank.gated else None
            y = y + we * F.linear(hidden(bank.activation, gate, up), bank.w_down[e], b(bank.b_down))
        if moe.shared_experts is not None:
            s = moe.shared_experts(x_TD[t])
            if moe.w_shared_gate is not None:
                s = torch.sigmoid(moe.w_shared_gate[0] @ x_TD[t]) * s
            y = y + s
        rows.append(y)
    return torch.stack(rows)


def randomize(moe: moekit.MoE, scale: float = 1.0) -> moekit.MoE:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, scale)
        moe.router.expert_bias.normal_(0, 0.5)
    return moe


def grads(moe: moekit.MoE, x: torch.Tensor, fn) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    names, params = zip(*moe.named_parameters())
    out = fn(x)
    gs = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (x, *params))
    return {"out": out.detach(), "x": gs[0], **dict(zip(names, gs[1:]))}


@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize("activation", ["clamped_swiglu", "gelu", "swiglu"])
def test_biases_activation_shared_gate_match_oracle(engine: str, activation: str) -> None:
    cfg = moekit.MoEConfig(dim=12, hidden_dim=7, num_experts=5, top_k=3, activation=activation,
                           num_shared_experts=1, shared_hidden_dim=9, use_shared_gate=True, use_ffn_bias=True,
                           engine=engine, router=moekit.RouterConfig(use_logit_bias=True, aux_loss_coef=0.0))
    moe = randomize(moekit.MoE(cfg), scale=1.5)  # large enough that clamped_swiglu clips some inputs
    x = torch.randn(13, 12) * 2
    got, want = grads(moe, x, moe), grads(moe, x, lambda x: oracle(moe, x))
    if activation == "clamped_swiglu":
        h = F.linear(x, moe.experts.w_gate[0], moe.experts.b_gate[0])
        assert (h > 7).any() or (h < -7).any(), "test should exercise the clamp"
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")


def test_selection_bias_changes_choice_not_weights() -> None:
    cfg = moekit.MoEConfig(dim=6, hidden_dim=4, num_experts=6, top_k=2, engine="reference",
                           router=moekit.RouterConfig(score_func="sigmoid", use_selection_bias=True))
    moe = moekit.MoE(cfg)
    x = torch.randn(20, 6)
    with torch.no_grad():
        moe.router.expert_bias.zero_()
        moe.router.expert_bias[5] = 10.0  # forces expert 5 into every token's choice
    routing = moe.route(x)
    assert (routing.expert_ids_TK == 5).any(-1).all()
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(20))  # weights: unbiased, renormalised
    assert moe.router.updates_bias is False and moe.router.uses_bias is True
    moe.train()
    moe.route(x)
    assert moe.router.pending_counts.sum() == 0, "a fixed selection bias must not gather update counts"
    torch.testing.assert_close(oracle(moe, x), moe(x), rtol=1e-5, atol=1e-5)


def test_strided_weight_views_give_the_same_result() -> None:
    """Adapters hand the engines views into checkpoint tensors (interleaved, transposed): no copy needed."""
    torch.manual_seed(0)
    E, F_, D = 4, 6, 8
    packed = torch.randn(E, D, 2 * F_)  # GPT-OSS layout: [E, D, 2F], gate and up interleaved
    w_gate, w_up = packed[..., ::2].transpose(1, 2), packed[..., 1::2].transpose(1, 2)
    w_down = torch.randn(E, F_, D).transpose(1, 2)
    x = torch.randn(10, D)
    ids = torch.randint(0, E, (10, 2))
    counts = torch.bincount(ids.view(-1), minlength=E).tolist()
    token_N = ids.view(-1).argsort(stable=True) // 2
    weights_N = torch.rand(20)
    want = sorted_moe_ffn(x, weights_N, token_N, counts, w_gate.contiguous(), w_up.contiguous(),
                          w_down.contiguous(), "swiglu")
    got = sorted_moe_ffn(x, weights_N, token_N, counts, w_gate, w_up, w_down, "swiglu")
    torch.testing.assert_close(got, want)
    assert get_engine("sorted") is not None


def test_grouped_mm_engine_with_biases_matches_reference() -> None:
    """The grouped_mm engine is auto-selected only on CUDA, but its function runs on CPU (16-byte strides)."""
    from moekit.dispatch.sorted import grouped_mm_engine

    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch.nn.functional.grouped_mm needs torch >= 2.8")
    cfg = moekit.MoEConfig(dim=16, hidden_dim=16, num_experts=4, top_k=2, use_ffn_bias=True,
                           activation="clamped_swiglu", router=moekit.RouterConfig(capacity_factor=0.5))
    moe = randomize(moekit.MoE(cfg))
    x = torch.randn(12, 16)
    routing = moe.route(x)
    assert (routing.expert_ids_TK < 0).any(), "capacity should drop some slots"
    got = grads(moe, x, lambda x: grouped_mm_engine(x, moe.route(x), moe.experts))
    want = grads(moe, x, lambda x: get_engine("reference")(x, moe.route(x), moe.experts))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")

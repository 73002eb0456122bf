"""Expert banks and dense FFNs: defaults, size/activation errors naming the field, and initial scales
(std D^-1/2 for input projections, F^-1/2 for the output one). From the experts mutation run (docs/testing.md)."""

from __future__ import annotations

import pytest
import torch

from moekit import FeedForward
from moekit.configs import ConfigError
from moekit.experts import ExpertBank


def test_bank_defaults_are_gated_swiglu_without_biases():
    bank = ExpertBank(3, 8, 16)
    assert bank.activation == "swiglu" and bank.gated and bank.w_gate is not None
    assert bank.b_up is None and bank.b_gate is None and bank.b_down is None
    assert FeedForward(8, 16).w_gate is not None  # FeedForward defaults to SwiGLU too


@pytest.mark.parametrize("sizes", [(0, 8, 16), (2, 0, 16), (2, 8, 0)])
def test_bank_rejects_empty_sizes(sizes):
    with pytest.raises(ConfigError, match="ExpertBank needs positive sizes, got num_experts="):
        ExpertBank(*sizes)


def test_unknown_activation_names_the_owner():
    with pytest.raises(ConfigError, match=r"^experts\.activation='tanh' is not one of"):
        ExpertBank(2, 8, 16, "tanh")
    with pytest.raises(ConfigError, match=r"^ffn\.activation='tanh' is not one of"):
        FeedForward(8, 16, "tanh")


def _std(t: torch.Tensor) -> float:
    return t.detach().float().std().item()


def test_initial_scales():
    torch.manual_seed(0)
    D, F_ = 64, 256
    bank = ExpertBank(4, D, F_)
    assert _std(bank.w_up) == pytest.approx(D**-0.5, rel=0.05)
    assert _std(bank.w_gate) == pytest.approx(D**-0.5, rel=0.05)
    assert _std(bank.w_down) == pytest.approx(F_**-0.5, rel=0.05)
    bank.reset_parameters(std=0.3)
    assert all(_std(w) == pytest.approx(0.3, rel=0.05) for w in (bank.w_up, bank.w_gate, bank.w_down))
    ffn = FeedForward(D, F_)
    assert _std(ffn.w_up) == pytest.approx(D**-0.5, rel=0.05)
    assert _std(ffn.w_gate) == pytest.approx(D**-0.5, rel=0.05)
    assert _std(ffn.w_down) == pytest.approx(F_**-0.5, rel=0.05)


def test_clamped_swiglu_backward_at_the_clamp_limit_matches_autograd():
    from moekit.experts.activations import CLAMP_LIMIT, hidden, hidden_backward

    h_gate = torch.tensor([CLAMP_LIMIT, -CLAMP_LIMIT, 6.5, 7.5, 0.3], dtype=torch.float64, requires_grad=True)
    h_up = torch.tensor([CLAMP_LIMIT, -CLAMP_LIMIT, -7.5, 2.0, 7.0 + 1e-9], dtype=torch.float64, requires_grad=True)
    grad_a = torch.tensor([1.0, -2.0, 0.5, 1.5, -1.0], dtype=torch.float64)
    hidden("clamped_swiglu", h_gate, h_up).backward(grad_a)
    grad_gate, grad_up = hidden_backward("clamped_swiglu", h_gate.detach(), h_up.detach(), grad_a.clone())
    torch.testing.assert_close(grad_gate, h_gate.grad)
    torch.testing.assert_close(grad_up, h_up.grad)


def test_low_level_activation_functions_refuse_unknown_names():
    """``hidden``/``hidden_backward`` (used by the fused engines, below the bank's config check) must not fall
    back to ReLU for a name they do not know, e.g. ``silu`` passed where ``swiglu`` was meant."""
    from moekit.experts.activations import hidden, hidden_backward
    from moekit.ops import sorted_moe_ffn

    h = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"unknown expert activation 'silu': use one of swiglu, clamped_swiglu"):
        hidden("silu", h, h)
    with pytest.raises(ValueError, match="unknown expert activation 'silu'"):
        hidden_backward("silu", h, h, h.clone())
    w = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="unknown expert activation 'silu'"):
        sorted_moe_ffn(torch.randn(2, 8), torch.ones(2), torch.tensor([0, 1]), [1, 1], w, w, w.transpose(1, 2),
                       "silu")
    torch.testing.assert_close(hidden("relu", None, h), h.relu())
    torch.testing.assert_close(hidden_backward("relu", None, h, torch.ones_like(h))[1], (h > 0).to(h.dtype))

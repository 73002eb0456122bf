"""The int8 matmul path of ``int`` banks (``torch._int_mm`` on per-token int8 activations) against the
dequantise-then-matmul reference: odd sizes, one token, no token, biases, every bit width; the bank falls back to
the float path when a gradient is needed (the integer path has no backward)."""

import pytest
import torch

from moekit import MoEConfig
from moekit.compression.api import compress
from moekit.compression.int8mm import int8_linear, quantize_activations, reference_linear, shifted_codes
from moekit.compression.quant import rtn
from moekit.models import LanguageModel, ModelConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("T, C, R", [(0, 13, 7), (1, 13, 7), (9, 33, 5), (20, 64, 48)])
def test_int8_linear_equals_the_dequantised_reference_on_quantised_activations(bits, T, C, R):
    g = torch.Generator().manual_seed(bits * 100 + T)
    x = torch.randn(T, C, generator=g) * 3
    w = torch.randn(R, C, generator=g)
    bias = torch.randn(R, generator=g)
    q, grid = rtn(w, bits)
    scale, zero = grid.scale_R.half().float(), grid.zero_R.half().float()
    y = int8_linear(x, shifted_codes(q, bits), bits, scale, zero, bias)
    ref = reference_linear(x, q, scale, zero, bias)
    assert y.shape == (T, R) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4 * max(1.0, float(ref.abs().max()) if T else 1.0))
    if T:  # against float activations the only extra error is int8 activation rounding
        exact = reference_linear(x, q, scale, zero, bias, quantize_x=False)
        _, s_T = quantize_activations(x)
        wd = (q.double() - zero.double()[:, None]) * scale.double()[:, None]
        bound = (s_T.double()[:, None] / 2) * wd.abs().sum(1)[None, :]
        assert ((y.double() - exact).abs() <= bound + 1e-4).all()


def test_activation_quantiser_is_per_token_symmetric_and_handles_zero_tokens():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    xq, s = quantize_activations(x)
    assert xq.dtype == torch.int8 and torch.equal(xq[0], torch.zeros(3, dtype=torch.int8))
    assert s[0] == 1.0 and xq[1, 1] == -127 and torch.isclose(s[1], torch.tensor(2 / 127))


def test_shifted_codes_fit_int8_and_reject_wider_codes():
    q = torch.tensor([[0, 255, 128]])
    assert shifted_codes(q, 8).tolist() == [[-128, 127, 0]]
    with pytest.raises(ValueError, match="1-8 bit"):
        shifted_codes(q, 9)


def tiny_lm():
    torch.manual_seed(0)
    moe = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=2, activation="swiglu")
    return LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, context=16, moe=moe)).eval()


def test_bank_int8_path_matches_dequantise_path_and_falls_back_for_gradients():
    model = tiny_lm()
    calib = torch.randint(0, 40, (12, 16), generator=torch.Generator().manual_seed(1))
    compress(model, "rtn", calib, bits=8)
    bank = model.layers[0].ffn.experts
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        deq = bank.expert(x, 3)
        bank.matmul = "int8"
        fast = bank.expert(x, 3)
    assert not torch.equal(fast, deq)  # the int path really ran (activation rounding differs)
    assert torch.allclose(fast, deq, atol=0.02 * float(deq.abs().max()))
    xg = x.clone().requires_grad_(True)
    out = bank.expert(xg, 3)  # needs a gradient: the float path
    assert torch.allclose(out, deq, atol=1e-6)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    t = calib[:2]
    with torch.no_grad():
        for b in model.layers:
            b.ffn.experts.matmul = "dequantize"
        ref = model(t)[0]
        for b in model.layers:
            b.ffn.experts.matmul = "int8"
        got = model(t)[0]
    # int8 activations on an untrained model with tiny logits: measured 3.7% mean relative difference
    assert 0 < (got - ref).abs().mean() < 0.06 * ref.abs().mean()

"""EAQuant's activation quantisation and block-Hadamard rotation (spec §5; :mod:`moekit.compression.actquant`),
its ``down_proj`` outlier smoothing, and the act_bits / rotate options of ``rtn`` and ``eaquant``."""

import dataclasses

import pytest
import torch

from moekit import MoEConfig
from moekit.cli.main import main
from moekit.compression import artifact
from moekit.compression.actquant import act_fake_quant, hadamard_block, rotate, rotation_block
from moekit.compression.api import compress
from moekit.compression.bank import CompressedBank
from moekit.compression.calibrate import CompressionError
from moekit.compression.eaquant import apply_down_smoothing, down_smoothing_scales, otsu_threshold
from moekit.compression.mote import act_quant_int8
from moekit.experts import ExpertBank
from moekit.experts.activations import hidden
from moekit.models import LanguageModel, ModelConfig


def tiny_lm(seed=0, dim=16, hidden_dim=24):
    torch.manual_seed(seed)
    moe = MoEConfig(dim=dim, hidden_dim=hidden_dim, num_experts=4, top_k=2)
    return LanguageModel(ModelConfig(vocab_size=40, dim=dim, num_layers=2, num_heads=2, context=16, moe=moe)).eval()


def tokens(n=8, s=16, seed=1):
    return torch.randint(0, 40, (n, s), generator=torch.Generator().manual_seed(seed))


def logits(model, t):
    with torch.no_grad():
        return model(t)[0]


@pytest.mark.parametrize("channels, block", [(7, 1), (12, 4), (48, 16), (96, 32), (384, 128)])
def test_hadamard_blocks_are_orthogonal_and_their_own_inverse(channels, block):
    assert rotation_block(channels) == block
    h = hadamard_block(block)
    assert torch.allclose(h @ h.T, torch.eye(block), atol=1e-6) and torch.equal(h, h.T)
    x = torch.randn(5, channels, dtype=torch.float64)
    assert torch.allclose(rotate(rotate(x)), x, atol=1e-12)
    if block > 1:
        assert not torch.allclose(rotate(x), x)


@pytest.mark.parametrize("activation, use_bias, D, F", [("swiglu", False, 12, 20), ("gelu", True, 16, 24),
                                                       ("swiglu", True, 7, 9)])
def test_rotated_bank_equals_the_float_experts_in_outputs_and_gradients(activation, use_bias, D, F):
    torch.manual_seed(0)
    ref = ExpertBank(3, D, F, activation, use_bias=use_bias)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    w = {n: p.detach() for n, p in ref.named_parameters()}
    rotated = {n: rotate(t) if n.startswith("w_") else t for n, t in w.items()}
    bank = CompressedBank.from_float(rotated, torch.arange(3), activation=activation)
    bank.spec = dataclasses.replace(bank.spec, rotate=True)
    def reference(x, e):
        b = {k: w[k][e] if use_bias and k in w else 0 for k in ("b_gate", "b_up", "b_down")}
        up = x @ w["w_up"][e].T + b["b_up"]
        gate = x @ w["w_gate"][e].T + b["b_gate"] if "w_gate" in w else None
        return hidden(activation, gate, up) @ w["w_down"][e].T + b["b_down"]

    for e in range(3):
        for T in (1, 6):
            x = torch.randn(T, D, requires_grad=True)
            want = reference(x, e)
            x2 = x.detach().clone().requires_grad_(True)
            got = bank.expert(x2, e)
            # float32 rounding relative to the tensor's scale (unit-normal weights give entries near 100, and an
            # entry that cancels to ~0.1 keeps their absolute error); a wrong rotation is off by O(1) of the scale
            assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
            g = torch.randn_like(want)
            (ga,) = torch.autograd.grad(want, x, g)
            (gb,) = torch.autograd.grad(got, x2, g)
            assert torch.allclose(ga, gb, atol=1e-5 * ga.abs().max().item(), rtol=1e-5)
    if rotation_block(D) > 1:  # the rotated weights without the online rotation are a different function
        bank.spec = dataclasses.replace(bank.spec, rotate=False)
        x = torch.randn(4, D)
        assert not torch.allclose(bank.expert(x, 0), reference(x, 0), atol=1e-3)


def test_activation_fake_quant_identities_and_grids():
    x = torch.randn(6, 10) * torch.logspace(-2, 2, 10)
    assert act_fake_quant(x, 0) is x and act_fake_quant(x, 16) is x
    assert torch.equal(act_fake_quant(x, 8), act_quant_int8(x))  # MoTE's int8 is the 8-bit case
    for bits in (4, 8):
        q = act_fake_quant(x, bits)
        step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        codes = q / step
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.round().abs().max() <= 2 ** (bits - 1) - 1
        assert ((q - x).abs() <= step / 2 + 1e-6).all()  # no clipping at act_clip=1: within half a step
    clipped = act_fake_quant(x, 4, 0.5)
    assert (clipped.abs().amax(-1) < x.abs().amax(-1)).all()
    zero = torch.zeros(1, 5)  # one token of zeros: no division by zero
    assert torch.equal(act_fake_quant(zero, 4), zero)


def test_rotation_lowers_the_a4_error_when_a_channel_has_an_outlier():
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    x[:, 5] *= 40.0  # one massive activation channel: per-token A4 steps are set by it
    w = torch.randn(32, 64)
    exact = x @ w.T
    plain = act_fake_quant(x, 4) @ w.T
    rotated = act_fake_quant(rotate(x), 4) @ rotate(w).T
    err_plain, err_rot = (plain - exact).norm(), (rotated - exact).norm()
    assert err_rot < 0.5 * err_plain, (err_rot, err_plain)
    # with no activation quantisation, the rotated product is the original one
    assert torch.allclose(rotate(x) @ rotate(w).T, exact, atol=1e-3, rtol=1e-4)


def test_otsu_splits_two_clusters_and_down_smoothing_finds_a_planted_outlier():
    v = torch.cat([torch.rand(50), 10 + torch.rand(5)])
    t = otsu_threshold(v)
    assert 1.0 < t < 10.0
    torch.manual_seed(0)
    D, F = 8, 40
    w = {"w_gate": torch.randn(F, D), "w_up": torch.randn(F, D), "w_down": torch.randn(D, F),
         "b_up": torch.randn(F)}
    w["w_up"][7] *= 30.0  # hidden channel 7 carries outliers
    x = torch.randn(50, D)

    def run(w):
        return hidden("swiglu", x @ w["w_gate"].T, x @ w["w_up"].T + w["b_up"]) @ w["w_down"].T

    before = run(w)
    s_F = down_smoothing_scales(w, x, "swiglu")
    assert s_F[7] > 2.0 and torch.equal(torch.cat([s_F[:7], s_F[8:]]), torch.ones(F - 1))
    smoothed = dict(w)
    apply_down_smoothing(smoothed, s_F)
    assert torch.allclose(run(smoothed), before, atol=1e-3, rtol=1e-4)
    h = hidden("swiglu", x @ smoothed["w_gate"].T, x @ smoothed["w_up"].T + smoothed["b_up"])
    h0 = hidden("swiglu", x @ w["w_gate"].T, x @ w["w_up"].T + w["b_up"])
    assert h.abs().amax() < h0.abs().amax()  # the outlier channel is scaled down
    flat = {"w_gate": torch.randn(F, D), "w_up": torch.randn(F, D), "w_down": torch.randn(D, F)}
    assert torch.equal(down_smoothing_scales(flat, torch.zeros(0, D), "swiglu"), torch.ones(F))


@pytest.mark.parametrize("method", ["rtn", "eaquant"])
def test_act_bits_and_rotation_are_stored_and_applied_after_reload(method, tmp_path):
    t = tokens()
    base = tiny_lm()
    w8 = tiny_lm()
    compress(w8, method, t, bits=8)
    a4 = tiny_lm()
    report = compress(a4, method, t, bits=8, act_bits=4, rotate=True)
    assert report.options["act_bits"] == 4 and report.options["rotate"] is True
    bank = a4.layers[0].ffn.experts
    assert bank.spec.act_bits == 4 and bank.spec.rotate and bank.spec.act_clip == 0.9
    ref, got8, got4 = logits(base, t), logits(w8, t), logits(a4, t)
    assert torch.isfinite(got4).all() and not torch.allclose(got4, got8, atol=1e-4)
    assert (got4 - ref).abs().mean() > (got8 - ref).abs().mean()  # A4 costs more than A16
    header = artifact.header_of(a4, method, report.options)
    assert header["layers"]["layers.0.ffn"]["bank"]["act_bits"] == 4
    artifact.save_compressed_state(a4, tmp_path / "m.safetensors", header)
    fresh = tiny_lm(seed=5)
    artifact.load_compressed_state(fresh, tmp_path / "m.safetensors")
    assert torch.equal(logits(fresh, t), got4)


def test_rotation_alone_keeps_rtn_int8_close_to_float_and_stores_rotated_weights():
    t = tokens()
    base, rot = tiny_lm(), tiny_lm()
    w_up = base.layers[0].ffn.experts.w_up[1].detach().clone()
    compress(rot, "rtn", t, bits=8, rotate=True)
    bank = rot.layers[0].ffn.experts
    stored = bank.weights(1)["w_up"]
    assert torch.allclose(stored, rotate(w_up), atol=0.02 * float(w_up.abs().max()))
    assert not torch.allclose(stored, w_up, atol=0.05)
    plain = tiny_lm()
    compress(plain, "rtn", t, bits=8)
    ref = logits(base, t)
    err_rot, err_plain = (logits(rot, t) - ref).abs().mean(), (logits(plain, t) - ref).abs().mean()
    assert err_rot < 3 * err_plain and err_rot < 0.02 * ref.abs().mean(), (err_rot, err_plain)


def test_activation_options_are_validated():
    t = tokens()
    for kwargs, fragment in (({"act_bits": 5}, "act_bits=5"), ({"act_clip": 0.0}, "act_clip=0.0"),
                             ({"act_clip": 1.5}, "act_clip=1.5")):
        with pytest.raises(CompressionError, match=fragment):
            compress(tiny_lm(), "rtn", t, bits=8, **kwargs)
    with pytest.raises(CompressionError, match="does not quantise activations"):
        compress(tiny_lm(), "gptq", t, bits=4, act_bits=4)
    with pytest.raises(CompressionError, match="does not quantise activations"):
        compress(tiny_lm(), "m-smoe", t, keep_experts=2, rotate=True)
    with pytest.raises(ValueError, match="act_bits=3"):
        dataclasses.replace(tiny_lm_bank_spec(), act_bits=3)


def tiny_lm_bank_spec():
    m = tiny_lm()
    compress(m, "rtn", tokens(), bits=8)
    return m.layers[0].ffn.experts.spec


def test_cli_act_bits_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "--train.max_steps=2",
                 "--train.eval_every", "0"]) == 0
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["compress", str(run), "--method", "eaquant", "--bits", "4", "--act-bits", "3", "--out",
                 str(out), "--calibration-tokens", "256"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "act_bits=3" in err and not out.exists()
    assert main(["compress", str(run), "--method", "eaquant", "--bits", "4", "--act-bits", "4", "--rotate",
                 "--out", str(out), "--calibration-tokens", "256"]) == 0
    assert main(["eval", str(out), "--batches", "1"]) == 0
    assert "bits/byte" in capsys.readouterr().out


def test_expert_offloading_refuses_banks_that_quantise_activations():
    from moekit.serving.offload import OffloadedExpertBank
    m = tiny_lm()
    compress(m, "rtn", tokens(), bits=8, act_bits=8)
    with pytest.raises(ValueError, match="without expert offloading"):
        OffloadedExpertBank(m.layers[0].ffn.experts, 0, None)

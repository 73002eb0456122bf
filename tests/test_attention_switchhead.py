"""SwitchHead (architectures.md §4): a per-token reference, the spec's minimal faithful tests, its loss,
statistics, bad input and the model hook (``model.attention``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.layers import build_attention
from moekit.layers.attention import rope_tables
from moekit.layers.attention.rope import apply_rope
from moekit.layers.attention.switchhead import SwitchHead, SwitchHeadConfig
from moekit.models import Attention, LanguageModel

from .reference import assert_close


def reference_switchhead(layer: SwitchHead, x_BSD, cos_SR, sin_SR):
    """A readable loop: for each sequence, head and token, its top-k experts on each side, causal softmax."""
    B, S, D = x_BSD.shape
    H, Dh, E, k = layer.num_heads, layer.head_dim, layer.num_experts, layer.config.top_k
    out = torch.zeros(B, S, D)
    q = apply_rope(layer.w_q(x_BSD).view(B, S, H, Dh).transpose(1, 2), cos_SR, sin_SR)
    kk = apply_rope(layer.w_k(x_BSD).view(B, S, H, Dh).transpose(1, 2), cos_SR, sin_SR)
    sel_v = layer.w_sel_v(x_BSD).view(B, S, H, E)
    sel_o = layer.w_sel_o(x_BSD).view(B, S, H, E)
    for b in range(B):
        for h in range(H):
            v = []
            for j in range(S):
                v_j = torch.zeros(Dh)
                for e in sel_v[b, j, h].topk(k).indices.tolist():
                    v_j = v_j + torch.sigmoid(sel_v[b, j, h, e]) * (x_BSD[b, j] @ layer.w_v_HEDDh[h, e])
                v.append(v_j)
            v = torch.stack(v)
            for i in range(S):
                scores = (q[b, h, i] @ kk[b, h, : i + 1].T) / math.sqrt(Dh)
                a_i = scores.softmax(-1) @ v[: i + 1]
                for e in sel_o[b, i, h].topk(k).indices.tolist():
                    out[b, i] = out[b, i] + torch.sigmoid(sel_o[b, i, h, e]) * (a_i @ layer.w_o_HEDhD[h, e])
    return out


def _tables(S, Dh):
    return rope_tables(S, Dh, 10000.0)


def test_matches_the_per_token_reference_on_outputs_and_gradients():
    torch.manual_seed(0)  # odd sizes: 3 heads of 4, 3 experts, top-2, 5 tokens
    layer = SwitchHead(12, 3, 2, SwitchHeadConfig(num_experts=3, top_k=2))
    x = torch.randn(2, 5, 12, requires_grad=True)
    cos, sin = _tables(5, 4)
    y = layer(x, cos, sin)
    ref = reference_switchhead(layer, x, cos, sin)
    assert_close(y, ref, "outputs")
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, *layer.parameters()])
    for (name, _), a, b in zip([("x", None), *layer.named_parameters()], grads, ref_grads):
        assert_close(a, b, name)


def test_one_token_and_a_single_expert_per_side():
    torch.manual_seed(1)
    layer = SwitchHead(8, 2, 2, SwitchHeadConfig(num_experts=5, top_k=1))
    x = torch.randn(1, 1, 8)
    cos, sin = _tables(1, 4)
    assert_close(layer(x, cos, sin), reference_switchhead(layer, x, cos, sin), "one token")


def test_n_heads_attention_matrices_whatever_the_experts(monkeypatch):
    layer = SwitchHead(16, 4, 2, SwitchHeadConfig(num_heads=2, num_experts=8, top_k=3))
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.shape[1])
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    layer(torch.randn(2, 6, 16), *_tables(6, 8))
    assert seen == [2], "one call computing num_heads = 2 attention matrices, not num_heads * num_experts"


def test_one_expert_top1_with_unit_gates_is_standard_attention():
    torch.manual_seed(2)
    dense = Attention(12, 3, 2)
    layer = SwitchHead(12, 3, 2, SwitchHeadConfig(num_experts=1, top_k=1, gate="ones"))
    Wq, Wk, Wv = dense.w_qkv.weight.detach().view(3, 12, 12)
    with torch.no_grad():
        layer.w_q.weight.copy_(Wq), layer.w_k.weight.copy_(Wk)
        for h in range(3):
            layer.w_v_HEDDh[h, 0] = Wv[h * 4:(h + 1) * 4].T
            layer.w_o_HEDhD[h, 0] = dense.w_out.weight[:, h * 4:(h + 1) * 4].T
    x = torch.randn(2, 7, 12)
    cos, sin = _tables(7, 4)
    assert_close(layer(x, cos, sin), dense(x, cos, sin), "E = k = 1 with unit gates is multi-head attention")


def test_gates_are_non_competitive_and_selection_is_per_token():
    torch.manual_seed(3)
    layer = SwitchHead(16, 2, 2, SwitchHeadConfig(num_experts=4, top_k=2))
    x = torch.randn(1, 6, 16)
    _, _, (gv, ids_v), (go, _) = layer.select(x)
    chosen = gv.gather(-1, ids_v)
    assert ((chosen > 0) & (chosen < 1)).all() and ((gv > 0).sum(-1) == 2).all()
    assert not torch.allclose(chosen.sum(-1), torch.ones(())), "sigmoid gates do not sum to 1"
    x2 = x.clone()
    x2[0, 3] += 5 * torch.randn(16)  # change one token: only that token's V and O selections may change
    _, _, (gv2, _), (go2, _) = layer.select(x2)
    others = [0, 1, 2, 4, 5]
    assert torch.equal(gv2[0, others], gv[0, others]) and torch.equal(go2[0, others], go[0, others])
    assert not torch.equal(gv2[0, 3], gv[0, 3])


def test_expert_dropout_only_in_training():
    torch.manual_seed(4)
    layer = SwitchHead(8, 2, 2, SwitchHeadConfig(num_experts=4, top_k=2, expert_dropout=0.5))
    x = torch.randn(2, 9, 8)
    layer.eval()
    ev = layer.select(x)[2][0]
    layer.train()
    tr = layer.select(x)[2][0]
    assert ((ev > 0).sum(-1) == 2).all() and ((tr > 0).sum(-1) < 2).any()


def test_entropy_loss_coefficient_and_gradient():
    torch.manual_seed(5)
    x = torch.randn(2, 5, 8)
    cos, sin = _tables(5, 4)
    off = RoutingContext()
    SwitchHead(8, 2, 2, SwitchHeadConfig())(x, cos, sin, ctx=off)
    assert "switchhead_entropy_loss" not in off.losses
    values = {}
    for coef in (0.1, 0.3):
        torch.manual_seed(6)
        layer = SwitchHead(8, 2, 2, SwitchHeadConfig(entropy_coef=coef), name="l")
        ctx = RoutingContext()
        layer(x, cos, sin, ctx=ctx)
        values[coef] = ctx.losses["switchhead_entropy_loss"]
    assert values[0.1] > 0
    assert_close(values[0.3], 3 * values[0.1], "coefficient applied")
    layer.zero_grad()
    values[0.3].backward()
    assert layer.w_sel_v.weight.grad.abs().sum() > 0 and layer.w_sel_o.weight.grad.abs().sum() > 0
    assert layer.w_q.weight.grad is None


def test_statistics_cover_every_heads_experts():
    torch.manual_seed(7)
    layer = SwitchHead(8, 2, 2, SwitchHeadConfig(num_experts=3, top_k=1), name="layers.0.attn")
    ctx = RoutingContext(collect_stats=True)
    layer(torch.randn(2, 6, 8), *_tables(6, 4), ctx=ctx)
    for side in ("v", "o"):
        stats = ctx.stats[f"layers.0.attn.{side}"]
        assert stats.counts_E.numel() == 6 and int(stats.counts_E.sum()) == 2 * 6 * 2  # T tokens x H heads x k
        assert stats.summary()["attention_matrices"] == 2.0


def test_bad_options_name_the_field_and_fix():
    with pytest.raises(ConfigError, match="attention_options.top_k=5.*lower top_k"):
        SwitchHeadConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="num_heads=3 does not divide model.dim=16"):
        build_attention("switchhead", {"num_heads": 3}, dim=16, num_heads=4, num_layers=2, context=8)
    with pytest.raises(ConfigError, match="unknown config key 'attention_options.capacity_factor'"):
        build_attention("switchhead", {"capacity_factor": 1.0}, dim=16, num_heads=4, num_layers=2, context=8)
    with pytest.raises(ConfigError, match="head_dim=3 must be even"):
        build_attention("switchhead", {"num_heads": 2, "head_dim": 3}, dim=16, num_heads=4, num_layers=2, context=8)


def test_model_hook_builds_switchhead_and_records_statistics(tmp_path):
    from moekit.recipes import load_preset
    from moekit.training import train, with_overrides

    cfg = with_overrides(load_preset("switchhead"), {
        "model.dim": "16", "model.num_heads": "2", "model.context": "8", "model.num_layers": "2",
        "model.dense_hidden_dim": "32", "train.max_steps": "2", "train.batch_size": "2", "train.eval_every": "2",
        "train.eval_batches": "1", "data.max_files": "3", "train.max_seconds": "600"})
    model = LanguageModel(cfg.model)
    assert all(isinstance(b.attn, SwitchHead) for b in model.layers) and not model.supports_kv_cache
    with pytest.raises(ValueError, match="cannot use a KV cache"):
        model(torch.randint(0, 256, (1, 4)), cache=model.new_cache(1))
    result = train(cfg, tmp_path / "run", progress=False)
    row = result.summary["layers"]["layers.1.attn.o"]
    assert row["attention_matrices"] == 2.0 and 0 < row["gate_mean"] < 1


def test_model_config_rejects_unknown_attention_and_dense_options():
    from moekit.models import ModelConfig

    with pytest.raises(ConfigError, match="model.attention='switchead'.*did you mean 'switchhead'"):
        ModelConfig(dim=16, num_layers=1, num_heads=2, context=8, attention="switchead")
    with pytest.raises(ConfigError, match="attention='dense' takes no options"):
        ModelConfig(dim=16, num_layers=1, num_heads=2, context=8, attention_options={"num_experts": 4})


def test_heads_wider_or_narrower_than_the_models_use_its_rotary_tables():
    from moekit.layers.attention.rope import apply_rope_any_width

    x = torch.randn(1, 2, 5, 12)
    cos, sin = rope_tables(5, 8, 10000.0)  # the model's head width is 8: 4 frequencies
    wide = apply_rope_any_width(x, cos, sin)
    assert_close(wide[..., :8], apply_rope(x[..., :8], cos, sin), "partial rotary on the first 8 dims")
    assert torch.equal(wide[..., 8:], x[..., 8:])
    narrow = apply_rope_any_width(x[..., :4], cos, sin)
    assert_close(narrow, apply_rope(x[..., :4], cos[:, :2], sin[:, :2]), "the highest frequencies")
    same = apply_rope_any_width(x[..., :8], cos, sin)
    assert torch.equal(same, apply_rope(x[..., :8], cos, sin))
    # inside a model whose heads differ from SwitchHead's (4 heads of 4 vs 2 heads of 8), relative positions hold
    from moekit.models import ModelConfig

    cfg = ModelConfig(dim=16, num_layers=1, num_heads=4, context=8, attention="switchhead",
                      attention_options={"num_heads": 2})
    model = LanguageModel(cfg)
    assert model(torch.randint(0, 256, (2, 8)))[0].shape == (2, 8, 256)

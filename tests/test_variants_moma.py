"""MoMa (compression-adaptation-serving.md §30): modality groups, expert choice per group, causal auxiliary
routers, the multimodal data and the preset."""

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, RoutingContext
from moekit.configs import ConfigError
from moekit.data import DataConfig, load_data
from moekit.data.multimodal import TEXT_VOCAB, MultimodalTokenizer, multimodal_stream
from moekit.layers import MoE, build_ffn
from moekit.layers.variants import MoMa, MoMaConfig
from moekit.models import LanguageModel, ModelConfig
from moekit.routing import RouterConfig
from moekit.types import MODALITY_KEY


def _moe(num_experts=4, top_k=1, dim=8, hidden=12, **router):
    return MoEConfig(dim=dim, hidden_dim=hidden, num_experts=num_experts, top_k=top_k,
                     router=RouterConfig(aux_loss_coef=0.0, **router))


def _layer(num_experts=4, num_modalities=2, **kw):
    torch.manual_seed(0)
    return MoMa(_moe(num_experts, **kw), MoMaConfig(num_modalities=num_modalities))


def _ctx(mod_BS, stats=False):
    ctx = RoutingContext(collect_stats=stats)
    ctx.state[MODALITY_KEY] = mod_BS
    return ctx


def _ffn(bank, e, x_TD):
    return F.linear(F.silu(F.linear(x_TD, bank.w_gate[e])) * F.linear(x_TD, bank.w_up[e]), bank.w_down[e])


@pytest.mark.parametrize("train", [True, False])
def test_text_tokens_never_reach_image_experts(train):
    layer = _layer(num_experts=6).train(train)
    x = torch.randn(2, 9, 8)
    mod = torch.randint(0, 2, (2, 9))
    mod[0, 0], mod[1, 3] = 0, 1
    y = layer(x, _ctx(mod))
    text = mod.reshape(-1) == 0
    # Text outputs do not move when every image expert and the image router change ...
    with torch.no_grad():
        for p in layer.groups[1].parameters():
            p.add_(torch.randn_like(p))
    y2 = layer(x, _ctx(mod))
    assert torch.equal(y.reshape(-1, 8)[text], y2.reshape(-1, 8)[text])
    assert not torch.equal(y.reshape(-1, 8)[~text], y2.reshape(-1, 8)[~text])
    # ... and a loss on text tokens alone gives the image group no gradient.
    layer.zero_grad()
    layer(x, _ctx(mod)).reshape(-1, 8)[text].square().sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in layer.groups[1].parameters())
    assert layer.groups[0].experts.w_up.grad.abs().sum() > 0


def test_one_expert_per_group_is_a_modality_specific_ffn():
    layer = _layer(num_experts=2).train()  # 1 expert per group, capacity 1.0: it takes all its modality's tokens
    x = torch.randn(3, 5, 8, requires_grad=True)
    mod = torch.randint(0, 2, (3, 5))
    y_TD = layer(x, _ctx(mod)).reshape(-1, 8)
    x_TD, mod_T = x.reshape(-1, 8), mod.reshape(-1)
    ref_TD = torch.where((mod_T == 0)[:, None], _ffn(layer.groups[0].experts, 0, x_TD),
                         _ffn(layer.groups[1].experts, 0, x_TD))
    torch.testing.assert_close(y_TD, ref_TD, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_TD)
    gx_layer, = torch.autograd.grad(y_TD, x, g, retain_graph=True)
    gx_ref, = torch.autograd.grad(ref_TD, x, g)
    torch.testing.assert_close(gx_layer, gx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cf,top_k", [(1.0, 1), (0.5, 2), (2.0, 1)])
def test_expert_choice_capacity_holds_per_group(cf, top_k):
    layer = _layer(num_experts=6, top_k=top_k, capacity_factor=cf).train()
    mod = torch.zeros(1, 23, dtype=torch.long)
    mod[0, :7] = 1  # 16 text tokens, 7 image tokens
    ctx = _ctx(mod, stats=True)
    layer(torch.randn(1, 23, 8), ctx)
    for m, n in ((0, 16), (1, 7)):
        counts = ctx.stats[f"moma.m{m}"].counts_E
        expected = min(math.ceil(cf * top_k * n / 3), n)
        assert counts.tolist() == [expected] * 3, (m, counts)
    assert ctx.stats_summary()["moma.m1"]["modality_share"] == pytest.approx(7 / 23)
    assert "moma" not in ctx.stats, "no empty layer-level entry (it would dilute the run's mean load CV)"


def test_one_modality_is_a_plain_expert_choice_moe():
    cfg = _moe(num_experts=4, top_k=2, selector="expert_choice", capacity_factor=1.0)
    torch.manual_seed(1)
    plain = MoE(cfg).train()
    layer = MoMa(cfg, MoMaConfig(num_modalities=1)).train()
    layer.groups[0].load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 8, requires_grad=True)
    y_ref = plain(x)
    y = layer(x, RoutingContext())  # no modality ids: every token is modality 0
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


def test_aux_router_loss_coefficient_and_gradient():
    x = torch.randn(2, 11, 8, requires_grad=True)
    mod = torch.randint(0, 2, (2, 11))
    losses = {}
    for coef in (0.01, 0.03):
        torch.manual_seed(0)
        layer = MoMa(_moe(4), MoMaConfig(aux_router_coef=coef)).train()
        ctx = _ctx(mod)
        layer(x, ctx)
        losses[coef] = ctx.losses["moma_aux_router"]
    assert losses[0.03].item() == pytest.approx(3 * losses[0.01].item(), rel=1e-5)
    gx, gr, gaux = torch.autograd.grad(losses[0.03], [x, layer.groups[0].router.weight, layer.aux_routers[0].weight],
                                       allow_unused=True)
    assert gx is None and gr is None, "the auxiliary routers read the detached input and never train the model"
    assert gaux is not None and gaux.abs().sum() > 0


def test_aux_routers_learn_expert_choice_and_evaluation_is_causal():
    layer = _layer(num_experts=4).train()
    for p in layer.groups.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(layer.aux_routers.parameters(), lr=0.05)
    x = torch.randn(4, 32, 8)
    mod = torch.randint(0, 2, (4, 32))
    for _ in range(150):
        ctx = _ctx(mod, stats=True)
        layer(x, ctx)
        opt.zero_grad()
        ctx.losses["moma_aux_router"].backward()
        opt.step()
    summary = ctx.stats_summary()
    assert min(summary[f"moma.m{m}"]["aux_router_agreement"] for m in (0, 1)) > 0.9
    layer.eval()
    y = layer(x, _ctx(mod))
    x_late = x.clone()
    x_late[:, 20:] = torch.randn(4, 12, 8)  # later tokens change: earlier outputs must not (causal)
    torch.testing.assert_close(layer(x_late, _ctx(mod))[:, :20], y[:, :20], rtol=0, atol=0)
    layer.config = MoMaConfig(eval_routing="expert_choice")  # expert choice looks at every token: not causal
    assert not torch.equal(layer(x_late, _ctx(mod))[:, :20], layer(x, _ctx(mod))[:, :20])


def test_bad_options_and_modality_ids():
    with pytest.raises(ConfigError, match="num_experts=6 is not divisible by variant.num_modalities=4"):
        MoMa(_moe(6), MoMaConfig(num_modalities=4))
    with pytest.raises(ConfigError, match="top_k=3 exceeds the 2 experts"):
        MoMa(_moe(4, top_k=3), MoMaConfig())
    with pytest.raises(ConfigError, match="variant.routing"):
        build_ffn("moma", _moe(4), {"routing": "token_choice"})
    with pytest.raises(ConfigError, match="variant.num_modalitie"):
        build_ffn("moma", _moe(4), {"num_modalitie": 2})
    layer = _layer(4)
    with pytest.raises(ValueError, match="modality id 2 is outside 0..1"):
        layer(torch.randn(1, 3, 8), _ctx(torch.tensor([[0, 2, 1]])))
    with pytest.raises(ValueError, match="2 entries for 3 tokens"):
        layer(torch.randn(1, 3, 8), _ctx(torch.tensor([[0, 1]])))
    with pytest.raises(ConfigError, match="model.modality_starts"):
        ModelConfig(vocab_size=300, dim=16, num_layers=1, num_heads=2, context=8, modality_starts=(256, 256))


def test_multimodal_stream_and_model_modality_ids():
    text = b"def f(x):\n    return x\n" * 20
    a = multimodal_stream(3, 4000, text, codes=16)
    assert torch.equal(a, multimodal_stream(3, 4000, text, codes=16))
    assert not torch.equal(a[:4000], multimodal_stream(4, 4000, text, codes=16)[:4000])
    assert 0 <= int(a.min()) and int(a.max()) < TEXT_VOCAB + 16 and 0.15 < (a >= TEXT_VOCAB).float().mean() < 0.5
    assert MultimodalTokenizer(16).decode([104, 105, 257, 33]) == "hi<i1>!"
    model = LanguageModel(ModelConfig(vocab_size=272, dim=16, num_layers=1, num_heads=2, context=8,
                                      modality_starts=(256,)))
    tokens = torch.tensor([[10, 255, 256, 271, 3]])
    _, ctx = model(tokens)
    assert ctx.state[MODALITY_KEY].tolist() == [[0, 0, 1, 1, 0]]
    data = load_data(DataConfig(source="multimodal", max_files=4, synthetic_bytes=5000, image_codes=16))
    assert data.tokenizer.vocab_size == 272 and int(data.train.max()) >= TEXT_VOCAB and data.bytes_per_token == 1.0


def test_moma_preset_trains_and_reports_each_group(tmp_path, capsys):
    from moekit.cli.main import main
    from moekit.recipes import load_preset
    from moekit.training import train, with_overrides

    cfg = with_overrides(load_preset("moma"), {
        "model.dim": "16", "model.num_heads": "2", "model.context": "32", "model.num_layers": "2",
        "model.moe.hidden_dim": "16", "train.max_steps": "3", "train.batch_size": "4", "train.eval_every": "3",
        "train.eval_batches": "1", "data.max_files": "4", "data.synthetic_bytes": "20000"})
    layers = train(cfg, tmp_path / "run", progress=False).summary["layers"]
    share = layers["layers.0.ffn.m1"]["modality_share"]
    assert 0.2 < share < 0.6, "the data interleaves image tokens, and the model carries their modality to the layer"
    assert layers["layers.0.ffn.m0"]["tokens"] > 0 and layers["layers.0.ffn.m1"]["tokens"] > 0
    # sampling decodes image codes (ids >= 256) as <iN>; evaluation routing is causal, so the KV cache works
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run"), "--prompt", "<img 1>", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("<img 1>")

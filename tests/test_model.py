"""The language model: layer layout, routing context, causality, KV cache, counts against hand arithmetic."""

import pytest
import torch
from torch import nn

from moekit import MoEConfig, RoutingContext
from moekit.layers import FFN_BUILDERS, register_ffn
from moekit.models import LanguageModel, ModelConfig, count
from moekit.configs import ConfigError


def tiny_config(**changes) -> ModelConfig:
    base = dict(vocab_size=256, dim=16, num_layers=3, num_heads=2, context=12,
                moe=MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2), dense_hidden_dim=24)
    return ModelConfig(**{**base, **changes})


def test_count_matches_hand_computation_tied():
    cfg = tiny_config(first_dense_layers=1, moe_every=1)  # layers: dense, MoE, MoE
    embed = 256 * 16
    per_layer_common = 2 * 16 + 4 * 16 * 16             # two RMSNorm gains + qkv (3 D^2) + out (D^2)
    dense_ffn = 3 * 16 * 24                              # SwiGLU gate, up, down
    router, bank = 4 * 16, 3 * 4 * 8 * 16                # E x D; E experts x (gate, up, down) x F x D
    total = embed + 3 * per_layer_common + dense_ffn + 2 * (router + bank) + 16   # + final norm
    active = total - 2 * (bank // 2)                     # top-2 of 4 experts: half of each bank idle
    c = count(LanguageModel(cfg))
    assert (c.total_params, c.active_params, c.embedding_params) == (total, active, embed)
    assert c.matmul_params == active                     # tied: the table is also the output matmul
    assert c.flops_per_token == 6 * active + 12 * 3 * 16 * 12
    assert count(cfg) == c                               # counting a config (meta device) agrees


def test_count_untied_and_every_other_layer():
    cfg = tiny_config(tie_embeddings=False, moe_every=2)  # layers: MoE, dense, MoE
    assert [cfg.is_sparse(i) for i in range(3)] == [True, False, True]
    c = count(cfg)
    embed = 256 * 16
    total = 2 * embed + 3 * (2 * 16 + 4 * 256) + 3 * 16 * 24 + 2 * (64 + 1536) + 16
    assert c.total_params == total
    assert c.active_params == total - 1536
    assert c.matmul_params == c.active_params - embed    # the input lookup is no matmul


def test_moe_losses_and_stats_land_in_ctx_under_layer_names():
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(first_dense_layers=1))
    tokens = torch.randint(0, 256, (2, 12))
    logits, ctx = model(tokens, RoutingContext(collect_stats=True))
    assert set(ctx.stats) == {"layers.1.ffn", "layers.2.ffn"}
    assert set(ctx.layer_losses) == {"layers.1.ffn", "layers.2.ffn"}
    assert ctx.total_loss().item() > 0
    for stats in ctx.stats.values():  # every token made top_k = 2 assignments
        assert stats.counts_E.sum().item() == 2 * 2 * 12


def test_dense_model_has_no_routing():
    model = LanguageModel(tiny_config(moe=None))
    _, ctx = model(torch.randint(0, 256, (1, 5)), RoutingContext(collect_stats=True))
    assert ctx.losses == {} and ctx.stats == {}
    assert model.sparse_layers() == []


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = LanguageModel(tiny_config())
    a = torch.randint(0, 256, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 256
    la, _ = model(a)
    lb, _ = model(b)
    torch.testing.assert_close(la[:, :8], lb[:, :8])
    assert not torch.allclose(la[:, 8:], lb[:, 8:])


def test_kv_cache_prefill_and_decode_equal_full_forward():
    torch.manual_seed(0)
    model = LanguageModel(tiny_config()).eval()
    tokens = torch.randint(0, 256, (2, 12))
    full, _ = model(tokens)
    cache = model.new_cache(2)
    parts = [model(tokens[:, :5], cache=cache)[0]] + [model(tokens[:, i:i + 1], cache=cache)[0]
                                                        for i in range(5, 9)]
    parts.append(model(tokens[:, 9:], cache=cache)[0])  # a multi-token chunk after a non-empty cache
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed model.context"):
        model(tokens[:, :1], cache=cache)


def test_model_builds_ffns_through_registry_and_passes_ctx():
    seen = []

    class PlainFFN(nn.Module):  # a variant that returns plain tensors and uses ctx.state across layers
        def __init__(self, name):
            super().__init__()
            self.name, self.proj = name, nn.Linear(16, 16)

        def forward(self, x, ctx=None):
            seen.append((self.name, ctx.state.get("previous")))
            ctx.state["previous"] = self.name
            return self.proj(x)

    @register_ffn("test_plain")
    def build(moe, options, *, layer_index, num_layers, name):
        assert options == {"alpha": 1} and num_layers == 3
        return PlainFFN(name)

    try:
        model = LanguageModel(tiny_config(ffn="test_plain", variant={"alpha": 1}, first_dense_layers=1))
        model(torch.randint(0, 256, (1, 4)))
    finally:
        del FFN_BUILDERS["test_plain"]
    assert seen == [("layers.1.ffn", None), ("layers.2.ffn", "layers.1.ffn")]


def test_config_errors_explain_the_fix():
    with pytest.raises(ConfigError, match="not divisible by model.num_heads"):
        tiny_config(num_heads=3)
    with pytest.raises(ConfigError, match="differs from model.dim"):
        tiny_config(dim=32, num_heads=2)

"""Routing Transformer attention (architectures.md §20): a per-cluster reference, the spec's minimal faithful
tests, the EMA centroid update through the step hook, the commitment loss and bad input."""

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
from moekit.layers.attention.routing_attention import (
    RoutingAttention,
    RoutingAttentionConfig,
)
from moekit.models import Attention

from .reference import assert_close


def reference_routing(layer: RoutingAttention, x_BSD, cos, sin):
    """Loop over sequences, heads and clusters; each query averages the outputs of the clusters holding it."""
    B, S, D = x_BSD.shape
    H, Dh, C = layer.num_heads, layer.head_dim, layer.num_clusters
    q, k, v = layer.w_qkv(x_BSD).view(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    W = min(S, math.ceil(S / C))
    out = torch.zeros(B, H, S, Dh)
    for b in range(B):
        for h in range(H):
            mu = layer.centroids_HCd[h]
            nq, nk = F.layer_norm(q[b, h], (Dh,)), F.layer_norm(k[b, h], (Dh,))
            acc, hits = [torch.zeros(Dh) for _ in range(S)], [0] * S
            for c in range(C):
                members_q = (nq @ mu[c]).topk(W).indices.tolist()
                members_k = (nk @ mu[c]).topk(W).indices.tolist()
                for i in members_q:
                    keys = [j for j in members_k if j <= i]
                    hits[i] += 1
                    if keys:
                        s = torch.stack([rq[b, h, i] @ rk[b, h, j] for j in keys]) / math.sqrt(Dh)
                        acc[i] = acc[i] + s.softmax(0) @ v[b, h, keys]
            for i in range(S):
                out[b, h, i] = acc[i] / max(hits[i], 1)
    return layer.w_out(out.transpose(1, 2).reshape(B, S, D))


def test_matches_the_per_cluster_reference_on_outputs_and_gradients():
    torch.manual_seed(0)
    layer = RoutingAttention(12, 3, 2, 7, RoutingAttentionConfig(num_clusters=3))
    x = torch.randn(2, 7, 12, requires_grad=True)
    cos, sin = rope_tables(7, 4, 10000.0)
    y, ref = layer(x, cos, sin), reference_routing(layer, x, cos, sin)
    assert_close(y, ref, "outputs")
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, layer.w_qkv.weight, layer.w_out.weight])
    refs = torch.autograd.grad((ref * g).sum(), [x, layer.w_qkv.weight, layer.w_out.weight])
    for name, a, b in zip(("x", "w_qkv", "w_out"), grads, refs):
        assert_close(a, b, name)


def _copy_dense(layer, dense):
    with torch.no_grad():
        layer.w_qkv.weight.copy_(dense.w_qkv.weight), layer.w_out.weight.copy_(dense.w_out.weight)


def test_one_cluster_of_every_token_is_full_causal_attention():
    torch.manual_seed(1)
    dense = Attention(16, 2, 2)
    layer = RoutingAttention(16, 2, 2, 9, RoutingAttentionConfig(num_clusters=1))
    _copy_dense(layer, dense)
    x = torch.randn(2, 9, 16)
    cos, sin = rope_tables(9, 8, 10000.0)
    assert_close(layer(x, cos, sin), dense(x, cos, sin), "C = 1, W = n")


def test_local_heads_are_sliding_window_attention():
    torch.manual_seed(2)
    dense = Attention(16, 2, 2)
    cos, sin = rope_tables(9, 8, 10000.0)
    x = torch.randn(1, 9, 16)
    wide = RoutingAttention(16, 2, 2, 9, RoutingAttentionConfig(local_heads=2, local_window=9))
    _copy_dense(wide, dense)
    assert_close(wide(x, cos, sin), dense(x, cos, sin), "a window over the whole context is full attention")
    narrow = RoutingAttention(16, 2, 2, 9, RoutingAttentionConfig(local_heads=2, local_window=3))
    _copy_dense(narrow, dense)
    y = narrow(x, cos, sin)
    x2 = x.clone()
    x2[0, 2] += 5.0
    y2 = narrow(x2, cos, sin)
    assert torch.equal(y[0, 5:], y2[0, 5:]), "position 5 and later do not see position 2 (window 3)"
    assert not torch.allclose(y[0, 4], y2[0, 4])


def test_centroids_change_only_by_the_ema_rule_applied_after_the_step():
    torch.manual_seed(3)
    layer = RoutingAttention(8, 1, 1, 8, RoutingAttentionConfig(num_clusters=2, ema_decay=0.9))
    assert "centroids_HCd" not in dict(layer.named_parameters()), "no gradient reaches the centroids"
    x = torch.randn(2, 8, 8)
    cos, sin = rope_tables(8, 8, 10000.0)
    before = layer.centroids_HCd.clone()
    layer.eval()(x, cos, sin)
    layer.on_step(1)
    assert torch.equal(layer.centroids_HCd, before), "evaluation accumulates nothing"
    layer.train()(x, cos, sin).sum().backward()
    assert torch.equal(layer.centroids_HCd, before), "forward and backward never move the centroids"
    q, k, _ = layer.w_qkv(x).view(2, 8, 3, 1, 8).permute(2, 0, 3, 1, 4)
    nq, nk = F.layer_norm(q, (8,)), F.layer_norm(k, (8,))
    expected = []
    for c in range(2):
        means = []
        for n in (nq, nk):
            near = (n @ before[0].T).argmax(-1) == c
            means.append(n[near].mean(0) if near.any() else before[0, c])
        expected.append(0.9 * before[0, c] + 0.05 * means[0] + 0.05 * means[1])
    expected = F.normalize(torch.stack(expected), dim=-1) * math.sqrt(8)
    layer.on_step(1)
    assert_close(layer.centroids_HCd[0], expected.detach(), "EMA of the members' means")


def test_commitment_loss_coefficient_gradient_and_statistics():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 16)
    cos, sin = rope_tables(8, 8, 10000.0)
    values = {}
    for coef in (1e-4, 3e-4):
        torch.manual_seed(5)
        cfg = RoutingAttentionConfig(num_clusters=2, local_heads=1, commitment_coef=coef)
        layer = RoutingAttention(16, 2, 2, 8, cfg,
                                 name="a")
        ctx = RoutingContext(collect_stats=True)
        layer(x, cos, sin, ctx=ctx)
        values[coef] = ctx.losses["routing_commitment_loss"]
    assert_close(values[3e-4], 3 * values[1e-4], "coefficient applied")
    layer.zero_grad()
    values[3e-4].backward()
    assert layer.w_qkv.weight.grad.abs().sum() > 0
    stats = ctx.stats["a"]
    assert stats.counts_E.numel() == 2 and int(stats.counts_E.sum()) == 2 * 8, "one routing head, 2 clusters"


def test_bad_options_name_the_field_and_fix():
    with pytest.raises(ConfigError, match="local_heads=5 exceeds model.num_heads=4"):
        build_attention("routing", {"local_heads": 5}, dim=16, num_heads=4, num_layers=2, context=8)
    with pytest.raises(ConfigError, match="attention_options.ema_decay=1.0"):
        RoutingAttentionConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match="unknown config key 'attention_options.top_k'"):
        build_attention("routing", {"top_k": 2}, dim=16, num_heads=4, num_layers=2, context=8)


def test_preset_trains_and_the_trainer_moves_the_centroids(tmp_path):
    from moekit.models import LanguageModel
    from moekit.recipes import load_preset
    from moekit.training import train, with_overrides
    from moekit.training.runs import load_run

    cfg = with_overrides(load_preset("routing-transformer"), {
        "model.dim": "16", "model.num_heads": "2", "model.context": "8", "model.num_layers": "2",
        "model.dense_hidden_dim": "32", "model.attention_options.local_heads": "1",
        "model.attention_options.num_clusters": "2", "model.attention_options.ema_decay": "0.5",
        "train.max_steps": "2", "train.batch_size": "2", "train.eval_every": "2", "train.eval_batches": "1",
        "data.max_files": "3", "train.max_seconds": "600"})
    torch.manual_seed(cfg.train.seed)
    start = LanguageModel(cfg.model).layers[0].attn.centroids_HCd.clone()
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.summary["layers"]["layers.0.attn"]["clusters"] == 2.0
    _, trained, _ = load_run(tmp_path / "run", device="cpu")
    moved = trained.layers[0].attn.centroids_HCd
    assert moved.shape == start.shape and not torch.allclose(moved, start), "centroids saved after EMA updates"
    assert_close(moved.norm(dim=-1), torch.full(moved.shape[:2], 8**0.5), "renormalised centroids")

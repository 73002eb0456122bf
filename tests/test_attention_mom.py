"""MoM (architectures.md §10): a per-token reference, the spec's minimal faithful tests, the balance loss,
statistics, bad input and the model hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.layers import build_attention
from moekit.layers.attention.mom import MixtureOfMemories, MoMConfig

from .reference import assert_close


def reference_mom(layer: MixtureOfMemories, x_BSD):
    """Token by token: route, update only the routed (and shared) memories, read, combine, gated norm, project."""
    B, S, D = x_BSD.shape
    H, Dh, N, c = layer.num_heads, layer.head_dim, layer.num_states, layer.config
    out = []
    for b in range(B):
        states = [torch.zeros(H, Dh, Dh) for _ in range(N)]
        for t in range(S):
            x = x_BSD[b, t]
            p = (layer.w_router.weight @ x).softmax(-1)
            top = p.topk(c.top_k)
            weights = {int(i): w / top.values.sum() for i, w in zip(top.indices, top.values)}
            if c.shared_memory:
                weights[c.num_memories] = torch.tensor(1.0)
            q = F.normalize(F.silu(layer.w_q.weight @ x).view(H, Dh), dim=-1)
            o = torch.zeros(H, Dh)
            for n, w in weights.items():
                k = F.normalize(F.silu(x @ layer.w_k_NDD[n]).view(H, Dh), dim=-1)
                v = (x @ layer.w_v_NDD[n]).view(H, Dh)
                beta = torch.sigmoid(x @ layer.w_beta_NDH[n])
                g = torch.exp(-F.softplus(x @ layer.w_decay_NDH[n] + layer.decay_bias_NH[n]))
                new = []
                for h in range(H):
                    decayed = g[h] * states[n][h]
                    new.append(decayed + beta[h] * torch.outer(k[h], v[h] - decayed.T @ k[h]))
                states[n] = torch.stack(new)
                o = o + w * torch.stack([states[n][h].T @ q[h] for h in range(H)])
            z = F.silu(layer.w_z.weight @ x)
            out.append(layer.w_out.weight @ (layer.norm(o).reshape(D) * z))
    return torch.stack(out).view(B, S, D)


@pytest.mark.parametrize("config", [MoMConfig(num_memories=3, top_k=2, shared_memory=True),
                                    MoMConfig(num_memories=1, top_k=1, shared_memory=False),
                                    MoMConfig(num_memories=4, top_k=1, shared_memory=False, num_heads=3)])
def test_matches_the_per_token_reference_on_outputs_and_gradients(config):
    torch.manual_seed(0)
    layer = MixtureOfMemories(12, 2, 2, config)
    x = torch.randn(2, 5, 12, requires_grad=True)
    y, ref = layer(x), reference_mom(layer, x)
    assert_close(y, ref, "outputs")
    g = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((y * g).sum(), [x, *params], allow_unused=True)
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, *params], allow_unused=True)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, name)


def test_one_memory_without_shared_is_the_base_linear_attention():
    """M = 1, k = 1, no shared memory: every token updates the single memory (gate weight 1) at every step."""
    torch.manual_seed(1)
    layer = MixtureOfMemories(8, 2, 2, MoMConfig(num_memories=1, top_k=1, shared_memory=False))
    _, combine = layer.route(torch.randn(2, 6, 8))
    assert torch.equal(combine, torch.ones(2, 6, 1))
    x = torch.randn(1, 6, 8)
    out, _ = layer.memories(x, torch.ones(1, 6, 1, dtype=torch.bool))
    o = out[:, :, 0]
    y = layer.w_out(layer.norm(o).reshape(1, 6, 8) * F.silu(layer.w_z(x)))
    assert_close(layer(x), y, "MoM with one memory = gated delta rule linear attention")


def test_a_memory_only_sees_the_tokens_routed_to_it():
    torch.manual_seed(2)
    layer = MixtureOfMemories(8, 2, 2, MoMConfig(num_memories=3, top_k=1, shared_memory=False))
    x = torch.randn(1, 9, 8)
    _, combine = layer.route(x)
    active = combine > 0
    _, states = layer.memories(x, active)
    for n in range(3):
        mine = active[0, :, n]
        if not mine.any():
            assert states[0, n].abs().sum() == 0, "an unused memory stays empty"
            continue
        single = MixtureOfMemories(8, 2, 2, MoMConfig(num_memories=1, top_k=1, shared_memory=False))
        with torch.no_grad():
            for name in ("w_k_NDD", "w_v_NDD", "w_beta_NDH", "w_decay_NDH", "decay_bias_NH"):
                getattr(single, name).copy_(getattr(layer, name)[n:n + 1])
            single.w_q.weight.copy_(layer.w_q.weight)
        sub = x[:, mine]
        _, sub_states = single.memories(sub, torch.ones(1, sub.shape[1], 1, dtype=torch.bool))
        assert_close(states[0, n], sub_states[0, 0], f"memory {n} = the scan over its own subsequence")
    x2 = x.clone()
    t = int(torch.nonzero(~active[0, :, 0])[0])  # a token not routed to memory 0
    changed = active.clone()
    x2[0, t] += 3.0
    _, states2 = layer.memories(x2, changed)
    assert torch.equal(states2[0, 0], states[0, 0]), "tokens not routed to a memory never change it"


def test_causality_changing_a_token_never_changes_earlier_outputs():
    torch.manual_seed(3)
    layer = MixtureOfMemories(8, 2, 2, MoMConfig(num_memories=4, top_k=2))
    x = torch.randn(2, 7, 8)
    x2 = x.clone()
    x2[:, 4] = torch.randn(2, 8) * 4  # its routing changes too
    y, y2 = layer(x), layer(x2)
    assert torch.equal(y[:, :4], y2[:, :4]) and not torch.allclose(y[:, 4], y2[:, 4])


def test_balance_loss_coefficient_gradient_and_statistics():
    torch.manual_seed(4)
    x = torch.randn(2, 6, 8)
    values = {}
    for coef in (0.01, 0.05):
        torch.manual_seed(5)
        layer = MixtureOfMemories(8, 2, 2, MoMConfig(aux_loss_coef=coef), name="layers.0.attn")
        ctx = RoutingContext(collect_stats=True)
        layer(x, ctx=ctx)
        values[coef] = ctx.losses["mom_aux_loss"]
    assert_close(values[0.05], 5 * values[0.01], "coefficient applied")
    layer.zero_grad()
    values[0.05].backward()
    assert layer.w_router.weight.grad.abs().sum() > 0 and layer.w_v_NDD.grad is None
    stats = ctx.stats["layers.0.attn"]
    assert stats.counts_E.numel() == 4 and int(stats.counts_E.sum()) == 2 * 6 * 2
    one = RoutingContext()
    MixtureOfMemories(8, 2, 2, MoMConfig(num_memories=1, top_k=1))(x, ctx=one)
    assert "mom_aux_loss" not in one.losses, "no balance loss over a single memory"


def test_bad_options_name_the_field_and_fix():
    with pytest.raises(ConfigError, match="attention_options.top_k=3 must be in 1..num_memories=2"):
        MoMConfig(num_memories=2, top_k=3)
    with pytest.raises(ConfigError, match="num_heads=5 does not divide model.dim=16"):
        build_attention("mom", {"num_heads": 5}, dim=16, num_heads=4, num_layers=2, context=8)
    with pytest.raises(ConfigError, match="unknown config key 'attention_options.num_experts'"):
        build_attention("mom", {"num_experts": 4}, dim=16, num_heads=4, num_layers=2, context=8)


def test_mom_preset_trains_and_reports_memory_load(tmp_path):
    from moekit.recipes import load_preset
    from moekit.training import train, with_overrides

    cfg = with_overrides(load_preset("mom"), {
        "model.dim": "16", "model.num_heads": "2", "model.context": "8", "model.num_layers": "2",
        "model.dense_hidden_dim": "32", "train.max_steps": "2", "train.batch_size": "2", "train.eval_every": "2",
        "train.eval_batches": "1", "data.max_files": "3", "train.max_seconds": "600"})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.summary["layers"]["layers.0.attn"]["tokens"] == 2 * 8 * 2  # batch x context x top_k
    assert result.records[0]["aux"] > 0, "the memories' balance loss is trained"

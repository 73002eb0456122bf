"""RMoE: the spec's minimal faithful tests (architectures.md §3) plus the concatenated aux loss."""

import torch
from torch import nn

from moekit import RoutingContext
from moekit.layers import build_ffn
from moekit.layers.variants.rmoe import STATE_KEY, RecurrentRouterMoE, RMoEConfig, tie_recurrent_routers
from moekit.routing.losses import load_balancing_loss

from .variants_util import params_with_grad, tiny_moe

OPTS = {"rnn_dim": 6}


def _stack(n=3, **router):
    torch.manual_seed(0)
    cfg = tiny_moe(router=router)
    return nn.ModuleList(build_ffn("rmoe", cfg, OPTS, layer_index=i, num_layers=n, name=f"layers.{i}.ffn")
                         for i in range(n))


def test_one_cell_shared_by_all_layers_and_param_count():
    stack = _stack(3)
    assert stack[0].cell is stack[1].cell is stack[2].cell
    other = _stack(3)
    assert other[0].cell is not stack[0].cell  # a new model gets its own cell
    counts = [sum(p.numel() for p in _stack(n).parameters()) for n in (1, 2, 3)]
    per_layer = counts[1] - counts[0]
    assert counts[2] - counts[1] == per_layer
    cell = sum(p.numel() for p in stack[0].cell.parameters())
    assert counts[0] - per_layer == cell  # the cell is counted once whatever the depth
    loose = nn.ModuleList(RecurrentRouterMoE(tiny_moe(), RMoEConfig(rnn_dim=6)) for _ in range(2))
    assert tie_recurrent_routers(loose) == 2 and loose[0].cell is loose[1].cell


def _logits(stack, xs):
    ctx = RoutingContext()
    out = []
    for layer, x in zip(stack, xs):
        out.append(layer.route(x, ctx).logits_TE)
    return out


def test_no_mixing_across_tokens():
    stack = _stack(3)
    xs = [torch.randn(5, 8) for _ in range(3)]
    base = _logits(stack, xs)
    xs2 = [x.clone() for x in xs]
    xs2[0][2] += 1.0
    xs2[2][2] -= 1.0
    pert = _logits(stack, xs2)
    keep = [0, 1, 3, 4]
    for a, b in zip(base, pert):
        torch.testing.assert_close(a[keep], b[keep])
        assert not torch.allclose(a[2], b[2])


def test_recurrence_reaches_later_layers():
    stack = _stack(3)
    xs = [torch.randn(4, 8) for _ in range(3)]
    base = _logits(stack, xs)[2]
    pert = _logits(stack, [xs[0] + 0.5, xs[1], xs[2]])[2]
    assert not torch.allclose(base, pert)
    # and the gradient flows back through the state
    xs0 = xs[0].clone().requires_grad_(True)
    _logits(stack, [xs0, xs[1], xs[2]])[2].sum().backward()
    assert xs0.grad.abs().sum() > 0


def test_stats_per_layer_and_state_carried():
    stack = _stack(3)
    ctx = RoutingContext(collect_stats=True)
    h = torch.randn(2, 3, 8)
    for layer in stack:
        h = h + layer(h, ctx)
    assert set(ctx.stats) == {"layers.0.ffn", "layers.1.ffn", "layers.2.ffn"}
    assert ctx.state[STATE_KEY].shape == (6, 6)


def test_concat_aux_loss_value():
    stack = _stack(2, aux_loss_coef=0.25)
    xs = [torch.randn(6, 8), torch.randn(6, 8)]
    ctx = RoutingContext()
    rs = [layer.route(x, ctx) for layer, x in zip(stack, xs)]
    P = torch.cat([r.scores_TE for r in rs])
    ids = torch.cat([r.expert_ids_TK for r in rs])
    # Mixtral: E * sum_i mean_rows(k-hot)_i * mean_rows(p)_i
    khot = torch.zeros(12, 4).scatter_(1, ids, 1.0)
    expected = 0.25 * 4 * (khot.mean(0) * P.mean(0)).sum()
    torch.testing.assert_close(ctx.losses["aux_loss"], expected)
    torch.testing.assert_close(ctx.losses["aux_loss"], 0.25 * 2 * load_balancing_loss(P, ids))
    names = params_with_grad(stack, ctx.losses["aux_loss"])
    assert names == {"0.proj_in.weight", "0.proj_out.weight", "1.proj_in.weight", "1.proj_out.weight",
                     "0.cell.weight_ih", "0.cell.weight_hh", "0.cell.bias_ih", "0.cell.bias_hh"}
    assert not any("experts" in n for n in names)

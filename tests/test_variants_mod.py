"""Mixture-of-Depths wrapper (architectures.md §0.3)."""

import torch

from moekit import FeedForward, RoutingContext
from moekit.layers.variants.mod import POSITIONS_KEY, MixtureOfDepths, MoDConfig

from .variants_util import params_with_grad


def _block():
    torch.manual_seed(0)
    ffn = FeedForward(8, 16)
    return ffn, (lambda h, ctx=None: ffn(h))


def test_full_capacity_with_unit_router_is_the_vanilla_block():
    ffn, block = _block()
    mod = MixtureOfDepths(8, MoDConfig(capacity=1.0))
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        mod.router.weight.zero_()
    # r == 0 would zero the update; emulate r == 1 by a router whose output is one on every token
    x1 = torch.cat([x, torch.ones(2, 6, 1)], -1)
    mod1 = MixtureOfDepths(9, MoDConfig(capacity=1.0))
    with torch.no_grad():
        mod1.router.weight.zero_()
        mod1.router.weight[0, -1] = 1.0
    out = mod1(x1, lambda h, ctx=None: torch.cat([ffn(h[..., :8]), torch.zeros_like(h[..., 8:])], -1))
    torch.testing.assert_close(out[..., :8], x + ffn(x))


def test_unselected_tokens_unchanged_and_block_sees_only_selected():
    ffn, _ = _block()
    mod = MixtureOfDepths(8, MoDConfig(capacity=0.25), name="l0")
    x = torch.randn(2, 8, 8)
    seen = []

    def block(h, ctx):
        seen.append(h.shape)
        return ffn(h)

    ctx = RoutingContext(collect_stats=True)
    out = mod(x, block, ctx)
    pos = ctx.state[POSITIONS_KEY]
    assert seen == [(2, 2, 8)] and torch.all(pos[:, 1:] > pos[:, :1])  # causal order
    r = mod.router(x)[..., 0]
    for b in range(2):
        sel = set(pos[b].tolist())
        assert sel == set(r[b].topk(2).indices.tolist())
        for t in range(8):
            if t not in sel:
                assert torch.equal(out[b, t], x[b, t])
        xs = x[b, sorted(sel)]
        torch.testing.assert_close(out[b, sorted(sel)], xs + r[b, sorted(sel), None] * ffn(xs[None])[0])
    assert ctx.stats_summary()["l0"]["fraction_processed"] == 0.25


def test_router_loss_coefficient_and_gradients():
    ffn, block = _block()
    mod = MixtureOfDepths(8, MoDConfig(capacity=0.5, aux_coef=0.3))
    x = torch.randn(2, 4, 8)
    ctx = RoutingContext()
    mod(x, block, ctx)
    r = mod.router(x)[..., 0]
    target = torch.zeros(2, 4).scatter_(1, ctx.state[POSITIONS_KEY], 1.0)
    expected = 0.3 * torch.nn.functional.binary_cross_entropy_with_logits(r, target)
    torch.testing.assert_close(ctx.losses["mod_router_loss"], expected)
    both = torch.nn.ModuleDict({"mod": mod, "ffn": ffn})
    assert params_with_grad(both, ctx.losses["mod_router_loss"]) == {"mod.router.weight"}
    assert "mod.router.weight" in params_with_grad(both, mod(x, block).sum())  # the gate r_t trains the router


def test_threshold_eval_is_causal_per_token():
    ffn, block = _block()
    mod = MixtureOfDepths(8, MoDConfig(eval_mode="threshold")).eval()
    x = torch.randn(1, 6, 8)
    out = mod(x, block)
    x2 = x.clone()
    x2[0, 4:] += 1.0
    out2 = mod(x2, block)
    torch.testing.assert_close(out[0, :4], out2[0, :4])

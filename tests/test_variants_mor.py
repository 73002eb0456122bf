"""Mixture-of-Recursions wrapper: the spec's minimal faithful tests (architectures.md §9)."""

import torch

from moekit import FeedForward, RoutingContext
from moekit.layers.variants.mor import POSITIONS_KEY, MixtureOfRecursions, MoRConfig

from .variants_util import params_with_grad


def _block():
    torch.manual_seed(0)
    ffn = FeedForward(8, 16)
    return ffn, (lambda h, ctx=None: h + ffn(h))  # a block returns its full output hidden state


def test_full_capacity_step_is_h_plus_g_block_h():
    ffn, block = _block()
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=1, capacities=(1.0,)))
    x = torch.randn(2, 5, 8)
    g = 0.1 * mor.routers[0](x).sigmoid()
    torch.testing.assert_close(mor(x, block), x + g * block(x))


def test_hierarchical_filtering_and_unselected_unchanged():
    ffn, block = _block()
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3), name="l0")
    x = torch.randn(2, 6, 8)
    sets = []
    seen = []

    def spy(h, ctx):
        sets.append(ctx.state[POSITIONS_KEY].clone())
        seen.append(h.shape[1])
        return block(h)

    ctx = RoutingContext(collect_stats=True)
    mor(x, spy, ctx)
    assert seen == [6, 4, 2]  # capacities 1, 2/3, 1/3 of the full length
    for b in range(2):
        for prev, cur in zip(sets, sets[1:]):
            assert set(cur[b].tolist()) <= set(prev[b].tolist())
    s = ctx.stats_summary()["l0"]
    assert abs(s["mean_depth"] - 2.0) < 1e-6 and abs(s["fraction_processed"] - 2 / 3) < 1e-6


def test_selected_tokens_see_a_gathered_subsequence():
    ffn, block = _block()
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=1, capacities=(0.5,)))
    x = torch.randn(1, 6, 8)
    ctx = RoutingContext()
    out = mor(x, block, ctx)
    pos = ctx.state[POSITIONS_KEY][0]
    xs = x[0, pos]
    g = 0.1 * mor.routers[0](xs).sigmoid()
    torch.testing.assert_close(out[0, pos], xs + g * block(xs[None])[0])
    rest = [t for t in range(6) if t not in pos.tolist()]
    assert torch.equal(out[0, rest], x[0, rest])


def test_router_loss_coefficient_and_gradients():
    ffn, block = _block()
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=2, aux_coef=0.4))
    x = torch.randn(2, 4, 8)
    ctx = RoutingContext()
    mor(x, block, ctx)
    both = torch.nn.ModuleDict({"mor": mor, "ffn": ffn})
    names = params_with_grad(both, ctx.losses["mor_router_loss"])
    assert {"mor.routers.0.weight", "mor.routers.1.weight"} <= names  # step 2's input depends on the block too
    one = MixtureOfRecursions(8, MoRConfig(num_recursions=1, aux_coef=0.4, capacities=(0.5,)))
    ctx0 = RoutingContext()
    one(x, block, ctx0)
    logits = one.routers[0](x)[..., 0]
    target = torch.zeros(2, 4).scatter_(1, ctx0.state[POSITIONS_KEY], 1.0)
    expected = 0.4 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(ctx0.losses["mor_router_loss"], expected)
    assert params_with_grad(torch.nn.ModuleDict({"mor": one, "ffn": ffn}), ctx0.losses["mor_router_loss"]) == {
        "mor.routers.0.weight"}

"""Dtype guard and NaN isolation (issue 11): a mismatched input dtype is a clear error, never a silent wrong
answer; a NaN batch never changes the routing statistics that later batches use."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig, Router, RouterConfig, RoutingContext
from moekit.layers.variants.blockffn import BlockFFN, BlockFFNConfig

from .variants_util import tiny_moe


@pytest.mark.parametrize("engine", ["reference", "sorted", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_mismatched_input_dtype_is_a_clear_error(engine, dtype):
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2, engine=engine, num_shared_experts=1),
              name="layers.3.ffn")
    with pytest.raises(ValueError, match=r"layers\.3\.ffn: input dtype .* does not match .*float32.*cast"):
        moe(torch.randn(3, 8).to(dtype))
    x = torch.randn(3, 8)
    torch.testing.assert_close(moe(x.to(dtype).float()), moe(x.to(dtype).float()))  # the documented fix works


def test_matching_low_precision_and_autocast_are_allowed():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2, engine="reference"))
    x = torch.randn(5, 8)
    ref = moe(x)
    half = MoE(moe.config).to(torch.bfloat16)
    half.load_state_dict(moe.state_dict())
    y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast chooses the matmul dtype: no error
        torch.testing.assert_close(moe(x.bfloat16()).float(), ref, atol=0.1, rtol=0.1)


def test_nan_batch_does_not_move_the_aux_free_bias_or_later_routing():
    torch.manual_seed(0)
    router = Router(6, 4, 2, RouterConfig(bias_update_rate=0.1, aux_loss_coef=0.0))
    clean = Router(6, 4, 2, RouterConfig(bias_update_rate=0.1, aux_loss_coef=0.0))
    clean.load_state_dict(router.state_dict())
    x = torch.randn(12, 6)
    bad = torch.randn(12, 6)
    bad[::2] = float("nan")
    bad[1] = float("inf")
    router(bad)  # a batch with NaN and inf rows, then the same clean batch for both routers
    router(x)
    clean(bad[[i for i in range(12) if i % 2 and i != 1]])  # only the finite rows of the bad batch
    clean(x)
    torch.testing.assert_close(router.pending_counts, clean.pending_counts)
    assert torch.isfinite(router.pending_counts).all()
    router.step()
    clean.step()
    assert torch.equal(router.expert_bias, clean.expert_bias) and torch.isfinite(router.expert_bias).all()
    assert torch.equal(router(x).expert_ids_TK, clean(x).expert_ids_TK)


def test_all_nan_batch_leaves_the_bias_unchanged():
    router = Router(6, 4, 2, RouterConfig(bias_update_rate=0.1, aux_loss_coef=0.0))
    router(torch.full((8, 6), float("nan")))
    assert router.pending_counts.sum() == 0
    router.step()
    assert torch.equal(router.expert_bias, torch.zeros(4))


def test_nan_batch_does_not_poison_blockffn_chunk_schedule():
    layer = BlockFFN(tiny_moe(num_experts=6), BlockFFNConfig(chunk_coef=0.1, hold_steps=0, interval=1))
    x = torch.randn(2, 4, 8)
    layer(x, RoutingContext())
    layer(torch.full((2, 4, 8), float("nan")), RoutingContext())
    layer(x, RoutingContext())
    assert len(layer._history) == 2 and all(torch.isfinite(h) for h in layer._history)
    layer.on_step(1)
    layer.on_step(2)
    assert layer.chunk_coef == pytest.approx(0.1) and layer._ramp is not None and layer._ramp[2] == pytest.approx(0.1)

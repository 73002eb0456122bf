"""Scaling MLPs: MoE block identities, equal active compute, augmentation, and a short training run."""

from __future__ import annotations

import pytest
import torch

from moekit.apps.scaling_mlps import MLPNet, ScalingMLPsConfig, active_ffn_params, augment
from moekit.types import RoutingContext


def test_one_expert_moe_net_equals_the_dense_net():
    torch.manual_seed(0)
    dense, moe = MLPNet(12, 2, "dense"), MLPNet(12, 2, "moe", num_experts=1)
    moe.embed.load_state_dict(dense.embed.state_dict())
    moe.norms.load_state_dict(dense.norms.state_dict())
    moe.out_norm.load_state_dict(dense.out_norm.state_dict())
    moe.head.load_state_dict(dense.head.state_dict())
    with torch.no_grad():
        for d, m in zip(dense.ffns, moe.ffns, strict=True):
            m.experts.w_up.copy_(d.fc1.weight[None])
            m.experts.w_down.copy_(d.fc2.weight[None])
    x = torch.rand(7, 1, 8, 8)
    assert torch.allclose(moe(x), dense(x), atol=1e-5)


def test_equal_active_compute_and_balancing_loss_reaches_the_router():
    dense, moe = MLPNet(16, 3, "dense"), MLPNet(16, 3, "moe", num_experts=4)
    assert active_ffn_params(dense) == active_ffn_params(moe) == 3 * 2 * 16 * 64
    ctx = RoutingContext()
    moe(torch.rand(9, 1, 8, 8), ctx)
    loss = ctx.total_loss()
    assert isinstance(loss, torch.Tensor) and loss > 0
    loss.backward()
    assert all(f.router.parameters().__next__().grad is not None for f in moe.ffns)


def test_augment_identity_and_shift():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(augment(x, 0, 0.0, gen), x)
    one = torch.zeros(200, 1, 8, 8)
    one[:, 0, 4, 4] = 1.0
    out = augment(one, 1, 0.0, gen)
    assert torch.equal(out.sum((1, 2, 3)), torch.ones(200))  # an interior pixel is moved, not lost
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert set(rows.tolist()) == {3, 4, 5} and set(cols.tolist()) == {3, 4, 5}


@pytest.mark.slow
def test_mlp_learns_digits():
    """Behaviour: a short run of the MoE MLP classifies digits well above chance."""
    pytest.importorskip("sklearn")
    from moekit.apps.advmoe import load_digits
    from moekit.apps.scaling_mlps import train_eval
    cfg = ScalingMLPsConfig(epochs=12)
    assert train_eval(32, "moe", 1.0, cfg, 0, load_digits(0)) > 0.8

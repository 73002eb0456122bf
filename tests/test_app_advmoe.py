"""AdvMoE (spec §35) and the MoE robustness harness (spec §36)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.apps.advmoe import AdvMoEConfig, MoECNN, expert_step, router_step, ste_top1
from moekit.apps.robustness import lipschitz_estimate, pgd_attack, routing_flip_rate
from moekit.layers.moe import MoE, MoEConfig


def _snap(params):
    return [p.detach().clone() for p in params]


def _same(a, b):
    return all(torch.equal(x, y.detach()) for x, y in zip(a, b, strict=True))


def test_expert_step_leaves_router_and_router_step_leaves_experts():
    torch.manual_seed(0)
    cfg = AdvMoEConfig(channels=8, train_pgd_steps=2)
    model = MoECNN(8, 2, 0.5)
    opt_b = torch.optim.SGD(model.backbone_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_r = torch.optim.SGD(model.router.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    gen = torch.Generator().manual_seed(0)
    r0, b0 = _snap(model.router.parameters()), _snap(model.backbone_parameters())
    expert_step(model, x, y, cfg, opt_b, gen)
    assert _same(r0, list(model.router.parameters()))
    assert not _same(b0, list(model.backbone_parameters()))
    b1 = _snap(model.backbone_parameters())
    router_step(model, x, y, cfg, opt_r, gen)
    assert _same(b1, list(model.backbone_parameters()))
    assert not _same(r0, list(model.router.parameters()))


def test_forward_mask_is_one_hot_and_scores_get_gradients():
    scores = torch.softmax(torch.randn(7, 3, 5), -1).requires_grad_(True)
    mask = ste_top1(scores)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.detach().sum(-1), torch.ones(7, 3))
    assert torch.equal(mask.detach().argmax(-1), scores.detach().argmax(-1))
    c = torch.randn(7, 3, 5)
    (mask * c).sum().backward()
    assert torch.allclose(scores.grad, c)  # identity gradient


def test_one_expert_is_trades_on_the_dense_cnn():
    torch.manual_seed(1)
    model = MoECNN(6, 1, 1.0)
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    h = F.relu(model.convs[1](F.relu(model.convs[0](x))))
    dense = model.head(F.max_pool2d(h, 2).flatten(1))
    assert torch.allclose(model(x), dense, atol=1e-6)
    # the router receives no gradient from the expert loss: the recipe is TRADES on the dense net
    cfg = AdvMoEConfig(channels=6, num_experts=1, width_ratio=1.0)
    opt_b = torch.optim.SGD(model.backbone_parameters(), lr=0.0)
    r0 = _snap(model.router.parameters())
    expert_step(model, x, y, cfg, opt_b, torch.Generator().manual_seed(0))
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.router.parameters())
    assert _same(r0, list(model.router.parameters()))


def test_only_selected_group_is_kept():
    torch.manual_seed(2)
    model = MoECNN(4, 2, 0.5)  # 2 groups of 2 channels
    x = torch.rand(3, 1, 8, 8)
    ids = model.router_logits(x).argmax(-1)  # [B, L]
    out = F.relu(model.convs[0](x))
    keep = torch.zeros(3, 4)
    for b in range(3):
        keep[b, ids[b, 0] * 2:(ids[b, 0] + 1) * 2] = 1
    h0 = out * keep[:, :, None, None]
    got = F.relu(model.convs[0](x) * ste_top1(torch.softmax(model.router_logits(x), -1))[:, 0]
                 .repeat_interleave(2, -1)[:, :, None, None])
    assert torch.allclose(got, h0)


def _moe(identical: bool) -> MoE:
    torch.manual_seed(3)
    moe = MoE(MoEConfig(dim=6, hidden_dim=10, num_experts=4, top_k=2, activation="relu", engine="reference"))
    if identical:
        with torch.no_grad():
            moe.experts.w_up.copy_(moe.experts.w_up[:1].expand_as(moe.experts.w_up))
            moe.experts.w_down.copy_(moe.experts.w_down[:1].expand_as(moe.experts.w_down))
    return moe


def test_identical_experts_have_the_lipschitz_estimate_of_one_expert():
    moe = _moe(identical=True)
    w_up, w_down = moe.experts.w_up[0].detach(), moe.experts.w_down[0].detach()
    one = lambda x: F.relu(x @ w_up.T) @ w_down.T  # noqa: E731
    x = torch.randn(20, 6)
    a, b = lipschitz_estimate(moe, x, seed=5), lipschitz_estimate(one, x, seed=5)
    assert a == pytest.approx(b, rel=1e-4)
    # distinct experts give a different estimate (the test can tell them apart)
    assert lipschitz_estimate(_moe(identical=False), x, seed=5) != pytest.approx(b, rel=1e-2)


def test_flip_rate_is_zero_without_perturbation_and_positive_with_one():
    moe = _moe(identical=False)
    x = torch.randn(200, 6)

    def ids(z):
        with torch.no_grad():
            return moe.route(z).expert_ids_TK

    x0 = pgd_attack(lambda z: moe(z).pow(2).sum(), x, eps=0.0, step=0.1, steps=3, lo=-9, hi=9)
    assert torch.equal(x0, x) and routing_flip_rate(ids(x), ids(x0)) == 0.0
    x1 = pgd_attack(lambda z: moe(z).pow(2).sum(), x, eps=1.0, step=0.3, steps=3, lo=-9, hi=9)
    assert (x1 - x).abs().max() <= 1.0 + 1e-6
    assert routing_flip_rate(ids(x), ids(x1)) > 0.05
    # order inside the top-k set does not count as a flip
    assert routing_flip_rate(torch.tensor([[0, 1]]), torch.tensor([[1, 0]])) == 0.0


@pytest.mark.slow
def test_trades_training_learns_digits_and_pgd_hurts():
    """Behaviour: a short TRADES run of the MoE CNN learns digits; PGD lowers its accuracy; routing is top-1."""
    pytest.importorskip("sklearn")
    from moekit.apps.advmoe import evaluate, load_digits, train_model
    cfg = AdvMoEConfig(seeds=1, epochs=3, channels=16, eval_pgd_steps=5, lr=0.1)
    data = load_digits(0)
    m = evaluate(train_model(2, 0.5, cfg, 0, data), cfg, data)
    assert m["clean_acc"] > 0.6, m
    assert m["pgd_acc"] < m["clean_acc"] - 0.02, m
    assert 0.0 <= m["routing_flip_rate"] <= 1.0

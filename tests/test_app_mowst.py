"""Mowst (spec §29): confidence, the mixture loss's gradients, sampled inference, and a behavioural run."""

from __future__ import annotations

import pytest
import torch

from moekit.apps.mowst import confidence, mowst_loss, mowst_predict


@pytest.mark.parametrize("kind", ["var", "ent"])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_confidence_one_hot_is_one_and_uniform_is_zero(kind, k):
    one_hot = torch.eye(k)
    uniform = torch.full((1, k), 1.0 / k)
    assert torch.allclose(confidence(one_hot, kind), torch.ones(k), atol=1e-6)
    assert torch.allclose(confidence(uniform, kind), torch.zeros(1), atol=1e-6)
    mid = torch.softmax(torch.randn(5, k), -1)
    c = confidence(mid, kind)
    assert ((c > 0) & (c < 1)).all()
    assert torch.allclose(confidence(mid, kind, alpha=2.0), c**2)


def test_at_c_one_the_gnn_gets_no_gradient_and_its_share_otherwise():
    torch.manual_seed(0)
    gnn = torch.nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    mlp_logits = torch.randn(10, 3, requires_grad=True)
    mowst_loss(mlp_logits, gnn(x), y, c_N=torch.ones(10)).backward()
    assert torch.count_nonzero(gnn.weight.grad) == 0 and torch.count_nonzero(gnn.bias.grad) == 0
    gnn.zero_grad()
    mowst_loss(mlp_logits, gnn(x), y, c_N=torch.full((10,), 0.25)).backward()
    g_quarter = gnn.weight.grad.clone()
    gnn.zero_grad()
    mowst_loss(mlp_logits, gnn(x), y, c_N=torch.zeros(10)).backward()
    assert torch.allclose(g_quarter, 0.75 * gnn.weight.grad, atol=1e-6)


def test_gradient_flows_through_the_confidence_to_the_mlp():
    torch.manual_seed(1)
    mlp_logits = torch.randn(6, 3, requires_grad=True)
    gnn_logits, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    (g_full,) = torch.autograd.grad(mowst_loss(mlp_logits, gnn_logits, y), mlp_logits)
    c = confidence(torch.softmax(mlp_logits, -1)).detach()
    (g_fixed_c,) = torch.autograd.grad(mowst_loss(mlp_logits, gnn_logits, y, c_N=c), mlp_logits)
    assert not torch.allclose(g_full, g_fixed_c)


def test_fraction_of_mlp_decisions_equals_mean_confidence():
    gen = torch.Generator().manual_seed(0)
    c = torch.rand(40000, generator=gen) ** 2
    m, g = torch.randn(40000, 4), torch.randn(40000, 4)
    pred, used = mowst_predict(m, g, c, gen)
    assert abs(float(used.float().mean()) - float(c.mean())) < 0.01
    assert torch.equal(pred[used], m.argmax(-1)[used]) and torch.equal(pred[~used], g.argmax(-1)[~used])
    _, all_mlp = mowst_predict(m, g, torch.ones(40000), gen)
    assert bool(all_mlp.all())


@pytest.mark.slow
def test_mowst_gates_feature_separable_nodes_to_the_mlp():
    """Behaviour: after alternating training the MLP is far more confident on the feature-separable nodes than
    on the noise nodes, so those go to the MLP and the noise nodes mostly to the GCN."""
    pytest.importorskip("torch_geometric")
    from moekit.apps.mowst import MowstConfig, evaluate_mowst, fit_mowst, make_sbm
    cfg = MowstConfig(seeds=1, num_nodes=360, epochs=80)
    g = make_sbm(cfg, 0)
    torch.manual_seed(0)
    m = evaluate_mowst(*fit_mowst(g, cfg), g, cfg, 0)
    assert m["confidence_easy"] > 0.9 and m["confidence_easy"] > m["confidence_hard"] + 0.2, m
    assert abs(m["mlp_decision_fraction"] - m["mean_confidence"]) < 0.03, m
    assert m["mowst_acc"] > 1 / cfg.num_classes + 0.2, m

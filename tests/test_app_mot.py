"""Mixture of Thoughts (spec §26): zero back projection = primary alone, frozen backbones, no forward pass for
unselected experts, batched = per-query reference, the selection loss's coefficient and gradient, a short run."""

from __future__ import annotations

import pytest
import torch

from moekit.apps.mot import (
    ExpertLM,
    MixtureOfThoughts,
    MoTConfig,
    accuracy,
    answer,
    make_tasks,
    train_experts,
    train_mot,
)
from moekit.configs import ConfigError


def experts(seed: int = 0) -> list[ExpertLM]:
    torch.manual_seed(seed)
    return [ExpertLM("transformer", 16).eval(), ExpertLM("gru", 12).eval(), ExpertLM("cnn", 8).eval()]


def randomise_back(mot: MixtureOfThoughts) -> None:
    with torch.no_grad():
        for row in mot.back:
            for lin in row:
                lin.weight.normal_(0, 0.5)
                lin.bias.normal_(0, 0.5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_zero_back_projection_equals_the_primary_alone(top_k):
    mot = MixtureOfThoughts(experts(), top_k=top_k, latent_dim=8, heads=2).eval()
    x, _, _ = make_tasks(13, 5, 0)
    out, _, sel = mot(x)
    for b in range(13):
        solo = mot.experts[int(sel[b, 0])](x[b:b + 1])
        torch.testing.assert_close(out[b:b + 1], solo, atol=1e-6, rtol=0)
    if top_k > 1:  # and the cross-attention really changes the output once the projection is not zero
        randomise_back(mot)
        out2, _, _ = mot(x)
        assert not torch.allclose(out, out2, atol=1e-3)


def test_backbones_get_no_gradient_and_the_trained_parts_do():
    mot = MixtureOfThoughts(experts(1), top_k=2, latent_dim=8, heads=2)
    randomise_back(mot)
    x, y, _ = make_tasks(32, 5, 1)
    loss, _, _ = mot.loss(x, y, torch.randint(0, 3, (32,)), 0.5)
    loss.backward()
    assert all(p.grad is None for p in mot.experts.parameters())
    assert all(not p.requires_grad for p in mot.experts.parameters())
    for part in (mot.router, mot.cross[0], mot.cross[1]):
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in part.parameters())
    used = {int(m) for m in mot(x)[2].unique()}
    for m in used:
        assert float(mot.adapters[m][0].weight.grad.abs().sum()) > 0


def test_unselected_experts_run_no_forward_pass():
    mot = MixtureOfThoughts(experts(2), top_k=2, latent_dim=8, heads=2).eval()
    with torch.no_grad():  # the router always picks experts 2 (primary) and 0
        mot.router.weight.zero_()
        mot.router.bias.copy_(torch.tensor([1.0, -5.0, 3.0]))
    calls = {m: 0 for m in range(3)}
    for m, e in enumerate(mot.experts):
        for mod in (e.embed, *e.stacks, e.head):
            mod.register_forward_hook(lambda *a, m=m: calls.__setitem__(m, calls[m] + 1))
    x, _, _ = make_tasks(9, 5, 2)
    _, _, sel = mot(x)
    assert (sel[:, 0] == 2).all() and (sel[:, 1] == 0).all()
    assert calls[1] == 0 and calls[0] > 0 and calls[2] > 0
    assert calls[0] == 3  # a peer: embedding and its two stacks, never its head


def test_batched_equals_per_query_reference():
    mot = MixtureOfThoughts(experts(3), top_k=2, latent_dim=8, heads=2).eval()
    randomise_back(mot)
    with torch.no_grad():
        mot.router.weight.normal_(0, 3.0)
    x, _, _ = make_tasks(24, 6, 3)
    out, _, sel = mot(x)
    assert len({tuple(r) for r in sel.tolist()}) >= 3, "the batch must mix primaries and peers"
    for b in range(24):
        torch.testing.assert_close(out[b:b + 1], mot(x[b:b + 1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("coef", [0.0, 2.0])
def test_selection_loss_coefficient_is_applied_and_trains_the_router(coef):
    mot = MixtureOfThoughts(experts(4), top_k=2, latent_dim=8, heads=2)
    x, y, _ = make_tasks(16, 5, 4)
    best = torch.randint(0, 3, (16,))
    total, task, sel = mot.loss(x, y, best, coef)
    torch.testing.assert_close(total, task + coef * sel)
    total.backward()
    grad = mot.router.weight.grad
    # the answer loss gives the hard top-k router no gradient; only the selection loss trains it
    assert (grad is not None and float(grad.abs().sum()) > 0) == (coef > 0)


def test_task_answers():
    fam = torch.tensor([0, 1, 2, 3])
    d = torch.tensor([[3, 9, 5, 1]] * 4)
    assert answer(fam, d).tolist() == [8, 9, 2, 4]
    x, y, f = make_tasks(50, 4, 0)
    assert x.shape == (50, 5) and torch.equal(x[:, 0], 10 + f) and torch.equal(y, answer(f, x[:, 1:]))


def test_config_errors():
    with pytest.raises(ConfigError, match="top_k"):
        MoTConfig(top_k=4)
    with pytest.raises(ConfigError, match="latent_dim"):
        MoTConfig(latent_dim=30, heads=4)
    with pytest.raises(ValueError, match="top_k"):
        MixtureOfThoughts(experts(), top_k=0)


def test_router_sends_each_family_to_its_specialist():
    """Behaviour: after a short run the router picks each family's specialist as primary (families 1 and 2:
    max and count, where the specialist is clearly best) and MoT beats the best single expert."""
    cfg = MoTConfig(seeds=1, num_train=2000, num_test=600, expert_epochs=4, epochs=6)
    ex = train_experts(cfg, 0)
    mot = train_mot(ex, cfg, 0, 2)
    x, y, f = make_tasks(600, cfg.seq_len, 7)
    with torch.no_grad():
        out, _, sel = mot(x)
        best_single = max(accuracy(e(x), y) for e in ex)
    for fam in (1, 2):
        assert float((sel[f == fam, 0] == fam).float().mean()) > 0.8
    assert accuracy(out, y) > best_single + 0.02

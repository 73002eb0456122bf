"""Composition of Experts (spec §25): M picks the argmax-validation expert per category, an oracle router reaches
the best-per-category oracle, the router is called once per query batch, only the chosen expert runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit.apps.coe import COEConfig, CompositionOfExperts, category_expert_map, evaluate, make_tasks, score_matrix
from moekit.configs import ConfigError


class _Const(nn.Module):
    """Always answers ``label``; counts its calls and the queries it saw."""

    def __init__(self, label: int, labels: int = 3) -> None:
        super().__init__()
        self.label, self.labels, self.calls, self.seen = label, labels, 0, 0

    def forward(self, x):
        self.calls += 1
        self.seen += len(x)
        return torch.nn.functional.one_hot(torch.full((len(x),), self.label), self.labels).float()


def test_map_picks_the_argmax_validation_expert_per_category():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.3, 0.3, 0.7]])  # [E, C]
    assert category_expert_map(scores).tolist() == [0, 1, 2]
    # a cost penalty moves category 2 (0.7 vs 0.5) to the cheap expert 0
    assert category_expert_map(scores, torch.tensor([0.0, 0.0, 1.0]), cost_weight=0.3).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="num_val"):
        category_expert_map(torch.tensor([[float("nan"), 1.0]]))


def test_oracle_router_reaches_the_best_per_category_oracle():
    cfg = COEConfig(categories=3, labels=3)
    x, c, _ = make_tasks(cfg, 0, 300)
    y = c.clone()  # category k's answer is label k: expert k is right exactly on category k
    experts = [_Const(k) for k in (2, 0, 1)]
    scores = score_matrix(experts, x, c, y, 3)
    coe = CompositionOfExperts(nn.Linear(cfg.features, 3), experts, category_expert_map(scores))
    oracle_acc = float((coe(x, c).argmax(-1) == y).float().mean())
    best_per_category = sum(float(scores[:, k].max()) * float((c == k).float().mean()) for k in range(3))
    assert oracle_acc == pytest.approx(best_per_category) and oracle_acc == 1.0


def test_router_called_once_and_only_the_chosen_expert_runs():
    calls = []
    router = nn.Linear(4, 2)
    router.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        router.bias.zero_()
    experts = [_Const(0), _Const(1), _Const(2)]
    coe = CompositionOfExperts(router, experts, torch.tensor([2, 0]))  # expert 1 is never chosen
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 0, 0, 0], [-3.0, 0, 0, 0], [0.5, 0, 0, 0]])
    out = coe(x)
    assert calls == [5]  # one router call for the whole batch
    assert out.argmax(-1).tolist() == [2, 0, 2, 0, 2]
    assert [e.seen for e in experts] == [2, 0, 3] and experts[1].calls == 0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="categories"):
        COEConfig(categories=1)


def test_coe_beats_the_same_size_generalist():
    """Behaviour: on conflicting task families, routing to the validated experts beats one generalist of the
    same size, and the trained router finds the category (a broken map or router loses this)."""
    m = evaluate(COEConfig(seeds=1, epochs=15, num_test=1000), 0)
    assert m["router_accuracy"] > 0.95, m
    assert m["coe"] > m["generalist"] + 0.01, m
    assert m["coe"] == pytest.approx(m["coe_oracle_router"], abs=0.02)


def test_one_query_and_no_query():
    coe = CompositionOfExperts(nn.Linear(4, 2), [_Const(1), _Const(2)], torch.tensor([1, 0]))
    assert coe(torch.randn(1, 4)).shape == (1, 3)
    with pytest.raises(ValueError, match="at least one query"):
        coe(torch.randn(0, 4))

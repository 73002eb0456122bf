"""DriftMoE (spec §28): the mask, the router step, top-K expert training, and a drift stream."""

from __future__ import annotations

import torch

from moekit.apps.driftmoe import DriftMoE, DriftMoEConfig, _prequential, correctness_mask


class _Recorder:
    """A stand-in incremental expert that predicts a fixed class and records what it learned."""

    def __init__(self, label: int) -> None:
        self.label, self.seen = label, []

    def predict_one(self, x):
        return self.label

    def learn_one(self, x, y):
        self.seen.append(y)


def test_mask_has_a_one_for_every_correct_expert():
    m = correctness_mask([1, 0, 1, 2, 1], 1, 5)
    assert m.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    # none correct: m_{y mod E} = 1 and nothing else
    assert correctness_mask([0, 0, 0], 2, 3).tolist() == [0.0, 0.0, 1.0]
    assert correctness_mask([None, 0], 3, 2).tolist() == [0.0, 1.0]


def test_router_step_lowers_bce_on_that_batch():
    torch.manual_seed(0)
    cfg = DriftMoEConfig(num_experts=6, top_k=2)
    moe = DriftMoE(5, cfg, lambda: _Recorder(0), seed=0)
    for m in moe.router:
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # compare the same function before and after
    x = torch.randn(64, 5)
    mask = (torch.rand(64, 6) < 0.3).float()
    def bce() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.binary_cross_entropy_with_logits(moe.router(x), mask))
    before = bce()
    assert abs(moe.router_step(x, mask) - before) < 1e-6
    assert bce() < before


def test_only_top_k_experts_change_in_data_mode():
    cfg = DriftMoEConfig(num_experts=7, top_k=3, update_every=1000)
    moe = DriftMoE(4, cfg, lambda: None, seed=1)
    moe.experts = [_Recorder(i % 2) for i in range(7)]
    x_D = torch.randn(4)
    pred, preds, w_E = moe.predict({}, x_D)
    assert pred == preds[int(w_E.argmax())]
    chosen = moe.learn({}, x_D, 1, preds, w_E)
    expected = set(torch.topk(w_E, 3).indices.tolist())
    assert set(chosen) == expected
    assert [i for i, e in enumerate(moe.experts) if e.seen] == sorted(expected)


def test_driftmoe_learns_a_drifting_stream():
    """Behaviour: on SEA with two abrupt concept changes, DriftMoE is well above the majority rate and no worse
    than a single Hoeffding tree by more than a few points (a broken router or expert update fails this)."""
    cfg = DriftMoEConfig(num_instances=900, seeds=1)
    moe = _prequential("driftmoe", "sea", 0, cfg)
    ht = _prequential("hoeffding_tree", "sea", 0, cfg)
    acc, acc_ht = sum(moe) / len(moe), sum(ht) / len(ht)
    assert acc > 0.78, acc
    assert acc > acc_ht - 0.05, (acc, acc_ht)

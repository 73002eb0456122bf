"""Expert Merging++ vs Expert Merging (spec §3): why they can tie, and that ++ differs once units get 2+ chunks."""

import pytest
import torch

import moekit.compression.expert_merging as em
from moekit import MoEConfig
from moekit.compression.api import compress
from moekit.models import LanguageModel, ModelConfig


def lm():
    torch.manual_seed(0)
    moe = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=2)
    return LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, context=16, moe=moe)).eval()


def merged_logits(method, **kw):
    t = torch.randint(0, 40, (12, 16), generator=torch.Generator().manual_seed(1))
    m = lm()
    compress(m, method, t, keep_experts=4, **kw)
    with torch.no_grad():
        return m(t)[0]


@pytest.fixture
def allocations(monkeypatch):
    seen: list[list[int]] = []
    real = em.allocate_chunks

    def spy(importance, budget, kappa=1.0):
        out = real(importance, budget, kappa)
        seen.append(sorted(out.values()))
        return out

    monkeypatch.setattr(em, "allocate_chunks", spy)
    return seen


def test_one_chunk_per_unit_reproduces_expert_merging_exactly(allocations):
    # κ = 0 makes every unit equally important, so with B = 1 x units each gets floor(1) chunk (or, with rounding,
    # none, and keeps its first-run value): ++ retrains the same coefficients from the same init on the same data
    plain = merged_logits("expert-merging")
    pp = merged_logits("expert-merging++", budget=1.0, kappa=0.0)
    assert allocations and all(max(a) <= 1 for a in allocations)
    assert torch.equal(plain, pp)


def test_pp_differs_from_expert_merging_when_units_get_two_or_more_chunks(allocations):
    plain = merged_logits("expert-merging")
    pp = merged_logits("expert-merging++", budget=4.0)
    assert any(max(a) >= 2 for a in allocations) and any(len(set(a)) > 1 for a in allocations)
    assert (plain - pp).abs().max() > 1e-2 * plain.abs().max()

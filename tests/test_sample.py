"""Sampling: the KV cache changes nothing but speed; top-p and temperature behave as defined."""

import pytest
import torch

from moekit import MoEConfig
from moekit.models import LanguageModel, ModelConfig
from moekit.serving import generate, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, num_layers=2, num_heads=2, context=16,
                      moe=MoEConfig(dim=32, hidden_dim=16, num_experts=4, top_k=2))
    m = LanguageModel(cfg)
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy choices are not near-ties
        m.embed.weight.mul_(10)
    return m


def test_greedy_with_and_without_cache_gives_the_same_tokens(model):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    # 30 new tokens run past the 16-position context, so the sliding window is exercised too.
    cached = generate(model, prompt, 30, use_cache=True)
    uncached = generate(model, prompt, 30, use_cache=False)
    assert cached.shape == (2, 35) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 1  # not one repeated token


def test_seeded_sampling_is_reproducible_and_cache_independent(model):
    prompt = torch.tensor([[10, 20, 30]])
    a = generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=5)
    b = generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=5, use_cache=False)
    c = generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, 0.75, gen) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    share = (draws == 0).float().mean().item()
    assert 0.5 < share < 0.75  # renormalised: 0.5 / 0.8 = 0.625
    assert torch.equal(sample_next(logits, 1.0, 0.1, gen), torch.tensor([0]))  # only the top token left
    assert torch.equal(sample_next(logits, 0.0), torch.tensor([0]))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(1, 4), 1.0, 0.0)
    with pytest.raises(ValueError, match="prompt"):
        generate(LanguageModel(ModelConfig(dim=8, num_layers=1, num_heads=2, context=4)),
                 torch.zeros(1, 0, dtype=torch.long), 3)

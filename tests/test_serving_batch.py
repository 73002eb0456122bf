"""Batched generation with left padding equals one-at-a-time generation (greedy and seeded sampling)."""

import pytest
import torch

from moekit import MoEConfig
from moekit.models import LanguageModel, ModelConfig
from moekit.serving import generate
from moekit.serving.batch import BatchDecoder, generate_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, num_layers=2, num_heads=2, context=40,
                      moe=MoEConfig(dim=32, hidden_dim=16, num_experts=5, top_k=2))
    m = LanguageModel(cfg)
    with torch.no_grad():
        m.embed.weight.mul_(10)
    return m.eval()


PROMPTS = [[7], [3, 90, 41, 200, 5, 66, 12, 1, 9], [250, 17, 17, 4], [100, 101]]


def test_batched_greedy_equals_one_at_a_time(model):
    batched = generate_batch(model, PROMPTS, 12)
    for prompt, got in zip(PROMPTS, batched):
        alone = generate(model, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
        assert got == alone
    assert len({tuple(g) for g in batched}) > 1


def test_batched_logits_match_single_prompt_logits(model):
    dec = BatchDecoder(model, PROMPTS, 1)
    with torch.no_grad():
        logits_BSV, _ = model(dec.tokens_BS, cache=dec.cache)
        for b, prompt in enumerate(PROMPTS):
            alone, _ = model(torch.tensor([prompt]))
            torch.testing.assert_close(logits_BSV[b, -len(prompt):], alone[0], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(logits_BSV).all()  # padding rows stay finite too


def test_seeded_sampling_per_row_equals_one_at_a_time(model):
    temps, tops, seeds = [1.0, 0.7, 1.3, 0.0], [0.9, 1.0, 0.5, 1.0], [5, 6, 7, None]
    batched = generate_batch(model, PROMPTS, [10, 3, 7, 1], temperature=temps, top_p=tops, seed=seeds)
    assert [len(g) for g in batched] == [10, 3, 7, 1]
    for b, prompt in enumerate(PROMPTS):
        n = len(batched[b])
        alone = generate(model, torch.tensor([prompt]), n, temperature=temps[b], top_p=tops[b], seed=seeds[b])
        assert batched[b] == alone[0, len(prompt):].tolist()


def test_finish_stops_a_row_and_bad_batches_raise(model):
    dec = BatchDecoder(model, PROMPTS[:2], 5)
    first = dec.step()
    dec.finish(0)
    second = dec.step()
    assert first[0] is not None and second[0] is None and second[1] is not None
    assert len(dec.generated[0]) == 1 and len(dec.generated[1]) == 2
    with pytest.raises(ValueError, match="exceed model.context"):
        BatchDecoder(model, [[1] * 30], 20)
    with pytest.raises(ValueError, match="at least one token"):
        BatchDecoder(model, [[1], []], 2)
    with pytest.raises(ValueError, match="one per prompt"):
        BatchDecoder(model, PROMPTS, 2, temperature=[1.0])

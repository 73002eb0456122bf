"""SCMoE self-contrast decoding and Rewiring-on-the-fly router offsets: the specs' minimal faithful tests."""

import math

import pytest
import torch

from moekit import MoEConfig
from moekit.models import LanguageModel, ModelConfig
from moekit.serving import generate
from moekit.serving.decoding import (
    context_nll,
    contrast_next,
    rank_routing,
    rewire,
    rewiring_generate,
    router_offsets,
    scmoe_generate,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, num_layers=2, num_heads=2, context=32,
                      moe=MoEConfig(dim=32, hidden_dim=16, num_experts=6, top_k=2))
    m = LanguageModel(cfg)
    with torch.no_grad():
        m.embed.weight.mul_(10)
    return m.eval()


PROMPT = torch.tensor([[3, 77, 120, 9], [200, 1, 45, 45]])


def test_scmoe_with_beta_zero_is_greedy(model):
    assert torch.equal(scmoe_generate(model, PROMPT, 10, beta=0.0), generate(model, PROMPT, 10))


def test_scmoe_with_weak_equal_to_strong_is_greedy(model):
    # weak rank routing over ranks {0, 1} is the model's own renormalised top-2
    assert torch.equal(scmoe_generate(model, PROMPT, 10, weak_ranks=(0, 1), beta=2.0), generate(model, PROMPT, 10))


def test_scmoe_differs_from_greedy_and_runs_past_the_context(model):
    out = scmoe_generate(model, PROMPT, 40, weak_ranks=(3,), alpha=0.5, beta=5.0)
    assert out.shape == (2, 44) and not torch.equal(out, generate(model, PROMPT, 40))


def test_contrast_never_emits_an_implausible_token():
    strong = torch.tensor([[5.0, 4.0, -3.0, 0.0]])
    weak = torch.tensor([[5.0, 9.0, -30.0, 0.0]])
    # without the cutoff, token 2 wins the contrast (weak dislikes it most); it is outside V for alpha=0.1
    z_s, z_w = strong.log_softmax(-1), weak.log_softmax(-1)
    assert ((1 + 4) * z_s - 4 * z_w).argmax().item() == 2
    assert contrast_next(strong, weak, alpha=0.1, beta=4.0).item() == 0
    assert contrast_next(strong, weak, alpha=1.0, beta=4.0).item() == 0  # alpha=1: only the argmax is plausible
    assert contrast_next(strong, weak, alpha=1e-9, beta=4.0).item() == 2  # everything plausible
    with pytest.raises(ValueError, match="alpha"):
        contrast_next(strong, weak, alpha=0.0)


def test_rank_routing_uses_the_ranked_expert_alone(model):
    moe = model.layers[0].ffn
    x = torch.randn(7, 32)
    with rank_routing(model, (2,)):
        r = moe.route(x)
    order = moe.router(x).scores_TE.argsort(-1, descending=True)
    assert torch.equal(r.expert_ids_TK[:, 0], order[:, 2]) and torch.equal(r.weights_TK, torch.ones(7, 1))
    assert "route" not in vars(moe)  # restored
    with pytest.raises(ValueError, match="weak ranks"), rank_routing(model, (6,)):
        pass


def test_zero_offsets_leave_the_model_unchanged(model):
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        base, _ = model(tokens)
        with router_offsets(model) as deltas:
            same, _ = model(tokens)
    assert torch.equal(base, same) and len(deltas) == 2 and all(d.shape == (6,) for d in deltas)


def test_rewiring_trains_only_the_offsets_and_lowers_the_context_nll(model):
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with router_offsets(model) as deltas:
        seen = []
        for d in deltas:
            d.register_hook(lambda g: seen.append(g) or g)
        trainable = [p for p in model.parameters() if p.requires_grad]
        during = []  # model parameters that require grad, at each forward of the adaptation
        hook = model.register_forward_pre_hook(
            lambda m, a: during.append([n for n, p in m.named_parameters() if p.requires_grad]))
        before, after = rewire(model, tokens, deltas, steps=10, lr=0.1)
        hook.remove()
        assert len(during) == 12 and all(names == [] for names in during)  # only the offsets were trainable
        assert after < before and seen and all(d.abs().sum() > 0 for d in deltas)
        with torch.no_grad():
            assert math.isclose(float(context_nll(model, tokens)), after, rel_tol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no model weight was trained
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert len(trainable) == len(weights)  # requires_grad is restored after adaptation


def test_rewiring_generate_runs_in_chunks(model):
    out = rewiring_generate(model, PROMPT[:1], 9, steps=2, every=4)
    assert out.shape == (1, 13) and torch.equal(out[:, :4], PROMPT[:1])
    with pytest.raises(ValueError, match="every"):
        rewiring_generate(model, PROMPT[:1], 3, every=0)

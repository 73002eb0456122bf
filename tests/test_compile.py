"""The compile-friendly MoE path: the ``sorted_op`` engine (the sorted engine as one custom op) equals the
reference on outputs and gradients, passes ``torch.library.opcheck``, and a model with MoE layers compiles with
``fullgraph=True`` (no graph break inside the MoE layer) to the same outputs and gradients."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moekit import MoE, MoEConfig, RouterConfig
from moekit.dispatch import resolve_engine
from moekit.dispatch.compiled import sorted_moe_op
from moekit.models import LanguageModel
from moekit.recipes import load_preset

from .reference import assert_close
from .test_engines import CASES, check_against_reference


@pytest.mark.parametrize("case", ["odd_dims", "k_equals_e", "gelu", "shared", "capacity_drop", "expert_choice"])
def test_sorted_op_matches_reference(case):
    torch.manual_seed(0)
    check_against_reference(MoEConfig(**CASES[case]), (3, 7), engine="sorted_op")


def test_sorted_op_with_biases_one_token_and_empty_experts():
    torch.manual_seed(1)
    check_against_reference(MoEConfig(dim=12, hidden_dim=10, num_experts=6, top_k=1, use_ffn_bias=True), (1,),
                            engine="sorted_op")  # one token: five of six experts empty


def test_opcheck_fake_and_autograd_registrations():
    torch.manual_seed(2)
    T, D, F, E, K = 5, 6, 4, 3, 2
    ids_TK = torch.tensor([[0, 2], [2, -1], [1, 0], [-1, -1], [2, 1]])
    args = (torch.randn(T, D, dtype=torch.float64, requires_grad=True), ids_TK,
            torch.rand(T, K, dtype=torch.float64, requires_grad=True),
            *(torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((E, F, D), (E, F, D), (E, D, F))),
            None, torch.randn(E, F, dtype=torch.float64, requires_grad=True), None, "swiglu")
    torch.library.opcheck(sorted_moe_op, args)
    assert torch.autograd.gradcheck(lambda *a: sorted_moe_op(*a[:3], *a[3:6], None, a[6], None, "swiglu"),
                                    args[:6] + (args[7],))


def test_auto_prefers_plain_sorted_eagerly():
    moe = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2))
    assert resolve_engine("auto", torch.randn(3, 8), moe.experts).name == "sorted"


def _model_grads(model, tokens, g, run=None):
    model.zero_grad(set_to_none=True)
    logits, _ = (model if run is None else run)(tokens)
    (logits * g).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_fullgraph_compile_of_a_moe_model_equals_reference():
    """fullgraph=True raises on any graph break; 'aot_eager' traces forward and backward through the fake
    implementations like inductor does, without the C++ compile (minutes on this CPU)."""
    torch._dynamo.reset()
    cfg = load_preset("tiny").model
    cfg = replace(cfg, moe=replace(cfg.moe, engine="auto", router=RouterConfig(capacity_factor=0.75)))
    torch.manual_seed(3)
    model = LanguageModel(cfg)
    tokens, g = torch.randint(0, 256, (2, 11)), torch.randn(2, 11, 256)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    y, grads = _model_grads(model, tokens, g, run=compiled)
    reference = LanguageModel(replace(cfg, moe=replace(cfg.moe, engine="reference")))
    reference.load_state_dict(model.state_dict())
    y_ref, grads_ref = _model_grads(reference, tokens, g)
    assert_close(y, y_ref, "compiled logits", atol=1e-5)
    assert set(grads) == set(grads_ref) and any("experts" in n for n in grads)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], f"grad {name}", atol=1e-4, rtol=1e-3)  # float32 sums over 22 tokens


def test_plain_sorted_engine_breaks_the_graph():
    """What the custom op avoids: the sorted engine's host sync fails a fullgraph compile."""
    torch._dynamo.reset()
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2, engine="sorted"))
    with pytest.raises(Exception, match=r"(?i)data-dependent|tolist"):
        torch.compile(moe, fullgraph=True, backend="aot_eager")(torch.randn(5, 8))

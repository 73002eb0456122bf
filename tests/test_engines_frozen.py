"""Engines when only some inputs need gradients (frozen experts, a frozen or detached router, frozen input):
the sorted engines' backwards must give the reference's gradients for what is trained and nothing else.
(Found by mutation testing: the partial-gradient branches were not exercised.) ``sorted_blocked`` runs with
experts narrower and wider than the model: it applies the combine weights to the narrower of its hidden
activation and its output, so both of its backward branches are covered."""

from __future__ import annotations

import itertools

import pytest
import torch

from moekit import MoE, MoEConfig, RouterConfig
from moekit.dispatch import get_engine

from .reference import assert_close


def _setup(activation: str, use_bias: bool, hidden_dim: int = 7):
    torch.manual_seed(0)
    cfg = MoEConfig(dim=10, hidden_dim=hidden_dim, num_experts=4, top_k=2, activation=activation,
                    use_ffn_bias=use_bias, router=RouterConfig(aux_loss_coef=0.0))
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(9, 10)
    routing = moe.route(x)
    return moe, x, routing


def _run(engine: str, moe: MoE, x: torch.Tensor, routing, train: set[str]):
    bank = moe.experts
    for n, p in bank.named_parameters():
        p.requires_grad_(n in train)
        p.grad = None
    xi = x.clone().requires_grad_("x" in train)
    w = routing.weights_TK.detach().clone().requires_grad_("weights" in train)
    r = type(routing)(expert_ids_TK=routing.expert_ids_TK, weights_TK=w, scores_TE=routing.scores_TE.detach(),
                      logits_TE=routing.logits_TE.detach())
    y = get_engine(engine)(xi, r, bank)
    g = torch.linspace(-1, 1, y.numel()).view_as(y)
    if y.requires_grad:
        (y * g).sum().backward()
    grads = {"x": xi.grad, "weights": w.grad, **{n: p.grad for n, p in bank.named_parameters()}}
    for p in bank.parameters():
        p.requires_grad_(True)
    return y.detach(), grads


PARTS = ["x", "weights", "w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate"]
SUBSETS = [{"x"}, {"weights"}, {"w_down"}, {"w_up", "w_gate"}, {"x", "w_up"}, {"b_down"}, {"b_up", "b_gate"},
           {"x", "weights", "b_down"}, set()]


@pytest.mark.parametrize("activation,use_bias,hidden_dim", [("swiglu", True, 7), ("gelu", False, 7),
                                                            ("swiglu", False, 7), ("swiglu", False, 13)])
@pytest.mark.parametrize("engine", ["sorted", "sorted_blocked"])
def test_sorted_engine_partial_gradients_match_reference(activation, use_bias, hidden_dim, engine):
    moe, x, routing = _setup(activation, use_bias, hidden_dim)
    names = {n for n, _ in moe.experts.named_parameters()} | {"x", "weights"}
    for train in SUBSETS:
        train = train & names
        y_ref, g_ref = _run("reference", moe, x, routing, train)
        y, g = _run(engine, moe, x, routing, train)
        assert_close(y, y_ref, f"output, training {sorted(train)}")
        for part in names:
            if part in train:
                assert g[part] is not None, f"{part} is trained but got no gradient"
                assert_close(g[part], g_ref[part], f"grad {part}, training {sorted(train)}")
            else:
                assert g[part] is None, f"{part} is frozen but got a gradient"


def test_sorted_engine_with_frozen_router_and_experts_trains_only_the_input():
    moe, x, routing = _setup("swiglu", False)
    routing = type(routing)(expert_ids_TK=routing.expert_ids_TK, weights_TK=routing.weights_TK.detach(),
                            scores_TE=routing.scores_TE.detach(), logits_TE=routing.logits_TE.detach())
    for p in itertools.chain(moe.experts.parameters(), moe.router.parameters()):
        p.requires_grad_(False)
    xi = x.clone().requires_grad_(True)
    y = get_engine("sorted")(xi, routing, moe.experts)
    y.sum().backward()
    xr = x.clone().requires_grad_(True)
    get_engine("reference")(xr, routing, moe.experts).sum().backward()
    assert_close(xi.grad, xr.grad, "grad x")

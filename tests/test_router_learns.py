"""Every shipped preset's routers learn from the task loss alone (issue 11: the top-1 trap).

With ``top_k=1`` and renormalised weights every gate is ``p/p = 1`` and cross-entropy gives the router no
gradient; only the aux loss would move it. This test builds every preset at a tiny width, backpropagates the
language-model cross-entropy alone (no balancing loss) and asserts that every router parameter gets a
non-zero gradient, except an explicit, asserted list of parameters that learn by other means by design.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, RouterConfig
from moekit.layers.moe import MoE
from moekit.models.lm import LanguageModel
from moekit.recipes import list_presets, merge, preset_dict
from moekit.training.config import run_config_from_dict

PRESETS = [name for name, _ in list_presets()]
# Router parameters by name: Router modules (router / routers.N / depth routers), ProMoE prototypes, GMoE's
# similarity, MoE++'s gates, MuMoE's gate, BlockFFN's router scale, Read-ME's planner. Not the experts' w_gate
# nor the shared-expert gate (w_shared_gate).
ROUTER_RE = re.compile(r"(^|\.)(router|routers|depth_router)(\.|_scale)|(^|\.)prototypes$|similarity_weight$"
                       r"|(^|\.)(gate|gate_residual)\.weight$|const_gate$|(^|\.)gate_weight$|^planner\."
                       r"|\.ffn\.(proj_in|proj_out|cell)\."  # RMoE: the GRU router
                       r"|\.attn\.w_router\.weight$"  # MoM: the memory router
                       r"|\.attn\.w_sel_[vo]\.weight$"  # SwitchHead: value / output expert selection
                       r"|\.attn\.w_gate\.weight$|\.ffn\.selector\.weight$")  # UoE: SMHA heads, UoME experts
NO_ROUTER = {"dense": "a dense model", "thor": "THOR samples experts at random (no router)",
             "secret-moe": "the dense teacher that moekit.analysis.secret_moe distils",
             "routing-transformer": "online k-means centroids (buffers updated by EMA after each step)",
             "duo-llm": "routes sampled at random in training; the oracle search picks them"}
# parameters that by design get no gradient from cross-entropy at init; each is asserted below.
BY_OTHER_MEANS = {
    "smoe-dropout": r"\.moe\.router\.weight$",  # a frozen random router (requires_grad=False, asserted)
    "mofme": r"\.router\.weight$",  # identical FiLM experts at init (gamma=1, beta=0); see the test below
    "moepp": r"^layers\.0\.ffn\.gate_residual\.weight$",  # the first MoE layer has no previous gating logits
    # Dr.LLM's routers are trained on the layer paths found by search (cross-entropy on the path labels, through
    # the training-step hook); the language model's own loss does not reach them.
    "drllm": r"^depth_router\.routers\.",
    # MoMa: the test's tokens are text bytes only, so the image group's router receives no token (by design)
    "moma": r"\.groups\.[1-9]\d*\.router\.weight$",
}
TOKENS = 16


def _tiny_model(name: str) -> LanguageModel:
    data = preset_dict(name)
    layers = min(int(data["model"].get("num_layers", 2)), 4)
    data = merge(data, {"model": {"dim": 32, "num_heads": 2, "num_layers": layers, "context": TOKENS}})
    if "moe" in data["model"]:
        data = merge(data, {"model": {"moe": {"hidden_dim": 16}}})
    data["model"].pop("dense_hidden_dim", None)
    if "small_hidden_dim" in data["model"].get("variant", {}):  # Duo-LLM: small module below the big one
        data = merge(data, {"model": {"variant": {"small_hidden_dim": 8}}})
    torch.manual_seed(0)
    return LanguageModel(run_config_from_dict(data).model)


def _cross_entropy(model: LanguageModel) -> torch.Tensor:
    tokens = torch.randint(0, 256, (2, TOKENS), generator=torch.Generator().manual_seed(1))
    logits, _ = model(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _router_grads(model: LanguageModel) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    _cross_entropy(model).backward()
    return {n: (0.0 if p.grad is None else p.grad.abs().max().item())
            for n, p in model.named_parameters() if ROUTER_RE.search(n)}


@pytest.mark.parametrize("name", PRESETS)
def test_every_router_gets_a_gradient_from_cross_entropy_alone(name: str) -> None:
    model = _tiny_model(name)
    grads = _router_grads(model)
    if name in NO_ROUTER:
        assert grads == {}, f"{name}: expected no router ({NO_ROUTER[name]}), found {sorted(grads)}"
        return
    assert grads, f"preset {name!r} has no router parameter matching {ROUTER_RE.pattern}"
    expected_dead = {n for n in grads if name in BY_OTHER_MEANS and re.search(BY_OTHER_MEANS[name], n)}
    dead = {n for n, g in grads.items() if g < 1e-7}
    assert dead == expected_dead, f"{name}: routers without a cross-entropy gradient: {sorted(dead)}"
    if name == "smoe-dropout":
        params = dict(model.named_parameters())
        assert expected_dead and not any(params[n].requires_grad for n in expected_dead)


def test_mofme_router_learns_once_the_film_experts_diverge() -> None:
    model = _tiny_model("mofme")
    assert max(g for n, g in _router_grads(model).items() if n.endswith("router.weight")) < 1e-7
    with torch.no_grad():  # one SGD step on the modulations, from cross-entropy alone
        for n, p in model.named_parameters():
            if n.endswith((".gamma", ".beta")):
                p -= 10.0 * p.grad
    grads = _router_grads(model)
    assert all(g > 1e-6 for n, g in grads.items() if n.endswith("router.weight"))


def test_shipped_top1_presets_use_the_raw_probability() -> None:
    top1 = [n for n in PRESETS if preset_dict(n)["model"].get("moe", {}).get("top_k") == 1]
    assert "pr-moe" in top1
    for name in top1:
        cfg = run_config_from_dict(preset_dict(name)).model.moe
        assert not cfg.router.renormalize(1), f"{name} renormalises its single top-1 weight to 1"


@pytest.mark.parametrize("norm,top_k,expected", [(None, 1, False), (None, 2, True), (True, 1, True),
                                                 (False, 3, False), (True, 3, True)])
def test_norm_topk_prob_default_follows_switch_for_top1(norm, top_k, expected) -> None:
    assert RouterConfig(norm_topk_prob=norm).renormalize(top_k) is expected


def test_top1_default_router_gets_gradient_and_weight_is_the_probability() -> None:
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=1, engine="reference"))
    x = torch.randn(5, 8)
    routing = moe.route(x)
    torch.testing.assert_close(routing.weights_TK[:, 0], routing.scores_TE.max(-1).values)
    moe(x).square().sum().backward()
    assert moe.router.weight.grad.abs().max() > 1e-4
    forced = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=1, engine="reference",
                           router=RouterConfig(norm_topk_prob=True)))
    torch.testing.assert_close(forced.route(x).weights_TK, torch.ones(5, 1))
    forced(x).square().sum().backward()
    assert forced.router.weight.grad is None or forced.router.weight.grad.abs().max() < 1e-6  # rounding only

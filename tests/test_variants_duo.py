"""Duo-LLM (architectures.md §22, compression-adaptation-serving.md §41): routes, the spec's faithful tests, the
router's budget loss through the training-step hook, and the oracle search."""

from __future__ import annotations

import pytest
import torch

from moekit import RoutingContext
from moekit.analysis.duo import oracle_routes, route_patterns
from moekit.configs import ConfigError
from moekit.experts import FeedForward
from moekit.layers import build_ffn
from moekit.layers.step_hook import training_step_hook
from moekit.layers.variants.duo import BIG, ROUTES_KEY, SKIP, SMALL, DuoConfig, DuoFFN
from moekit.models import LanguageModel, ModelConfig
from moekit.recipes import load_preset
from moekit.training import with_overrides

from .reference import assert_close
from .variants_util import tiny_moe


def test_forced_routes_are_skip_small_or_big_per_token():
    torch.manual_seed(0)
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(small_hidden_dim=3), name="l")
    x = torch.randn(2, 5, 8)
    routes = torch.tensor([SKIP, SMALL, BIG, BIG, SMALL, SKIP, BIG, SMALL, SKIP, BIG])
    ctx = RoutingContext(collect_stats=True)
    ctx.state[ROUTES_KEY] = {"l": routes}
    y = layer(x, ctx).view(10, 8)
    flat = x.view(10, 8)
    expected = torch.stack([torch.zeros(8) if r == SKIP else (layer.small if r == SMALL else layer.big)(flat[i])
                            for i, r in enumerate(routes.tolist())])
    assert_close(y, expected, "per-token routes")
    s = ctx.stats["l"].summary()
    assert [s[f"{r}_fraction"] for r in ("big", "skip", "small")] == pytest.approx([0.4, 0.3, 0.3])


def test_all_big_is_the_original_dense_ffn_and_skip_changes_nothing():
    torch.manual_seed(1)
    moe = tiny_moe(num_experts=1, top_k=1)
    layer = build_ffn("duo", moe, {"small_hidden_dim": 4}, name="l").eval()
    ffn = FeedForward(8, 12)
    layer.big.load_state_dict(ffn.state_dict())  # a Duo model built from an unmodified dense network
    x = torch.randn(3, 4, 8)
    assert_close(layer(x), ffn(x), "eval_route = big is the base model")
    ctx = RoutingContext()
    ctx.state[ROUTES_KEY] = {"l": SKIP}
    assert torch.equal(layer(x, ctx), torch.zeros_like(x)), "skip adds nothing to the residual stream"


def test_random_training_routes_use_every_allowed_option():
    torch.manual_seed(2)
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(allow_skip=False)).train()
    w, _ = layer.route_weights(torch.randn(400, 8), None)
    share = w.mean(0)
    assert share[SKIP] == 0 and 0.4 < share[SMALL] < 0.6 and 0.4 < share[BIG] < 0.6, "p = 0.5 per module choice"


def test_router_soft_in_training_hard_in_eval_and_temperature_anneals():
    torch.manual_seed(3)
    layer = DuoFFN(tiny_moe(num_experts=1, top_k=1), DuoConfig(routing="router", anneal_steps=10,
                                                               temperature=2.0, min_temperature=0.5))
    x = torch.randn(6, 8)
    w, _ = layer.train().route_weights(x, None)
    assert ((w > 0) & (w < 1)).all()
    expected = (w[:, SMALL:SMALL + 1] * layer.small(x) + w[:, BIG:BIG + 1] * layer.big(x))
    assert_close(layer(x), expected, "soft routing mixes the modules")
    w_eval, _ = layer.eval().route_weights(x, None)
    assert torch.equal(w_eval.sum(-1), torch.ones(6)) and set(w_eval.unique().tolist()) == {0.0, 1.0}
    layer.on_step(5)
    assert layer.temperature == pytest.approx(1.0)
    layer.on_step(50)
    assert layer.temperature == pytest.approx(0.5)


def _duo_model(**variant):
    cfg = with_overrides(load_preset("duo-llm"), {
        "model.dim": "16", "model.num_heads": "2", "model.context": "8", "model.num_layers": "2",
        "model.moe.hidden_dim": "32", "model.variant.small_hidden_dim": "4",
        **{f"model.variant.{k}": v for k, v in variant.items()}})
    return cfg, LanguageModel(cfg.model)


def test_budget_loss_is_global_its_coefficient_applied_and_it_trains_the_routers():
    torch.manual_seed(4)
    results = {}
    for coef in ("1.0", "3.0"):
        torch.manual_seed(5)
        _, model = _duo_model(routing="router", budget_coef=coef, budget_target="0.1")
        step = training_step_hook(model)
        assert step.func is DuoFFN.training_step
        x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
        results[coef] = (model, step(lambda ctx, m=model, x=x: m(x, ctx), y, False))
    model, out = results["1.0"]
    p_big = torch.stack(out.ctx.state["duo.p_big"]).mean()
    assert len(out.ctx.state["duo.p_big"]) == 2, "one mean per layer, combined into one budget"
    assert_close(out.ctx.losses["duo_budget_loss"], (p_big - 0.1) ** 2, "global budget loss")
    assert_close(results["3.0"][1].ctx.losses["duo_budget_loss"], 3 * out.ctx.losses["duo_budget_loss"], "coef")
    assert_close(out.loss, out.ce + out.ctx.total_loss(), "the step's loss")
    model.zero_grad()
    out.ctx.losses["duo_budget_loss"].backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, DuoFFN))


def test_oracle_beats_every_pattern_within_budget_and_all_big_is_the_base_model():
    torch.manual_seed(6)
    _, model = _duo_model()
    tokens = torch.randint(0, 256, (2, 8))
    result = oracle_routes(model, tokens, budget=1)
    assert len(result.patterns) == 9 == len(route_patterns(2))
    for p, pattern in enumerate(result.patterns):
        if pattern.count("big") <= 1:
            assert (result.best_loss_BS <= result.losses_PBS[p] + 1e-6).all()
            assert result.mean_loss(result.best_sequence_pattern) <= result.mean_loss(pattern) + 1e-6
    assert "big" not in result.best_sequence_pattern or result.best_sequence_pattern.count("big") <= 1
    assert (result.difficulty_BS >= -1e-6).all()
    full = oracle_routes(model, tokens)
    model.eval()
    logits, _ = model(tokens[:, :-1])
    base = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    assert_close(full.losses_PBS[full.patterns.index(("big", "big"))], base, "all-big pattern = eval model")


def test_bad_input_names_the_field_and_fix():
    with pytest.raises(ConfigError, match="variant.small_hidden_dim=64 must be below moe.hidden_dim=32"):
        build_ffn("duo", tiny_moe(hidden_dim=32, num_experts=1, top_k=1), {"small_hidden_dim": 64})
    with pytest.raises(ConfigError, match="variant.routing='learned' is not one of"):
        DuoConfig(routing="learned")
    with pytest.raises(ConfigError, match="no Duo layers"):
        oracle_routes(LanguageModel(ModelConfig(dim=8, num_layers=1, num_heads=2, context=8)),
                      torch.randint(0, 256, (1, 4)))
    _, model = _duo_model()
    with pytest.raises(ConfigError, match="budget=3 must be between 0 and the 2 Duo layers"):
        oracle_routes(model, torch.randint(0, 256, (1, 4)), budget=3)


def test_duo_preset_trains_with_random_routes_and_reports_them(tmp_path):
    from moekit.training import train

    cfg, _ = _duo_model()
    cfg = with_overrides(cfg, {"train.max_steps": "2", "train.batch_size": "2", "train.eval_every": "2",
                               "train.eval_batches": "1", "data.max_files": "3", "train.max_seconds": "600"})
    row = train(cfg, tmp_path / "run", progress=False).summary["layers"]["layers.1.ffn"]
    assert row["big_fraction"] == 1.0 and row["skip_fraction"] == 0.0, "evaluation runs the base (all-big) model"

"""Model-level hooks of the variants: depth routing (MoD, MoR), the Read-ME planner, CoE without an outer
residual, THOR's two-pass training step."""

from __future__ import annotations

import pytest
import torch

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.models import LanguageModel, ModelConfig
from moekit.recipes import load_preset
from moekit.serving.sampling import generate
from moekit.training import train_step, with_overrides
from moekit.training.optim import build_optimizer

from .reference import assert_close


def small(preset: str, **overrides):
    base = {"model.dim": "32", "model.num_heads": "2", "model.context": "16", "model.moe.hidden_dim": "16",
            "model.num_layers": "4"}
    return with_overrides(load_preset(preset), {**base, **overrides})


def test_mod_capacity_one_equals_blocks_scaled_by_router():
    cfg = small("mod", **{"model.depth_routing.capacity": "1.0"})
    model = LanguageModel(cfg.model).eval()
    tokens = torch.randint(0, 256, (2, 12))
    logits, _ = model(tokens)
    # by hand: routed blocks (1 and 3) add r_t * delta(x_t) on every token at its own position
    x = model.embed(tokens)
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    for block in model.layers:
        ctx = RoutingContext()
        if str(block.index) in model.depth_router:
            r = x @ model.depth_router[str(block.index)].router.weight[0]
            x = x + r[..., None] * block.delta(x, cos, sin, ctx)
        else:
            x = block(x, cos, sin, ctx)
    assert_close(logits, torch.nn.functional.linear(model.norm(x), model.embed.weight), "MoD, capacity 1")


def test_selected_tokens_attend_at_their_own_positions():
    """RoPE is relative: shifting every selected position by a constant changes nothing, spreading them does."""
    model = LanguageModel(small("mod").model).eval()
    block = model.layers[1]
    x = torch.randn(1, 4, 32)
    ctx = RoutingContext()

    def delta(positions):
        pos = torch.tensor([positions])
        return block.delta(x, model.rope_cos[pos], model.rope_sin[pos], ctx)

    assert_close(delta([0, 1, 2, 3]), delta([5, 6, 7, 8]), "shifted positions")
    assert not torch.allclose(delta([0, 1, 2, 3]), delta([0, 3, 6, 9]), atol=1e-4)
    assert_close(delta([0, 1, 2, 3]), block.delta(x, model.rope_cos[:4], model.rope_sin[:4], ctx), "full tables")


def test_mod_router_loss_and_fraction_processed_reach_the_summary():
    model = LanguageModel(small("mod").model)
    ctx = RoutingContext(collect_stats=True)
    model(torch.randint(0, 256, (2, 16)), ctx)
    assert "mod_router_loss" in ctx.losses
    assert ctx.stats_summary()["layers.1.mod"]["fraction_processed"] == pytest.approx(2 / 16)


def test_mor_full_capacity_equals_middle_cycle_recursion():
    cfg = small("mor", **{"model.depth_routing.capacities": "1.0,1.0,1.0"})
    model = LanguageModel(cfg.model).eval()
    tokens = torch.randint(0, 256, (2, 10))
    logits, _ = model(tokens)
    ctx = RoutingContext()
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    first, *middle, last = model.layers
    h = first(model.embed(tokens), cos, sin, ctx)
    mor = model.depth_router
    for router in mor.routers:
        g = mor.config.alpha * torch.sigmoid(h @ router.weight[0] / mor.config.temperature)
        out = h
        for block in middle:
            out = block(out, cos, sin, ctx)
        h = h + g[..., None] * out  # MoR adds g * Block(H), the block's full output (spec, do not "fix")
    h = last(h, cos, sin, ctx)
    assert_close(logits, torch.nn.functional.linear(model.norm(h), model.embed.weight), "MoR, capacity 1")


def test_depth_routing_config_errors():
    with pytest.raises(ConfigError, match="kind"):
        ModelConfig(dim=32, num_layers=4, num_heads=2, context=16, depth_routing={"kind": "skip"})
    with pytest.raises(ConfigError, match="num_layers >= 3"):
        ModelConfig(dim=32, num_layers=2, num_heads=2, context=16, depth_routing={"kind": "mor"})
    with pytest.raises(ConfigError, match="did you mean"):
        ModelConfig(dim=32, num_layers=4, num_heads=2, context=16, depth_routing={"kind": "mod", "capacty": 0.5})


@pytest.mark.parametrize("preset", ["mod", "mor", "readme"])
def test_whole_sequence_routing_refuses_the_kv_cache_and_samples_without_it(preset):
    model = LanguageModel(small(preset).model).eval()
    assert not model.supports_kv_cache
    with pytest.raises(ValueError, match="cannot use a KV cache"):
        model(torch.randint(0, 256, (1, 4)), cache=model.new_cache(1))
    prompt = torch.randint(0, 256, (1, 5))
    assert torch.equal(generate(model, prompt, 6), generate(model, prompt, 6, use_cache=False))


def test_readme_planner_plans_every_layer_once_per_forward():
    model = LanguageModel(small("readme").model)
    calls = []
    model.planner.register_forward_hook(lambda *a: calls.append(1))
    ctx = RoutingContext(collect_stats=True)
    model(torch.randint(0, 256, (2, 8)), ctx)
    assert len(calls) == 1 and "readme.plan" in ctx.state
    assert {f"layers.{i}.ffn" for i in range(4)} <= set(ctx.stats)


def test_coe_without_outer_residual_replaces_the_hidden_state():
    model = LanguageModel(small("coe").model).eval()
    block = model.layers[0]
    assert block.ffn.block_residual is False
    x = torch.randn(1, 5, 32)
    cos, sin = model.rope_cos[:5], model.rope_sin[:5]
    h = x + block.attn(block.attn_norm(x), cos, sin)
    assert_close(block(x, cos, sin, RoutingContext()), block.ffn(block.ffn_norm(h), RoutingContext()), "CoE")


def test_thor_training_step_runs_two_passes_with_the_consistency_loss():
    from moekit.data import load_data
    from moekit.layers.step_hook import language_model_loss, training_step_hook
    from moekit.layers.variants.thor import THOR, consistency_loss

    # THOR trains each layer on one random expert per pass: with E experts and 2 layers both passes pick the same
    # experts (zero consistency loss) with probability 1/E^2, so E = 64 keeps that chance at 1/4096 whatever
    # random state earlier tests left (with E = 4 it was 1/16)
    cfg = small("thor", **{"model.moe.num_experts": "64", "train.batch_size": "2", "data.max_files": "3"})
    model = LanguageModel(cfg.model)
    hook = training_step_hook(model)
    assert hook.func is THOR.training_step and len(hook.args[0]) == 2, "bound to every THOR layer (moe_every = 2)"
    assert training_step_hook(LanguageModel(small("default").model)) is language_model_loss
    passes = []
    model.register_forward_hook(lambda *a: passes.append(1))
    metrics = train_step(model, build_optimizer(model, cfg.train), load_data(cfg.data), cfg, 0,
                         torch.device("cpu"))
    assert len(passes) == 2 and metrics["aux"] > 0, "two stochastic passes, and their disagreement as a loss"
    # one expert: both passes are the same dense model and agree exactly (THOR with N = 1 is the dense model)
    one = LanguageModel(small("thor", **{"model.moe.num_experts": "1"}).model)
    x = torch.randint(0, 256, (2, 16))
    assert consistency_loss(one(x)[0], one(x)[0]).item() == 0.0


def test_variant_statistics_reach_the_run_summary(tmp_path):
    from moekit.training import train
    from moekit.training.metrics import summary_table

    cfg = small("topp", **{"train.max_steps": "2", "train.batch_size": "2", "train.eval_every": "2",
                           "train.eval_batches": "1", "data.max_files": "3", "model.num_layers": "2"})
    result = train(cfg, tmp_path / "run", progress=False)
    row = result.summary["layers"]["layers.0.ffn"]
    assert 1 <= row["experts_per_token"] <= 8, "top-p's experts per token, averaged over validation batches"
    assert "experts_per_token=" in summary_table(result.summary)


def test_count_uses_the_variants_own_active_parameters():
    from moekit.models import count

    moe = count(small("coarse", **{"model.moe.num_experts": "16"}).model)  # top-2, no shared expert
    coe = count(small("coe", **{"model.moe.num_experts": "16", "model.moe.num_shared_experts": "0",
                                "model.moe.top_k": "2", "model.variant.num_iterations": "2"}).model)
    # CoE with 2 iterations applies top_k experts (and a router) twice per token: twice the MoE FFN compute
    dense_part = moe.active_params - 4 * (16 * 32 + 2 * 3 * 32 * 16)
    assert coe.active_params - dense_part == 2 * 4 * (16 * 32 + 2 * 3 * 32 * 16)
    # MoE++: every slot counted as an FFN expert (upper bound); one more slot costs exactly one SwiGLU expert
    k1, k2 = (LanguageModel(small("moepp", **{"model.moe.top_k": k}).model).layers[0].ffn for k in ("1", "2"))
    assert k2.active_params() - k1.active_params() == 3 * 32 * 16
    assert k2.active_params() < sum(p.numel() for p in k2.parameters())

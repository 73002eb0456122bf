"""Dr.LLM (architectures.md §21): the spec's minimal faithful tests, the search, the focal loss and the
training-step hook."""

from __future__ import annotations

import pytest
import torch

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.layers.step_hook import training_step_hook
from moekit.layers.variants.drllm import (
    PATH_KEY,
    DrLLMConfig,
    LayerPathRouters,
    focal_loss,
    search_paths,
    window_pool,
)
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.training import with_overrides

from .reference import assert_close

SMALL = {"model.dim": "16", "model.num_heads": "2", "model.context": "8", "model.num_layers": "2",
         "model.dense_hidden_dim": "32"}


def _models():
    cfg = with_overrides(load_preset("drllm"), SMALL)
    torch.manual_seed(0)
    routed = LanguageModel(cfg.model)
    base = LanguageModel(cfg.model.replace(depth_routing={}))
    base.load_state_dict({k: v for k, v in routed.state_dict().items() if not k.startswith("depth_router.")})
    return cfg, routed.eval(), base.eval()


def _forced(path):
    ctx = RoutingContext()
    ctx.state[PATH_KEY] = path
    return ctx


def test_all_execute_is_the_base_model_and_repeat_applies_a_block_twice():
    _, routed, base = _models()
    x = torch.randint(0, 256, (2, 8))
    assert_close(routed(x, _forced(torch.ones(2, 2, dtype=torch.long)))[0], base(x)[0], "all decisions = 1")
    h = base.embed(x)
    cos, sin = base.rope_cos[:8], base.rope_sin[:8]
    b0 = base.layers[0]
    c = RoutingContext()
    twice_then_skip = b0(b0(h, cos, sin, c), cos, sin, c)
    expected = torch.nn.functional.linear(base.norm(twice_then_skip), base.embed.weight)  # tied head
    assert_close(routed(x, _forced(torch.tensor([[2, 0], [2, 0]])))[0], expected, "repeat, then skip")
    mixed = routed(x, _forced(torch.tensor([[1, 1], [0, 0]])))[0]
    assert_close(mixed[0], base(x)[0][0], "decisions are per sequence")
    assert_close(mixed[1], torch.nn.functional.linear(base.norm(h[1]), base.embed.weight), "all skipped")


def test_router_windows_and_parameter_count():
    h = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    assert torch.equal(window_pool(h, 8), h), "sequences shorter than 8 tokens: one window per token"
    pooled = window_pool(torch.randn(1, 16, 4), 8)
    assert pooled.shape == (1, 8, 4)
    routers = LayerPathRouters(4096, 32, DrLLMConfig())
    per_layer = 4096 * 128 + 128 + 128 * 3 + 3
    assert sum(p.numel() for p in routers.parameters()) == 32 * per_layer
    # a Llama-3-8B-sized body (~7.5e9 parameters outside the embeddings): routers add ~0.2%, not < 0.1%
    assert 32 * per_layer / 7.5e9 < 0.0025


def test_search_prefers_the_shortest_path_within_tolerance():
    table = {(1, 1): [1.0, 1.0], (0, 1): [0.9, 1.2], (1, 0): [1.0, 0.95], (0, 0): [1.5, 1.5], (2, 1): [0.5, 0.5]}

    def run(path_BL):
        key = tuple(path_BL[0].tolist())
        return torch.tensor(table.get(key, [9.0, 9.0]))

    paths = search_paths(run, 2, 2)
    assert paths.tolist() == [[0, 1], [1, 0]], "fewest applications among paths no worse than all-execute"
    assert search_paths(run, 2, 2, tolerance=1.0).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ConfigError, match="81 layer paths exceed model.depth_routing.max_paths=9"):
        search_paths(run, 2, 4, max_paths=9)


def test_focal_loss_is_balanced_and_reduces_to_ce():
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    assert_close(focal_loss(logits[3:], torch.tensor([0, 1, 2]), 0.0),
                 torch.nn.functional.cross_entropy(logits[3:], torch.tensor([0, 1, 2])), "gamma 0, balanced = CE")
    w = torch.tensor([1 / 4] * 4 + [1.0, 1.0])
    w = w / w.mean()
    logp = logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    assert_close(focal_loss(logits, labels, 2.0), -(w * (1 - logp.exp()) ** 2 * logp).mean(), "class-balanced focal")


@pytest.mark.parametrize("stage", ["joint", "routers"])
def test_training_step_trains_routers_on_searched_paths(stage):
    cfg = with_overrides(load_preset("drllm"), {**SMALL, "model.depth_routing.stage": stage})
    torch.manual_seed(1)
    model = LanguageModel(cfg.model).train()
    step = training_step_hook(model)
    assert step.func is LayerPathRouters.training_step
    x, y = torch.randint(0, 256, (3, 8)), torch.randint(0, 256, (3, 8))
    out = step(lambda ctx: model(x, ctx), y, True)
    assert out.ctx.losses["drllm_router_loss"] > 0
    assert 0 <= out.ctx.stats["drllm"].summary()["searched_layers_executed"] <= 4
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    assert model.depth_router.routers[0].up.weight.grad.abs().sum() > 0
    base_grad = model.layers[0].attn.w_qkv.weight.grad
    if stage == "joint":
        assert base_grad is not None and base_grad.abs().sum() > 0
    else:
        assert base_grad is None, "the base model stays frozen"


def test_eval_decides_by_router_argmax_and_reports_layers_executed():
    _, routed, _ = _models()
    with torch.no_grad():
        for r in routed.depth_router.routers:
            r.down.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))  # every router says skip
    ctx = RoutingContext(collect_stats=True)
    x = torch.randint(0, 256, (2, 8))
    logits, _ = routed(x, ctx)
    assert ctx.stats["drllm"].summary()["layers_executed"] == 0.0
    assert_close(logits, torch.nn.functional.linear(routed.norm(routed.embed(x)), routed.embed.weight), "skip all")


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match="model.depth_routing.stage='frozen' is not one of"):
        with_overrides(load_preset("drllm"), {"model.depth_routing.stage": "frozen"})
    with pytest.raises(ConfigError, match="unknown config key 'model.depth_routing.capacity'"):
        with_overrides(load_preset("drllm"), {"model.depth_routing.capacity": "0.5"})

"""Mixture-of-Supernets (compression-adaptation-serving.md §31): the spec's minimal faithful tests, the
sandwich-rule training step, bad input and the preset."""

from __future__ import annotations

import pytest
import torch

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.experts import FeedForward
from moekit.layers import build_ffn
from moekit.layers.step_hook import training_step_hook
from moekit.layers.variants.supernet import ARCH_KEY, SupernetConfig, SupernetFFN

from .reference import assert_close
from .variants_util import tiny_moe


def _arch(*widths):
    ctx = RoutingContext()
    ctx.state[ARCH_KEY] = tuple(widths)
    return ctx


@pytest.mark.parametrize("granularity", ["layer", "neuron"])
def test_one_weight_set_is_the_plain_weight_sharing_slice(granularity):
    torch.manual_seed(0)
    layer = SupernetFFN(tiny_moe(hidden_dim=12), SupernetConfig(num_weight_experts=1, granularity=granularity),
                        layer_index=1, num_layers=2)
    x = torch.randn(2, 5, 8)
    sub = FeedForward(8, 6)
    with torch.no_grad():
        sub.w_gate.copy_(layer.w_gate_MFD[0, :6]), sub.w_up.copy_(layer.w_up_MFD[0, :6])
        sub.w_down.copy_(layer.w_down_MDF[0, :, :6])
    assert_close(layer(x, _arch(1.0, 0.5)), sub(x), "m = 1: the first 6 of 12 hidden units")


def test_same_architecture_same_weights_and_equal_width_different_encoding_differs():
    torch.manual_seed(1)
    layer = SupernetFFN(tiny_moe(hidden_dim=12), SupernetConfig(num_weight_experts=3), layer_index=0,
                        num_layers=3)
    a = layer.weights((0.5, 1.0, 0.25))
    b = layer.weights((0.5, 1.0, 0.25))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = layer.weights((0.5, 0.25, 0.25))  # this layer's width is the same, the architecture is not
    assert a[1].shape == c[1].shape == (6, 8) and not torch.allclose(a[1], c[1])
    alpha = layer.mixture((0.5, 1.0, 0.25))
    assert alpha.shape == (3, 1) and torch.allclose(alpha.sum(0), torch.ones(1))
    neuron = SupernetFFN(tiny_moe(hidden_dim=12), SupernetConfig(num_weight_experts=3, granularity="neuron"),
                         num_layers=3)
    assert neuron.mixture((1.0, 1.0, 1.0)).shape == (3, 12)


def test_sandwich_step_trains_three_sub_architectures_and_the_router():
    torch.manual_seed(2)
    layer = build_ffn("supernet", tiny_moe(hidden_dim=12, num_experts=1, top_k=1), {}, layer_index=0,
                      num_layers=1, name="l")
    head = torch.nn.Linear(8, 11)
    model = torch.nn.ModuleDict({"ffn": layer, "head": head})
    widths_seen = []

    def forward(ctx):
        widths_seen.append(ctx.state[ARCH_KEY])
        x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
        return head(layer(x, ctx)), ctx

    step = training_step_hook(model)
    assert step.func is SupernetFFN.training_step
    out = step(forward, torch.randint(0, 11, (2, 4)), True)
    assert widths_seen[0] == (1.0,) and widths_seen[1] == (0.25,) and len(widths_seen) == 3
    out.loss.backward()
    assert layer.router[0].weight.grad.abs().sum() > 0
    assert out.ctx.stats["l"].extra["width"] == 12.0


def test_bad_input():
    with pytest.raises(ConfigError, match=r"variant.widths=\(0.5, 1.5\) must be fractions"):
        SupernetConfig(widths=(0.5, 1.5))
    with pytest.raises(ConfigError, match="moe.activation='swiglu'"):
        build_ffn("supernet", tiny_moe(activation="gelu"), {})
    layer = SupernetFFN(tiny_moe(), num_layers=2)
    with pytest.raises(ConfigError, match="one width per layer: got 3 values for 2 layers"):
        layer(torch.randn(1, 2, 8), _arch(1.0, 1.0, 1.0))


def test_supernet_preset_trains(tmp_path):
    from moekit.recipes import load_preset
    from moekit.training import train, with_overrides

    cfg = with_overrides(load_preset("supernet"), {
        "model.dim": "16", "model.num_heads": "2", "model.context": "8", "model.num_layers": "2",
        "model.moe.hidden_dim": "16", "train.max_steps": "2", "train.batch_size": "2", "train.eval_every": "2",
        "train.eval_batches": "1", "data.max_files": "3", "train.max_seconds": "600"})
    row = train(cfg, tmp_path / "run", progress=False).summary["layers"]["layers.1.ffn"]
    assert row["width"] == 16.0, "evaluation runs the largest sub-architecture"

"""Every shipped preset that names a feed-forward variant builds that variant (at a tiny width) and runs it."""

import tomllib
from importlib import resources

import pytest
import torch

from moekit import MoEConfig, RoutingContext
from moekit.configs import from_dict
from moekit.layers import build_ffn
from moekit.layers.variants.readme import ReadMEConfig, ReadMEPlanner

RECIPES = sorted(p.name for p in resources.files("moekit.recipes").iterdir() if p.name.endswith(".toml"))
FFN_RECIPES = [n for n in RECIPES if "ffn" in tomllib.loads(resources.files("moekit.recipes").joinpath(n)
                                                            .read_text())["model"]]


@pytest.mark.parametrize("recipe", FFN_RECIPES)
def test_preset_builds_and_runs_its_variant(recipe):
    model = tomllib.loads(resources.files("moekit.recipes").joinpath(recipe).read_text())["model"]
    cfg = from_dict(MoEConfig, {"dim": 16, "hidden_dim": 32, **model.get("moe", {})}, prefix="moe")
    torch.manual_seed(0)
    layer = build_ffn(model["ffn"], cfg, model.get("variant", {}), layer_index=1, num_layers=2, name="layers.1.ffn")
    ctx = RoutingContext(collect_stats=True)
    x = torch.randn(2, 4, 16)
    if model["ffn"] == "readme":  # the model's hook: plan before the blocks
        planner = ReadMEPlanner(cfg, from_dict(ReadMEConfig, model["variant"], prefix="variant"), num_layers=2)
        planner(torch.randn(2, 4, 16), ctx)
    y = layer(x, ctx)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert "layers.1.ffn" in ctx.stats or any(k.startswith("layers.1.ffn") for k in ctx.stats)

"""The secret-MoE harness (architectures.md §18): its minimal faithful tests and a small end-to-end study."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis.secret_moe import (
    LowRankRouter,
    SecretMoE,
    collect_pairs,
    gaussian_control,
    relative_error,
    secret_moe_study,
)
from moekit.configs import ConfigError
from moekit.experts import FeedForward
from moekit.models import LanguageModel, ModelConfig

from .reference import assert_close


def test_slices_with_k_equal_n_reproduce_the_mlp_exactly():
    torch.manual_seed(0)
    teacher = FeedForward(8, 12)
    student = SecretMoE.from_slices(teacher, 4)  # N * width = 4 * 3 = 12 >= 12, k = N
    x = torch.randn(50, 8)
    assert_close(student(x), teacher(x), "equitant slices")
    with torch.no_grad():
        y = teacher(x)
    assert relative_error(student(x), y) < 1e-10
    student.router.full.weight.data.normal_()  # a non-uniform router weighs the slices unequally
    assert relative_error(student(x), y) > 1e-6, "the exact reproduction needs the uniform (zero) router"


def test_low_rank_router_with_rank_d_equals_the_full_router():
    torch.manual_seed(1)
    full = LowRankRouter(6, 4)
    low = LowRankRouter(6, 4, rank=6)
    with torch.no_grad():
        low.a.weight.copy_(full.full.weight)
        low.b.weight.copy_(torch.eye(6))
    x = torch.randn(9, 6)
    assert_close(low(x), full(x), "A B = W")
    with pytest.raises(ConfigError, match="rank=7 must be in 1..dim=6"):
        LowRankRouter(6, 4, rank=7)


def test_collect_pairs_reads_the_layers_inputs_and_outputs_and_the_control_matches_moments():
    torch.manual_seed(2)
    model = LanguageModel(ModelConfig(dim=16, num_layers=2, num_heads=2, context=8, dense_hidden_dim=32))
    tokens = torch.randint(0, 256, (4, 8))
    x, y = collect_pairs(model, tokens, 1)
    assert x.shape == (32, 16) and torch.allclose(model.layers[1].ffn(x), y, atol=1e-6)
    xg, yg = gaussian_control(model.layers[1].ffn, x, torch.Generator().manual_seed(0))
    big = torch.cat([gaussian_control(model.layers[1].ffn, x, torch.Generator().manual_seed(s))[0]
                     for s in range(40)])
    assert_close(big.mean(0), x.mean(0), "matched mean", atol=0.05, rtol=0.1)
    assert torch.allclose(yg, model.layers[1].ffn(xg), atol=1e-6)


def test_study_reports_four_errors_and_students_learn():
    torch.manual_seed(3)
    teacher = FeedForward(8, 32)
    x = torch.randn(200, 8)
    with torch.no_grad():
        y = teacher(x)
    result = secret_moe_study(teacher, x, y, num_experts=4, top_k=1, expert_width=8, steps=60, lr=1e-2)
    values = [result.moe_real, result.dense_real, result.moe_gaussian, result.dense_gaussian]
    assert all(0 <= v < 1.0 for v in values), values  # better than predicting 0

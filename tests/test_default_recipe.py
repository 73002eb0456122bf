"""The `default` preset's recipe (issue 20): fine-grained + shared experts at the dense preset's active size.

The `coarse` preset keeps the former default (8 x 512, top-2) as the base of the variant presets and of the
studies that compare against coarse top-2; the `default-recipe` study's arms are exactly these presets.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources

import pytest

from moekit.compare import plan_study
from moekit.compare.plan import FLOPS_TOLERANCE, arm_config
from moekit.compare.study import load_study
from moekit.models import count
from moekit.recipes import list_presets, load_preset, read_toml


def _ffn_width(moe) -> int:
    """Hidden units each token passes through in one MoE layer: routed top_k plus the shared experts."""
    return (moe.top_k + moe.num_shared_experts) * moe.hidden_dim


def test_default_is_fine_grained_with_a_shared_expert_at_the_dense_active_size():
    default, dense, coarse = load_preset("default"), load_preset("dense"), load_preset("coarse")
    moe = default.model.moe
    assert (moe.num_experts, moe.top_k, moe.hidden_dim, moe.num_shared_experts) == (32, 7, 128, 1)
    assert moe.router.aux_loss_coef == 0.01
    # the same active FFN width per token as the dense preset and as the coarse experts it replaced
    assert _ffn_width(moe) == dense.model.dense_hidden_dim == _ffn_width(coarse.model.moe) == 1024
    d, c = count(default.model), count(dense.model)
    assert abs(d.active_params - c.active_params) / c.active_params < 0.01
    assert abs(d.flops_per_token - c.flops_per_token) / c.flops_per_token < 0.01
    # everything but the experts is the former default's: same model trunk, data and step budget
    assert replace(default.model, moe=coarse.model.moe) == coarse.model
    assert default.data == coarse.data
    assert replace(default.train, expected_tokens_per_s=None) == replace(coarse.train, expected_tokens_per_s=None)


def test_coarse_is_the_former_default_and_the_variants_base():
    moe = load_preset("coarse").model.moe
    assert (moe.num_experts, moe.top_k, moe.hidden_dim, moe.num_shared_experts) == (8, 2, 512, 0)
    files = resources.files("moekit.recipes")
    bases = {name: read_toml(name, files.joinpath(f"{name}.toml").read_text()).get("base")
             for name, _ in list_presets()}
    based = {name: base for name, base in bases.items() if base is not None}
    assert len(based) >= 20
    # no variant preset inherits the default's experts: a change of the default changes no variant
    assert set(based.values()) <= {"coarse", "dense"}, based
    pr_moe = load_preset("pr-moe").model.moe  # sets top_k and num_experts, inherits the rest from coarse
    assert (pr_moe.hidden_dim, pr_moe.num_shared_experts) == (512, 0)


@pytest.mark.parametrize("name", ["moe-vs-dense", "balancing", "granularity", "recipes", "topp", "moepp", "coe"])
def test_studies_that_compare_coarse_experts_do_not_follow_the_default(name):
    study = load_study(name)
    assert study.base == "coarse"
    for arm in study.arms:
        assert arm.preset != "default", (name, arm.name)


def test_default_recipe_study_arms_are_the_presets_at_equal_flops():
    study = load_study("default-recipe")
    assert study.base == "coarse" and study.reference == "dense" and len(study.seeds) >= 3
    arms = {arm.name: arm_config(study, arm) for arm in study.arms}
    assert arms["dense"].model == load_preset("dense").model
    assert arms["default"].model == load_preset("coarse").model  # the default as it was before this study
    assert arms["fine-shared"].model == load_preset("default").model
    mid = arms["mid-shared"].model.moe  # the medium grain: the same active FFN width as dense (4 x 256 = 1,024)
    assert (mid.top_k + mid.num_shared_experts) * mid.hidden_dim == load_preset("dense").model.dense_hidden_dim
    specs = plan_study(study)
    # the budget is the former default's own 256 steps, matched within 1% by every arm
    assert [s.config.train.max_steps for s in specs if s.arm == "default"] == [256] * len(study.seeds)
    budget = study.budget.amount
    assert all(abs(s.planned_flops - budget) <= FLOPS_TOLERANCE * budget for s in specs)
    quick = plan_study(load_study("default-recipe", quick=True))
    assert {s.arm for s in quick} == {"dense", "default", "fine-shared", "mid-shared"}


def test_default_recipe_time_study_trains_the_same_models_for_equal_cpu_seconds():
    timed, flops = load_study("default-recipe-time"), load_study("default-recipe")
    assert timed.budget.kind == "time" and timed.budget.clock == "cpu" and timed.budget.amount > 0
    assert [a.name for a in timed.arms] == [a.name for a in flops.arms]
    for a, b in zip(timed.arms, flops.arms):
        assert arm_config(timed, a).model == arm_config(flops, b).model, a.name
    for spec in plan_study(timed):
        tc = spec.config.train
        assert tc.time_clock == "cpu" and tc.max_seconds == timed.budget.amount, spec.arm

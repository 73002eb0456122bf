"""Bad configurations raise ValueError naming the field, the value and the fix; overrides are typed."""

from __future__ import annotations

import pytest

from moekit import MoE, MoEConfig, RouterConfig
from moekit.configs import ConfigError, apply_overrides, from_dict, to_dict


@pytest.mark.parametrize("kwargs,words", [
    (dict(top_k=9), ["top_k=9", "num_experts=8", "lower top_k"]),
    (dict(router=RouterConfig(num_groups=3)), ["num_groups=3", "does not divide", "num_experts=8"]),
    (dict(engine="fast"), ["engine", "'fast'", "sorted"]),
    (dict(activation="swish"), ["activation", "'swish'", "swiglu"]),
    (dict(top_k=0), ["top_k=0", "positive"]),
    (dict(num_shared_experts=-1), ["num_shared_experts=-1"]),
    (dict(top_k=8, router=RouterConfig(num_groups=4, topk_groups=1)), ["top_k=8", "topk_groups"]),
])
def test_bad_moe_config(kwargs, words):
    base = dict(dim=8, hidden_dim=8, num_experts=8, top_k=2)
    with pytest.raises(ValueError) as err:
        MoEConfig(**{**base, **kwargs})
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("kwargs,word", [
    (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(score_func="relu"), "score_func"),
    (dict(topk_groups=3, num_groups=2), "topk_groups=3"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
])
def test_bad_router_config(kwargs, word):
    with pytest.raises(ValueError, match=word.replace("(", r"\(").replace(".", r"\.")):
        RouterConfig(**kwargs)


def test_wrong_input_dim_is_a_clear_error():
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1))
    import torch
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        moe(torch.randn(3, 7))


def test_dict_round_trip_and_dotted_overrides():
    cfg = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, router=RouterConfig(capacity_factor=1.25))
    assert from_dict(MoEConfig, to_dict(cfg)) == cfg
    new = apply_overrides(cfg, {"top_k": "3", "router.capacity_factor": "none", "router.norm_topk_prob": "false"})
    assert new.top_k == 3 and new.router.capacity_factor is None and new.router.norm_topk_prob is False
    with pytest.raises(ConfigError, match="did you mean 'top_k'"):
        apply_overrides(cfg, {"topk": "3"})
    with pytest.raises(ConfigError, match="did you mean 'router.z_loss_coef'"):
        apply_overrides(cfg, {"router.zloss_coef": "1"})
    with pytest.raises(ConfigError, match="not an integer"):
        apply_overrides(cfg, {"top_k": "two"})
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        apply_overrides(cfg, {"router.score_func": "sigmod"})

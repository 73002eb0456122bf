"""RouterConfig rejects bad values with a message naming the field and the fix; valid edge values pass.
(Written from the survivors of a mutation run over ``moekit/routing``: see docs/testing.md.)"""

from __future__ import annotations

import pytest
import torch

from moekit import Router, RouterConfig, RoutingContext
from moekit.configs import ConfigError
from moekit.routing.entmax import entmax15


@pytest.mark.parametrize("field,value", [("score_func", "relu"), ("selector", "top_k"),
                                         ("aux_loss_level", "token"), ("group_score", "sum")])
def test_bad_choice_names_router_field_and_allowed_values(field, value):
    with pytest.raises(ConfigError, match=rf"^router\.{field}={value!r} is not one of \["):
        RouterConfig(**{field: value})


@pytest.mark.parametrize("kwargs,words", [
    (dict(num_groups=0), "router.num_groups=0 must be >= 1"),
    (dict(routed_scaling_factor=0.0), "router.routed_scaling_factor=0.0 must be positive"),
    (dict(jitter_eps=1.0), "router.jitter_eps=1.0 must be < 1"),
    (dict(jitter_eps=1.5), "router.jitter_eps=1.5 must be < 1"),
    (dict(norm_topk_prob="yes"), "router.norm_topk_prob='yes' is a str, not bool | None"),
    (dict(topk_groups=3, num_groups=2), "router.topk_groups=3 must be in [1, num_groups=2]"),
])
def test_bad_values_name_the_field(kwargs, words):
    with pytest.raises(ConfigError) as e:
        RouterConfig(**kwargs)
    assert words in str(e.value)


def test_edge_values_are_accepted():
    for norm in (None, True, False):
        assert RouterConfig(norm_topk_prob=norm).norm_topk_prob is norm
    RouterConfig(jitter_eps=0.99, routed_scaling_factor=1e-3)


def test_validate_for_group_and_expert_choice_rules():
    RouterConfig(num_groups=2, topk_groups=1).validate_for(8, 4)  # exactly the kept experts: allowed
    with pytest.raises(ConfigError, match="top_k=5 exceeds the 1 kept groups x 4 experts each"):
        RouterConfig(num_groups=2, topk_groups=1).validate_for(8, 5)
    with pytest.raises(ConfigError, match="does not divide num_experts=8"):
        RouterConfig(num_groups=3, topk_groups=1).validate_for(8, 2)
    fix = "set bias_update_rate=0, use_selection_bias=False and num_groups=1"
    for bad in (dict(bias_update_rate=0.1), dict(use_selection_bias=True), dict(num_groups=2)):
        with pytest.raises(ConfigError, match=fix):
            RouterConfig(selector="expert_choice", **bad).validate_for(8, 2)
    RouterConfig(selector="expert_choice").validate_for(8, 2)


def test_state_dict_keeps_the_bias_but_not_the_pending_counts():
    router = Router(4, 3, 1)
    assert set(router.state_dict()) == {"weight", "expert_bias"}


def test_router_called_alone_treats_rows_as_one_sequence():
    torch.manual_seed(0)
    seq = Router(4, 3, 1, RouterConfig(aux_loss_level="sequence"))
    batch = Router(4, 3, 1, RouterConfig(aux_loss_level="batch"))
    batch.load_state_dict(seq.state_dict())
    x = torch.randn(7, 4)  # 7 rows: any default other than one sequence would fail or differ
    c1, c2 = RoutingContext(), RoutingContext()
    seq(x, c1)
    batch(x, c2)
    torch.testing.assert_close(c1.losses["aux_loss"], c2.losses["aux_loss"])


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_entmax_along_any_dim_of_a_3d_tensor(dim):
    torch.manual_seed(0)
    z = torch.randn(3, 4, 5)
    expected = entmax15(z.movedim(dim, -1)).movedim(-1, dim)
    torch.testing.assert_close(entmax15(z, dim=dim), expected)
    torch.testing.assert_close(entmax15(z, dim=dim).sum(dim), torch.ones(z.sum(dim).shape))

"""The ``drop_rate`` statistic counts only slots a capacity limit emptied (``Routing.num_dropped``), not the empty
slots that routers leave by design: expert choice, top-p, ReLU-activated experts (BlockFFN), ProMoE's
unconditional expert and MoMa's causal evaluation routing."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig, RouterConfig, Routing, RoutingContext
from moekit.layers import build_ffn
from moekit.layers.moe import routing_stats
from moekit.layers.variants import MoMa, MoMaConfig
from moekit.layers.variants.promoe import UNCONDITIONAL_KEY, ProMoE, ProMoEConfig
from moekit.training.evaluate import _combined
from moekit.types import MODALITY_KEY

from .variants_util import tiny_moe


def _summary(layer, x, ctx, name):
    layer(x, ctx)
    return ctx.stats_summary()[name]


def _routing(ids: torch.Tensor, num_dropped: int | None = None) -> Routing:
    """A routing over two experts with the given slots (-1: empty) and, optionally, its own drop count."""
    T = ids.shape[0]
    return Routing(expert_ids_TK=ids, weights_TK=(ids >= 0).float(), scores_TE=torch.full((T, 2), 0.5),
                   logits_TE=torch.zeros(T, 2), num_dropped=None if num_dropped is None else torch.tensor(num_dropped))


def test_routing_without_a_count_counts_every_empty_slot_and_a_count_overrides_it():
    ids = torch.tensor([[0, -1], [1, -1], [-1, -1]])
    assert routing_stats(_routing(ids)).summary()["drop_rate"] == 4 / 6
    assert routing_stats(_routing(ids, num_dropped=1)).summary()["drop_rate"] == 1 / 6
    # one token, one slot, dropped: the rate is 1, not halved
    assert routing_stats(_routing(torch.tensor([[-1]]))).summary()["drop_rate"] == 1.0


def test_evaluation_sums_drops_over_batches():
    parts = [routing_stats(_routing(torch.tensor([[0, -1], [1, 0]]), num_dropped=n)) for n in (0, 1, 3)]
    assert _combined(parts).summary()["drop_rate"] == 4 / 12


def test_capacity_drops_are_counted_and_expert_choice_has_none():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    topk = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, router=RouterConfig(capacity_factor=0.5)),
               name="l0")
    ctx = RoutingContext(collect_stats=True)
    routing = topk.router(x)
    empty = (routing.expert_ids_TK < 0).sum().item()
    assert empty > 0
    assert _summary(topk, x, ctx, "l0")["drop_rate"] == empty / 64
    choice = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2,
                           router=RouterConfig(selector="expert_choice", capacity_factor=1.0)), name="l1")
    routing = choice.router(x)
    assert (routing.expert_ids_TK < 0).sum() == 32 * 4 - 16 * 4  # each expert takes 16 of 32 tokens
    assert _summary(choice, x, RoutingContext(collect_stats=True), "l1")["drop_rate"] == 0.0


def test_variants_whose_empty_slots_are_by_design_report_no_drops():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    blockffn = build_ffn("blockffn", tiny_moe(num_experts=6), {"chunk_len": 2}, name="b")
    s = _summary(blockffn, x, RoutingContext(collect_stats=True), "b")
    assert s["drop_rate"] == 0.0 and s["tokens"] < 12 * 6  # some experts were inactive: empty slots, no drops

    promoe = ProMoE(tiny_moe(num_shared_experts=1), ProMoEConfig(), name="p")
    ctx = RoutingContext(collect_stats=True)
    ctx.state[UNCONDITIONAL_KEY] = torch.tensor([[True] * 3 + [False] * 3] * 2)
    s = _summary(promoe, x, ctx, "p")
    assert s["drop_rate"] == 0.0 and s["tokens"] == 6 * 1 + 6 * 2  # unconditional tokens fill one slot of two

    moma = MoMa(MoEConfig(dim=8, hidden_dim=12, num_experts=4, top_k=1, router=RouterConfig(aux_loss_coef=0.0)),
                MoMaConfig(num_modalities=1)).eval()  # evaluation: the causal auxiliary routers choose experts
    ctx = RoutingContext(collect_stats=True)
    ctx.state[MODALITY_KEY] = torch.zeros(2, 6, dtype=torch.long)
    moma(x, ctx)
    (row,) = [v for k, v in ctx.stats_summary().items() if k.startswith("moma")]
    assert row["drop_rate"] == 0.0 and row["tokens"] < 12 * 4


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_topk_router_reports_its_own_capacity_drops(capacity_factor):
    torch.manual_seed(1)
    x = torch.randn(16, 8)
    moe = MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2,
                        router=RouterConfig(capacity_factor=capacity_factor)), name="l0")
    routing = moe.router(x)
    assert routing.num_dropped is None  # every empty slot of a top-k router is a capacity drop
    s = _summary(moe, x, RoutingContext(collect_stats=True), "l0")
    assert s["drop_rate"] == (routing.expert_ids_TK < 0).float().mean().item()
    assert (s["drop_rate"] > 0) == (capacity_factor is not None)

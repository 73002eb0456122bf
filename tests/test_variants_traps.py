"""Variant behaviours that earlier tests only partly checked (issue 11); each test fails when the behaviour breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit import FeedForward, RoutingContext
from moekit.layers.variants.blockffn import BlockFFN, BlockFFNConfig
from moekit.layers.variants.gmoe import GMoEConfig, GraphOfTokensMoE
from moekit.layers.variants.mod import POSITIONS_KEY, MixtureOfDepths, MoDConfig
from moekit.layers.variants.mor import MixtureOfRecursions, MoRConfig
from moekit.layers.variants.pr_moe import ResidualMoE, ResidualMoEConfig
from moekit.routing.blockffn import locality_loss

from .reference import dense_ffn
from .variants_util import tiny_moe


def test_residual_moe_paper_form_with_one_expert_is_mlp_plus_that_expert():
    torch.manual_seed(0)
    layer = ResidualMoE(tiny_moe(num_experts=1, top_k=1, engine="reference"), ResidualMoEConfig(residual="paper"))
    x = torch.randn(2, 3, 8)
    b = layer.moe.experts
    expert = dense_ffn(x, b.w_gate[0], b.w_up[0], b.w_down[0])
    torch.testing.assert_close(layer(x), layer.dense(x) + expert)  # one expert: softmax weight exactly 1
    assert torch.equal(layer.moe.route(x.reshape(-1, 8)).weights_TK, torch.ones(6, 1))


def _locality_reference(logits_BSE: torch.Tensor, s: float) -> torch.Tensor:
    terms = [F.binary_cross_entropy_with_logits(s * logits_BSE[b, t - 1], torch.sigmoid(s * logits_BSE[b, t]),
                                                reduction="none")
             for b in range(logits_BSE.shape[0]) for t in range(1, logits_BSE.shape[1])]
    return torch.stack(terms).mean()


def test_blockffn_locality_loss_never_pairs_tokens_across_sequences():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5) * 0.05
    torch.testing.assert_close(locality_loss(logits, 100.0), _locality_reference(logits, 100.0))
    # a change at the first token of sequence 1 only touches the pair (1:0, 1:1), never (0:3, 1:0)
    changed = logits.clone()
    changed[1, 0] += 1.0
    torch.testing.assert_close(locality_loss(changed, 100.0), _locality_reference(changed, 100.0))
    assert locality_loss(logits[:, :1], 100.0) == 0  # one token per sequence: no pair at all
    # through the layer: the loss is computed per sequence of the [B, S, D] input
    layer = BlockFFN(tiny_moe(num_experts=6, activation="gelu"), BlockFFNConfig(locality_coef=0.3, chunk_coef=0.0))
    x = torch.randn(3, 4, 8)
    ctx = RoutingContext()
    layer(x, ctx)
    expected = 0.3 * _locality_reference(layer.moe.router.logits(x.reshape(-1, 8)).view(3, 4, 6), 100.0)
    torch.testing.assert_close(ctx.losses["blockffn_locality_loss"], expected)


def _scheduled(ratio: float, chunk_coef: float = 0.1, max_scale: float = 4.0) -> float:
    """The ramp target after one interval of losses ``1`` followed by one of ``ratio``."""
    layer = BlockFFN(tiny_moe(num_experts=6), BlockFFNConfig(chunk_coef=chunk_coef, hold_steps=0, interval=2,
                                                             max_scale=max_scale))
    layer._history = [torch.tensor(1.0)] * 2 + [torch.tensor(ratio)] * 2
    layer.on_step(2)
    return layer._ramp[2]


def test_blockffn_chunk_coefficient_floor_and_cap():
    assert _scheduled(1.01) == pytest.approx(0.1 * 1.025)  # a small rise still raises by the 1.025 floor
    assert _scheduled(1.5) == pytest.approx(0.15)
    assert _scheduled(0.5) == pytest.approx(0.05)  # a fall lowers it, without the floor
    assert _scheduled(1.0) == pytest.approx(0.1)  # flat: unchanged (the floor applies to rises only)
    assert _scheduled(10.0) == pytest.approx(0.4)  # capped at max_scale x the initial value
    assert _scheduled(10.0, max_scale=2.0) == pytest.approx(0.2)


@pytest.mark.parametrize("temperature", [1.0, 10.0, 1e3, 1e6])  # a leak is invisible when tau -> 0
def test_gmoe_causal_routing_never_sees_the_future_at_any_temperature(temperature):
    torch.manual_seed(0)
    causal = GraphOfTokensMoE(tiny_moe(), GMoEConfig(temperature=temperature, causal=True))
    leaky = GraphOfTokensMoE(tiny_moe(), GMoEConfig(temperature=temperature, causal=False))
    leaky.load_state_dict(causal.state_dict())
    x = torch.randn(2, 6, 8)
    for t in range(5):  # perturb token t+1 only: tokens 0..t must not move, in routing or output
        x2 = x.clone()
        x2[:, t + 1] = torch.randn(2, 8) * 3
        a, b = causal.route(x)[0], causal.route(x2)[0]
        torch.testing.assert_close(b.scores_TE.view(2, 6, -1)[:, : t + 1], a.scores_TE.view(2, 6, -1)[:, : t + 1],
                                   rtol=0, atol=0)
        # (the outputs to float32 rounding: a BLAS may round a row differently when other rows of the product
        # change, as MKL does on some CPUs; a leak moves them by far more, see the scores check above and below)
        torch.testing.assert_close(causal(x2)[:, : t + 1], causal(x)[:, : t + 1], rtol=0, atol=1e-6)
        # at this temperature a leak would be visible: the non-causal graph moves the earlier tokens
        la, lb = leaky.route(x)[0], leaky.route(x2)[0]
        assert (lb.scores_TE.view(2, 6, -1)[:, t] - la.scores_TE.view(2, 6, -1)[:, t]).abs().max() > 1e-7
        assert (leaky(x2)[:, : t + 1] - leaky(x)[:, : t + 1]).abs().max() > 1e-5  # well above the 1e-6 above


@pytest.mark.parametrize("seed", range(12))
def test_mor_token_sets_are_nested_over_recursions(seed):
    torch.manual_seed(seed)
    ffn = FeedForward(8, 16)
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=4, capacities=(0.9, 0.7, 0.45, 0.2)))
    for r in mor.routers:  # different routers per recursion: nesting must come from the candidates, not luck
        torch.nn.init.normal_(r.weight, std=2.0)
    x = torch.randn(3, 11, 8)
    sets = []

    def block(h, ctx):
        sets.append(ctx.state[POSITIONS_KEY].clone())
        return h + ffn(h)

    mor(x, block, RoutingContext())
    # exact floors: 0.9*11 = 9.9 -> 9, 0.7*11 = 7.7 -> 7, 0.45*11 = 4.95 -> 4, 0.2*11 = 2.2 -> 2
    assert [s.shape[1] for s in sets] == [9, 7, 4, 2]
    for b in range(3):
        for prev, cur in zip(sets, sets[1:]):
            assert set(cur[b].tolist()) < set(prev[b].tolist())


@pytest.mark.parametrize("capacity,S,k", [(0.29, 100, 29), (0.57, 100, 57), (0.125, 7, 1), (0.3, 10, 3),
                                          (0.5, 9, 4)])
def test_mod_processes_the_exact_floor_of_a_fractional_capacity(capacity, S, k):
    torch.manual_seed(0)
    ffn = FeedForward(4, 8)
    mod = MixtureOfDepths(4, MoDConfig(capacity=capacity))
    seen = []
    ctx = RoutingContext()
    mod(torch.randn(1, S, 4), lambda h, c=None: seen.append(h.shape[1]) or ffn(h), ctx)
    assert seen == [k] and ctx.state[POSITIONS_KEY].shape == (1, k)


def test_readme_per_layer_plans_come_from_their_own_block_of_the_planner_head():
    from moekit.layers.variants.readme import ReadMEConfig, ReadMEPlanner

    torch.manual_seed(0)
    moe = tiny_moe(num_experts=4, top_k=1)
    planner = ReadMEPlanner(moe, ReadMEConfig(planner_dim=8, planner_layers=1, planner_heads=2, per_layer=True,
                                              weights="soft"), num_layers=3)
    emb = torch.randn(2, 5, 8)
    plan = planner(emb)
    h = planner.proj_in(emb)
    for block in planner.blocks:
        h = block(h)
    head_TLE = planner.head(planner.norm(h)).reshape(10, 3, 4)  # plan l reads head rows l*E .. (l+1)*E - 1
    for layer in range(3):
        torch.testing.assert_close(plan.logits_LTE[layer], head_TLE[:, layer])
        probs = head_TLE[:, layer].softmax(-1)
        assert torch.equal(plan.expert_ids_LTK[layer, :, 0], probs.argmax(-1))
        torch.testing.assert_close(plan.weights_LTK[layer, :, 0], probs.max(-1).values)  # K = 1: raw probability
    assert not torch.equal(plan.expert_ids_LTK[0], plan.expert_ids_LTK[1])

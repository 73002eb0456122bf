"""Read-ME expert carving (architectures.md §8): the spec's minimal faithful tests and the router targets."""

import pytest
import torch

from moekit.compression import CarvedFFN, ReadMEMasks, carve_masks, carving_targets
from moekit.configs import ConfigError
from moekit.experts import FeedForward
from moekit.layers.variants import planner_distillation_loss

from .reference import assert_close


def _domains():
    torch.manual_seed(0)
    ffn = FeedForward(8, 20)
    base = torch.randn(3, 8) * 3  # three domains around different centres
    return ffn, [base[e] + torch.randn(40, 8) for e in range(3)]


def test_masks_exclude_the_shared_intersection_and_two_domains_are_disjoint():
    ffn, domains = _domains()
    masks = carve_masks(ffn, domains, remain_rate=0.5)
    domain_EF = masks.experts_EF | masks.shared_F
    assert (domain_EF.sum(1) == 10).all(), "each domain keeps 50% of 20 neurons"
    assert torch.equal(masks.shared_F, domain_EF.all(0))
    assert not (masks.experts_EF & masks.shared_F).any()
    two = carve_masks(ffn, domains[:2])
    assert not (two.experts_EF[0] & two.experts_EF[1]).any(), "with two domains the expert parts are disjoint"
    # with three or more, two domains may share a neuron the third lacks: the spec's "disjoint" holds for E = 2


def test_forced_expert_uses_shared_or_its_mask_and_all_ones_is_dense():
    ffn, domains = _domains()
    masks = carve_masks(ffn, domains)
    carved = CarvedFFN(ffn, masks)
    x = torch.randn(6, 8)
    e = 2
    keep = masks.active(e)
    pruned = FeedForward(8, int(keep.sum()))
    with torch.no_grad():
        pruned.w_gate.copy_(ffn.w_gate[keep]), pruned.w_up.copy_(ffn.w_up[keep])
        pruned.w_down.copy_(ffn.w_down[:, keep])
    assert_close(carved(x, torch.full((6,), e)), pruned(x), "expert e = the neurons shared | m_e")
    ones = ReadMEMasks(shared_F=torch.ones(20, dtype=torch.bool), experts_EF=torch.zeros(3, 20, dtype=torch.bool))
    assert_close(CarvedFFN(ffn, ones)(x, torch.tensor([0, 1, 2, 0, 1, 2])), ffn(x), "all masks 1: dense")


def test_router_targets_favour_the_tokens_own_domain_and_train_the_planner():
    ffn, domains = _domains()
    masks = carve_masks(ffn, domains)
    targets = carving_targets(ffn, masks, torch.cat(domains))
    assert torch.allclose(targets.sum(1), torch.ones(120))
    labels = torch.arange(3).repeat_interleave(40)
    assert (targets.argmax(1) == labels).float().mean() > 0.5, "a domain's tokens are best covered by its expert"
    logits = torch.zeros(120, 3, requires_grad=True)
    planner_distillation_loss(logits, targets).backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="remain_rate=0"):
        carve_masks(ffn, domains, remain_rate=0.0)

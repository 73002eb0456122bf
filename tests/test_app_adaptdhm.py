"""AdaptDHM (spec §34): one cluster is one tower, coefficients, centroid limit, AUC, a short training run."""

from __future__ import annotations

import pytest
import torch

from moekit.apps.adaptdhm import AdaptDHM, AdaptDHMConfig, auc, build, make_ctr, train_eval


def test_one_cluster_is_a_single_tower_model():
    torch.manual_seed(0)
    m = AdaptDHM(5, 3, 1, 8, routing_iters=2)
    x, d = torch.randn(11, 5), torch.randint(0, 3, (11,))
    single = m.towers[0](m.embedding(x, d)).squeeze(-1)
    assert torch.allclose(m.eval()(x, d), single, atol=1e-6)


@pytest.mark.parametrize("iters", [0, 3])
def test_coefficients_sum_to_one(iters):
    torch.manual_seed(1)
    m = AdaptDHM(4, 2, 5, 6, routing_iters=iters)
    c, _ = m.coefficients(torch.randn(13, 6))
    assert torch.allclose(c.sum(-1), torch.ones(13), atol=1e-6) and (c >= 0).all()


@pytest.mark.parametrize("iters", [0, 2])
def test_sample_at_centroid_k_gets_all_weight_as_temperature_goes_to_zero(iters):
    torch.manual_seed(2)
    m = AdaptDHM(4, 2, 4, 6, routing_iters=iters)
    for k in range(4):
        e = m.centroids_KH[k:k + 1].clone()
        warm, _ = m.coefficients(e, temperature=10.0)
        cold, _ = m.coefficients(e, temperature=1e-3)
        assert cold[0, k] > 0.999 and cold[0, k] >= warm[0, k]


def test_domain_mode_routes_by_domain_id():
    torch.manual_seed(3)
    m = AdaptDHM(4, 3, 2, 6, mode="domains").eval()
    x, d = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    e = m.embedding(x, d)
    want = torch.stack([m.towers[int(d[i])](e[i:i + 1]).squeeze() for i in range(6)])
    assert torch.allclose(m(x, d), want, atol=1e-6)


def test_centroids_follow_assigned_samples_in_training_only():
    torch.manual_seed(4)
    m = AdaptDHM(4, 2, 3, 6, centroid_momentum=0.5)
    x, d = torch.randn(32, 4), torch.randint(0, 2, (32,))
    before = m.centroids_KH.clone()
    m.eval()(x, d)
    assert torch.equal(before, m.centroids_KH)
    m.train()(x, d)
    assert not torch.equal(before, m.centroids_KH)


def test_auc_rank_statistic():
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert auc(torch.zeros(4), y) == 0.5
    assert auc(torch.tensor([0.1, 0.35, 0.3, 0.4]), y) == 0.75
    with pytest.raises(ValueError, match="both"):
        auc(torch.zeros(3), torch.ones(3))


def test_latent_groups_ignore_domain_ids():
    cfg = AdaptDHMConfig(num_features=3)
    x, d, y = make_ctr(cfg, 0, 3000)
    assert x.shape == (3000, 3) and set(d.unique().tolist()) == set(range(cfg.num_domains))
    # the click rate varies little across domains (domains carry no signal)
    rates = torch.stack([y[d == i].mean() for i in range(cfg.num_domains)])
    assert float(rates.max() - rates.min()) < 0.1


def test_adaptdhm_learns_ctr():
    """Behaviour: a short run reaches a high test AUC (a broken routing or tower mix stays far lower)."""
    cfg = AdaptDHMConfig(seeds=1, num_train=6000, num_test=2000, epochs=4)
    torch.manual_seed(0)
    m = train_eval(build("adaptdhm", cfg), cfg, 0)
    assert m["auc"] > 0.88, m

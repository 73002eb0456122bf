"""VDD (spec §38): responsibilities, separable component losses, the score surrogate, the analytic teacher, and
distillation reaching low KL to a GMM teacher of the same size."""

from __future__ import annotations

import pytest
import torch

from moekit.apps.vdd import (
    GMMTeacher,
    MixturePolicy,
    VDDConfig,
    component_loss,
    evaluate,
    gating_loss,
    init_from_teacher,
    responsibilities,
    train,
)
from moekit.configs import ConfigError


def test_responsibilities_sum_to_one():
    torch.manual_seed(0)
    m = MixturePolicy(5, 8)
    s = torch.rand(7) * 2 - 1
    mu, log_std = m.params(s)
    r = responsibilities(mu, log_std, m.log_gating(s), torch.randn(7, 11, 2) * 3).exp()
    assert r.shape == (7, 11, 5)
    assert torch.allclose(r.sum(-1), torch.ones(7, 11), atol=1e-5) and (r >= 0).all()


def test_component_loss_of_z_gives_zero_gradient_to_other_components_and_gating():
    torch.manual_seed(1)
    m, t = MixturePolicy(4, 8), GMMTeacher(3)
    per_z = component_loss(m, t, torch.rand(6) * 2 - 1, 16, 0.05, per_component=True)
    assert per_z.shape == (4,)
    z = 2
    grads = torch.autograd.grad(per_z[z], list(m.components.parameters()))
    for g in grads:
        others = torch.cat([g[:z], g[z + 1:]])
        assert torch.equal(others, torch.zeros_like(others))
        assert g[z].abs().sum() > 0  # the component itself is trained
    assert all(p.grad is None for p in m.gating.parameters())


def test_score_surrogate_gradient_is_the_teacher_score():
    t = GMMTeacher(4, 2.0, 0.3)
    s = torch.tensor([0.3, -0.7])
    a = torch.randn(2, 5, 2, requires_grad=True)
    (t.score(a.detach(), s, 0.1) * a).sum().backward()
    want = torch.autograd.grad(t.log_prob(a, s, 0.1).sum(), a)[0]  # autograd of the density
    assert torch.allclose(a.grad, want, atol=1e-5)


def test_teacher_density_is_normalised_and_sampled():
    t = GMMTeacher(3, 1.5, 0.4)
    s = torch.tensor([0.5])
    g = torch.linspace(-4, 4, 201)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).view(1, -1, 2)
    mass = t.log_prob(grid, s).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1) < 1e-3
    x = t.sample(s, 20000, torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(1), t.means(s).mean(1), atol=0.05)


def test_gating_loss_trains_only_the_gating():
    torch.manual_seed(2)
    m, t = MixturePolicy(3, 8), GMMTeacher(3)
    gating_loss(m, t, torch.rand(5), 32).backward()
    assert all(p.grad is None for p in m.components.parameters())
    assert sum(float(p.grad.abs().sum()) for p in m.gating.parameters()) > 0


def test_vdd_fits_a_same_size_gmm_teacher_with_low_kl():
    """Minimal faithful test + behaviour: Z = K; a broken score, entropy or responsibility term stays far off."""
    cfg = VDDConfig(teacher_modes=3, num_components=3, iterations=250, batch_states=16, samples=32,
                    component_lr=5e-3, gating_lr=2e-3, eval_states=16, eval_samples=128)
    t = GMMTeacher(cfg.teacher_modes, cfg.radius, cfg.mode_std)
    torch.manual_seed(0)
    init_only = MixturePolicy(3, cfg.hidden)
    init_from_teacher(init_only, t, torch.Generator().manual_seed(0))
    before = evaluate(init_only, t, cfg, 0)  # means at the modes of s = 0 only: far off at other states
    m = evaluate(train(cfg, t, 0, "vdd"), t, cfg, 0)
    assert m["reverse_kl"] < 0.1 and m["forward_kl"] < 0.1 and m["mode_coverage"] == 1.0, m
    assert before["reverse_kl"] > 0.5, before


def test_bad_settings():
    with pytest.raises(ConfigError, match="num_components"):
        VDDConfig(num_components=0)
    with pytest.raises(ConfigError, match="score_noise"):
        VDDConfig(score_noise=-1.0)
    with pytest.raises(ValueError, match="method"):
        train(VDDConfig(iterations=1), GMMTeacher(), 0, "adam")


def test_single_component_responsibility_is_one():
    torch.manual_seed(3)
    m = MixturePolicy(1, 4)
    s = torch.zeros(2)
    mu, log_std = m.params(s)
    r = responsibilities(mu, log_std, m.log_gating(s), torch.randn(2, 5, 2))
    assert torch.equal(r, torch.zeros_like(r))  # log q̃ = log 1

"""ERW (no spec; the issue's summary): the embedded early layers reproduce the encoder, the schedule, the
alignment loss's weight and where its gradient goes, the no-encoder identity, convergence read-out, a short run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from moekit.apps.erw import (  # noqa: E402
    Denoiser,
    ERWConfig,
    Encoder,
    align_weight,
    alpha_bar,
    diffusion_loss,
    embed_encoder,
    load_digits_pm1,
    steps_to_reach,
    train_diffusion,
)


def test_embedded_early_layers_equal_the_encoder_at_every_time():
    torch.manual_seed(0)
    enc, model = Encoder(24), Denoiser(24, 8)
    x = torch.randn(5, 64)
    assert not torch.allclose(model.early(x, torch.full((5,), 3)), enc(x))
    embed_encoder(model, enc)
    for t in (1, 50, 200):
        assert torch.allclose(model.early(x, torch.full((5,), t)), enc(x), atol=1e-6)
    # the late layers are untouched and the model still depends on t through them
    assert not torch.allclose(model(x, torch.full((5,), 1)), model(x, torch.full((5,), 150)))


def test_cosine_schedule_decreases_from_one_to_near_zero():
    ab = alpha_bar(torch.arange(0, 201), 200)
    assert float(ab[0]) > 0.999 and float(ab[-1]) < 0.01 and (ab[1:] <= ab[:-1]).all()


def test_diffusion_loss_is_zero_for_the_oracle_and_matches_the_formula():
    class Oracle(Denoiser):
        def forward(self, x, t):  # knows x0 = 0, so x_t = sqrt(1 - ab) eps
            return x / (1 - alpha_bar(t, 100))[:, None].sqrt()
    x0, eps, t = torch.zeros(7, 64), torch.randn(7, 64), torch.randint(1, 101, (7,))
    assert float(diffusion_loss(Oracle(8, 4), x0, t, eps, 100)) < 1e-10
    torch.manual_seed(1)
    m = Denoiser(8, 4)
    x0 = torch.randn(7, 64)
    ab = alpha_bar(t, 100)[:, None]
    want = ((m(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t) - eps) ** 2).mean()
    assert torch.allclose(diffusion_loss(m, x0, t, eps, 100), want)


def test_alignment_weight_and_its_gradient_reaches_only_the_early_layers():
    cfg = ERWConfig(train_steps=1100, warmup_steps=100, align_coef=0.5)
    assert align_weight(cfg, 0) == 0.5 and align_weight(cfg, 250) == pytest.approx(0.25)
    assert align_weight(cfg, 500) == 0.0 and align_weight(cfg, 900) == 0.0
    assert align_weight(ERWConfig(align_coef=0.0), 0) == 0.0
    torch.manual_seed(2)
    enc, m = Encoder(16), Denoiser(16, 4)
    x, t = torch.randn(6, 64), torch.randint(1, 200, (6,))
    align = F.mse_loss(m.early(x, t), enc(x))
    early = torch.autograd.grad(align, m.early_parameters())
    assert all(g.abs().sum() > 0 for g in early)
    late = torch.autograd.grad(align, list(m.late.parameters()) + list(m.time_late.parameters()),
                               allow_unused=True)
    assert all(g is None for g in late)


def test_without_encoder_erw_settings_change_nothing():
    """Identity: from scratch (no encoder), warmup and alignment settings are ignored."""
    data = load_digits_pm1(0)
    a = train_diffusion(ERWConfig(hidden=16, train_steps=20, warmup_steps=5, eval_every=10), 0, data, None)
    b = train_diffusion(ERWConfig(hidden=16, train_steps=20, warmup_steps=0, align_coef=0.0, eval_every=10), 0,
                        data, None)
    assert a == b and [s for s, _ in a] == [0, 10, 20]


def test_steps_to_reach():
    curve = [(0, 1.0), (50, 0.5), (100, 0.3), (150, 0.31)]
    assert steps_to_reach(curve, 0.5) == 50 and steps_to_reach(curve, 0.3) == 100
    assert steps_to_reach(curve, 0.1) is None


def test_diffusion_training_learns_to_denoise_digits():
    """Behaviour: a short run brings the held-out ε-MSE well below the untrained ~1 (a broken loss or schedule
    stays near 1)."""
    data = load_digits_pm1(0)
    curve = train_diffusion(ERWConfig(hidden=64, train_steps=300, eval_every=100, lr=3e-3), 0, data, None)
    assert curve[0][1] > 0.9 and curve[-1][1] < 0.6, curve


def test_bad_config_names_the_field():
    from moekit.configs import ConfigError
    with pytest.raises(ConfigError, match="warmup_steps"):
        ERWConfig(train_steps=10, warmup_steps=10)


def test_part_b_apps_are_listed(capsys):
    from moekit.cli.main import main
    assert main(["app", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("mixer", "cmoe", "netmamba", "erw"):
        assert name in out

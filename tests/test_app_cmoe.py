"""CMoE (spec §32): E = 1 is a linear head, the residual head adds exactly, the balance loss is minimal at uniform
routing (coefficient applied, gradient reaches the router), the synthetic audio, and a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from moekit.apps.cmoe import (  # noqa: E402
    CMoE,
    CMoEConfig,
    MoEHead,
    cv_squared,
    make_audio,
    spectrograms,
    train_eval,
)


def test_one_expert_is_a_linear_head():
    torch.manual_seed(0)
    head = MoEHead(10, 5, 1, residual=False)
    h = torch.randn(7, 10)
    assert torch.allclose(head(h), head.heads[0](h), atol=1e-6)
    assert head.router is None and torch.equal(head.last_gates_BE, torch.ones(7, 1))


@pytest.mark.parametrize("experts", [1, 3])
def test_residual_head_adds_its_output_exactly(experts):
    torch.manual_seed(1)
    with_res = MoEHead(8, 4, experts, residual=True)
    without = MoEHead(8, 4, experts, residual=False)
    without.load_state_dict({k: v for k, v in with_res.state_dict().items() if not k.startswith("residual")})
    h = torch.randn(5, 8)
    assert torch.allclose(with_res(h), without(h) + with_res.residual(h), atol=1e-6)


def test_mixture_matches_a_per_sample_reference_outputs_and_grads():
    torch.manual_seed(2)
    head = MoEHead(6, 3, 4, residual=True)
    h = torch.randn(5, 6, requires_grad=True)
    got = head(h)
    rows = []
    for b in range(5):
        g = torch.softmax(head.router.weight @ h[b] + head.router.bias, -1)
        rows.append(sum(g[i] * (head.heads[i].weight @ h[b] + head.heads[i].bias) for i in range(4))
                    + head.residual.weight @ h[b] + head.residual.bias)
    want = torch.stack(rows)
    assert torch.allclose(got, want, atol=1e-6)
    ga = torch.autograd.grad(got.sin().sum(), [h, head.router.weight])
    gb = torch.autograd.grad(want.sin().sum(), [h, head.router.weight])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ga, gb, strict=True))


def test_balance_loss_is_minimal_at_uniform_routing():
    assert float(cv_squared(torch.full((4,), 2.5))) == pytest.approx(0.0, abs=1e-9)
    torch.manual_seed(3)
    for _ in range(20):
        imp = torch.rand(4) + 0.01
        assert float(cv_squared(imp)) > 0
    assert float(cv_squared(torch.tensor([4.0, 0, 0, 0]))) == pytest.approx(3.0)  # all on one: E − 1
    assert float(cv_squared(torch.tensor([3.0]))) == 0.0


def test_balance_coefficient_applied_and_gradient_reaches_router():
    torch.manual_seed(4)
    head = MoEHead(6, 3, 4, residual=False)
    h, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    ce = torch.nn.functional.cross_entropy(head(h), y)
    bal = head.balance_loss()
    g_ce = torch.autograd.grad(ce, head.router.weight, retain_graph=True)[0]
    g_bal = torch.autograd.grad(bal, head.router.weight, retain_graph=True)[0]
    g_tot = torch.autograd.grad(ce + 0.7 * bal, head.router.weight)[0]
    assert g_bal.abs().sum() > 0
    assert torch.allclose(g_tot, g_ce + 0.7 * g_bal, atol=1e-6)
    with pytest.raises(RuntimeError, match="forward"):
        MoEHead(6, 3, 2, False).balance_loss()


def test_cmoe_backbone_on_odd_shapes_and_one_clip():
    torch.manual_seed(5)
    m = CMoE(3, channels=4, num_experts=2).eval()
    for shape in ((1, 1, 33, 61), (3, 1, 17, 9)):
        x = torch.randn(*shape)
        out = m(x)
        assert out.shape == (shape[0], 3) and torch.isfinite(out).all()
        assert torch.allclose(m.head(m.backbone(x)), out)


def test_synthetic_audio_classes_are_balanced_and_spectra_differ():
    cfg = CMoEConfig(num_classes=6, snr_low=30.0, snr_high=30.0)
    w, y, s = make_audio(cfg, 0, 60)
    assert w.shape == (60, 2000) and np.bincount(y).tolist() == [10] * 6 and set(s.tolist()) <= {0, 1, 2}
    spec = spectrograms(w)
    assert spec.shape == (60, 1, 33, 61) and torch.isfinite(spec).all()
    # an up-chirp's peak frequency rises over time, a down-chirp's falls
    for cls, sign in ((1, 1), (2, -1)):
        i = int(np.flatnonzero(y == cls)[0])
        peak = spec[i, 0].argmax(0).float()
        assert sign * float(peak[-10:].mean() - peak[:10].mean()) > 3
    # band noise of sub-type 0 keeps its energy in the low band
    i = int(np.flatnonzero((y == 4) & (s == 0))[0]) if ((y == 4) & (s == 0)).any() else None
    if i is not None:
        e = spec[i, 0].mean(1)
        assert float(e[:10].mean()) > float(e[20:].mean())


def test_cmoe_learns_acoustic_classes():
    """Behaviour: a short run classifies 4 classes well above chance (0.25); a broken head stays near chance."""
    cfg = CMoEConfig(num_classes=4, num_train=240, num_test=120, channels=6, epochs=6, batch_size=32, lr=1e-2,
                     seeds=1)
    m = train_eval(cfg, "cmoe", 0)
    assert m["accuracy"] > 0.6, m
    assert abs(sum(m["expert_importance"]) - 1) < 1e-3


def test_listed_and_bad_value_is_one_line(capsys, tmp_path):
    from moekit.cli.main import main
    assert main(["app", "--list"]) == 0
    assert "cmoe" in capsys.readouterr().out
    assert main(["app", "cmoe", "--out", str(tmp_path / "r"), "--num_classes=9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_classes=9" in err[0] and not (tmp_path / "r").exists()

"""MixER (no spec; the issue's summary): top-1 selection, K = 1, the K-means + least-squares gate, the balance
loss's coefficient and gradient, the ODE data against finite differences and RK4, and a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("sklearn")

from moekit.apps.mixer import (  # noqa: E402
    MixERConfig,
    MixERModel,
    fit_gate,
    loss_fn,
    lorenz,
    lotka_volterra,
    make_environments,
    purity,
    rk4_rollout,
    train,
    train_eval,
)


def _reference(model: MixERModel, x_PS, env_P, scale):
    """One point at a time: expert ``argmax g(ξ_e)`` written as a plain MLP."""
    out = []
    p_NK = torch.softmax(model.gate_logits(), -1)
    for i in range(len(env_P)):
        e = int(env_P[i])
        k = int(model.gate_logits()[e].argmax())
        z = torch.cat([x_PS[i], model.contexts_NC[e]])
        h = torch.tanh(z @ model.w1[k] + model.b1[k, 0])
        h = torch.tanh(h @ model.w2[k] + model.b2[k, 0])
        y = h @ model.w3[k] + model.b3[k, 0]
        out.append(y * p_NK[e, k] if scale else y)
    return torch.stack(out)


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("points", [1, 7])
def test_top1_forward_matches_per_point_reference_outputs_and_grads(scale, points):
    torch.manual_seed(0)
    m = MixERModel(5, 3, 4, 16)
    m.gate_KC1.data.normal_()
    x, env = torch.randn(points, 3), torch.randint(0, 5, (points,))
    got = m(x, env, scale_by_gate=scale)
    want = _reference(m, x, env, scale)
    assert torch.allclose(got, want, atol=1e-5)
    g1 = torch.autograd.grad(got.square().sum(), [m.contexts_NC, m.w1, m.gate_KC1], allow_unused=True)
    g2 = torch.autograd.grad(want.square().sum(), [m.contexts_NC, m.w1, m.gate_KC1], allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))
    assert (g1[2] is not None and g1[2].abs().sum() > 0) == scale  # the gate learns only through the scaling


def test_an_expert_with_no_environment_gets_no_gradient():
    torch.manual_seed(1)
    m = MixERModel(4, 3, 2, 8)
    m.gate_KC1.data.zero_()
    m.gate_KC1.data[1, -1] = 5.0  # bias: everyone to expert 1
    loss = m(torch.randn(6, 3), torch.randint(0, 4, (6,))).sum()
    g = torch.autograd.grad(loss, m.w1)[0]
    assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0 and g[2].abs().sum() == 0


def test_one_expert_is_a_single_context_conditioned_mlp():
    torch.manual_seed(2)
    m = MixERModel(3, 1, 2, 8)
    m.gate_KC1.data.normal_()
    x, env = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    z = torch.cat([x, m.contexts_NC[env]], -1)
    want = torch.tanh(torch.tanh(z @ m.w1[0] + m.b1[0]) @ m.w2[0] + m.b2[0]) @ m.w3[0] + m.b3[0]
    assert torch.allclose(m(x, env), want, atol=1e-6)
    assert torch.allclose(m(x, env, scale_by_gate=True), want, atol=1e-6)  # p = 1 with one expert


def test_kmeans_least_squares_gate_recovers_separated_clusters_and_keeps_names():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    truth = torch.tensor([0, 1, 2] * 5)
    xi = centres[truth] + 0.3 * torch.randn(15, 3, generator=g)
    w, labels = fit_gate(xi, 3, truth, seed=0)
    assert torch.equal(labels, truth)  # Hungarian renaming kept the current expert names
    gate = torch.cat([xi, torch.ones(15, 1)], -1) @ w.T
    assert torch.equal(gate.argmax(-1), truth)
    # the least-squares solution is optimal: the normal equations hold
    x1 = torch.cat([xi, torch.ones(15, 1)], -1).double()
    resid = x1 @ w.T.double() - torch.nn.functional.one_hot(truth, 3).double()
    assert (x1.T @ resid).abs().max() < 1e-4
    perm = torch.tensor([2, 0, 1])
    _, renamed = fit_gate(xi, 3, perm[truth], seed=0)
    assert torch.equal(renamed, perm[truth])


def test_balance_coefficient_is_applied_and_reaches_the_gate():
    torch.manual_seed(4)
    m = MixERModel(6, 3, 2, 8)
    m.gate_KC1.data.normal_()
    x, dx, env = torch.randn(12, 3), torch.randn(12, 3), torch.arange(6).repeat(2)
    base = loss_fn(m, x, dx, env, True, 0.0)
    with_bal = loss_fn(m, x, dx, env, True, 0.5)
    assert torch.allclose(with_bal - base, 0.5 * m.balance_loss(), atol=1e-6)
    g = torch.autograd.grad(m.balance_loss(), m.gate_KC1)[0]
    assert g.abs().sum() > 0
    assert torch.equal(loss_fn(m, x, dx, env, False, 0.5), loss_fn(m, x, dx, env, False, 0.0))


def test_balance_loss_is_one_when_balanced_and_k_when_collapsed():
    m = MixERModel(4, 4, 4, 8)
    with torch.no_grad():
        m.contexts_NC.copy_(torch.eye(4))
        m.gate_KC1.zero_()
        m.gate_KC1[:, :4] = 30.0 * torch.eye(4)  # environment e to expert e, confidently
        assert float(m.balance_loss()) == pytest.approx(1.0, abs=1e-4)
        m.gate_KC1.zero_()
        m.gate_KC1[0, -1] = 30.0  # everyone to expert 0
        assert float(m.balance_loss()) == pytest.approx(4.0, abs=1e-4)


def test_purity():
    fam = torch.tensor([0, 0, 0, 1, 1, 1])
    assert purity(torch.tensor([1, 1, 1, 0, 0, 0]), fam) == 1.0
    assert purity(torch.tensor([0, 0, 0, 0, 0, 0]), fam) == 0.5  # one expert for both families
    assert purity(torch.tensor([0, 0, 1, 1, 1, 1]), fam) == pytest.approx(5 / 6)


@pytest.mark.parametrize("family", ["lotka_volterra", "lorenz"])
def test_trajectories_and_derivatives_agree_and_rk4_follows_solve_ivp(family):
    cfg = MixERConfig(envs_per_family=1, train_trajectories=1, test_trajectories=1, points=81, horizon=2.0,
                      rollout_steps=40)
    d = make_environments(cfg, 0)
    e = 0 if family == "lotka_volterra" else 1
    x, dx, dt = d["train_x"][e, 0].double(), d["train_dx"][e, 0].double(), d["dt"]
    central = (x[2:] - x[:-2]) / (2 * dt)
    assert torch.allclose(central, dx[1:-1], atol=5e-3 * (1 + dx.abs().max()))
    p = np.array(d["params"][e])
    f = lotka_volterra(p) if family == "lotka_volterra" else lorenz(p)
    roll = rk4_rollout(lambda s: torch.as_tensor(f(0.0, s.numpy())), x[0], dt, 40)
    assert torch.allclose(roll, x[:41], atol=1e-3)
    if family == "lotka_volterra":
        assert (x[:, 2] == 0).all() and (x[:, :2] > 0).all()


def test_mixer_gate_is_never_trained_by_gradient():
    cfg = MixERConfig(envs_per_family=2, train_trajectories=1, test_trajectories=1, points=10, steps=30,
                      warmup_steps=10, gate_every=10, rollout_steps=3, hidden=8)
    data = make_environments(cfg, 0)
    model, fits = train(cfg, "mixer", 0, data)
    assert fits == 2 and model.gate_KC1.grad is None and not model.gate_KC1.requires_grad
    want, _ = fit_gate(model.contexts_NC, 2, None, 0)  # shape and validity of the last fit
    assert model.gate_KC1.shape == want.shape


def test_mixer_reconstructs_the_ode_families():
    """Behaviour: a short run fits the vector fields of held-out trajectories well (an untrained or mis-routed
    model is one to two orders of magnitude worse) and rolls them out accurately."""
    cfg = MixERConfig(envs_per_family=3, train_trajectories=3, test_trajectories=1, points=30, steps=500,
                      warmup_steps=150, gate_every=50, rollout_steps=10, hidden=32)
    data = make_environments(cfg, 1)
    m = train_eval(cfg, "mixer", 1, data)
    var = float(data["test_dx"].var())
    assert m["test_derivative_mse"] < 0.05 * var, (m, var)
    assert m["rollout_mse"] < 0.01, m
    assert m["gate_updates"] == 7


def test_bad_config_names_the_field():
    from moekit.configs import ConfigError
    with pytest.raises(ConfigError, match="warmup_steps"):
        MixERConfig(steps=10, warmup_steps=10)
    with pytest.raises(ConfigError, match="rollout_steps"):
        MixERConfig(points=5, rollout_steps=5)


def test_listed(capsys):
    from moekit.cli.main import main
    assert main(["app", "--list"]) == 0
    assert "mixer" in capsys.readouterr().out

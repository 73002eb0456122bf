"""T2MIR (spec §27): width of the two halves, EMA gate (no gradient, θ_t ← τθ + (1−τ)θ_t), contrastive loss
lowest for distinct per-task gate means, noisy gate, top-k combine, loss coefficients, gymnasium env, a short run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.apps.t2mir import (
    InContextPolicy,
    ParallelTaskTokenMoE,
    T2MIRConfig,
    contrastive_router_loss,
    make_tasks,
    online_regret,
    task_routing_purity,
    topk_combine,
    train_policy,
)
from moekit.configs import ConfigError


@pytest.mark.parametrize("dim", [8, 10])
def test_output_width_is_the_two_halves(dim):
    torch.manual_seed(0)
    moe = ParallelTaskTokenMoE(dim, token_experts=6, task_experts=12, top_k=2).eval()
    x = torch.randn(3, 5, dim)
    y = moe(x)
    assert y.shape == (3, 5, dim)
    x_TD = x.reshape(-1, dim)
    tok, _ = topk_combine(moe.token_gate(x_TD), moe.token_experts(x_TD), 2)
    task, _ = topk_combine(moe.task_gate(x_TD), moe.task_experts(x_TD), 2)
    assert tok.shape[-1] + task.shape[-1] == dim
    torch.testing.assert_close(y.reshape(-1, dim), torch.cat([tok, task], -1))


def test_topk_combine_reference():
    torch.manual_seed(1)
    logits, y = torch.randn(7, 5), torch.randn(7, 5, 3)
    out, ids = topk_combine(logits, y, 2)
    for t in range(7):
        top = sorted(range(5), key=lambda e: -float(logits[t, e]))[:2]
        w = torch.softmax(logits[t, top], 0)
        torch.testing.assert_close(out[t], w[0] * y[t, top[0]] + w[1] * y[t, top[1]])
        assert set(ids[t].tolist()) == set(top)


def test_ema_gate_gets_no_gradient_and_updates_by_tau():
    torch.manual_seed(2)
    moe = ParallelTaskTokenMoE(8, ema_tau=0.25).train()
    moe(torch.randn(4, 3, 8))
    (moe.contrastive_loss() + moe.balance_loss()).backward()
    assert moe.ema_gate.weight.grad is None and not moe.ema_gate.weight.requires_grad
    assert moe.task_gate.weight.grad is not None
    with torch.no_grad():
        moe.task_gate.weight.add_(1.0)
    online, target = moe.task_gate.weight.clone(), moe.ema_gate.weight.clone()
    moe.update_ema()
    torch.testing.assert_close(moe.ema_gate.weight, 0.25 * online + 0.75 * target)


def test_contrastive_loss_is_lowest_for_distinct_task_means():
    torch.manual_seed(3)
    n, E = 4, 12
    distinct = 5 * torch.eye(E)[:n]
    same = distinct.mean(0, keepdim=True).expand(n, E)
    w = torch.eye(E)
    lo = contrastive_router_loss(torch.cat([distinct, distinct]), torch.cat([distinct, distinct]), w)
    hi = contrastive_router_loss(torch.cat([same, same]), torch.cat([same, same]), w)
    torch.testing.assert_close(hi, torch.log(torch.tensor(float(n))))  # identical means: chance
    assert float(lo) < 0.1 < float(hi)
    shuffled = contrastive_router_loss(torch.cat([distinct, distinct.roll(1, 0)]),
                                       torch.cat([distinct, distinct.roll(1, 0)]), w)
    assert float(shuffled) > float(hi)  # the halves disagree on which task is which
    with pytest.raises(ValueError, match="two equal halves"):
        contrastive_router_loss(torch.randn(3, E), torch.randn(3, E), w)


def test_gate_noise_only_in_training():
    torch.manual_seed(4)
    moe = ParallelTaskTokenMoE(8, gate_noise=0.5)
    x = torch.randn(2, 3, 8)
    moe.eval()
    assert torch.equal(moe(x), moe(x))
    moe.train()
    assert not torch.equal(moe(x), moe(x))


@pytest.mark.parametrize("coef", ["balance_coef", "contrastive_coef"])
def test_loss_coefficients_are_applied(coef, monkeypatch):
    """Zeroing a coefficient removes exactly that term's gradient from what it trains."""
    cfg = T2MIRConfig(dim=8, heads=2, layers=1, moe_layer=0, horizon=4, eval_horizon=2, tasks_per_batch=2,
                      num_tasks=2, steps=1, gate_noise=0.0)
    tasks = make_tasks(2, cfg.num_arms, 0)
    grads = {}
    for value in (0.0, 1.0):
        c = dataclasses.replace(cfg, **{coef: value, ("contrastive_coef" if coef == "balance_coef"
                                                      else "balance_coef"): 0.0}, lr=1e-9)
        torch.manual_seed(0)
        captured = {}
        orig = torch.optim.Adam.step

        def step(self, *a, captured=captured, orig=orig, **k):
            for g in self.param_groups:
                for p in g["params"]:
                    captured.setdefault(id(p), None if p.grad is None else p.grad.clone())
            return orig(self, *a, **k)
        monkeypatch.setattr(torch.optim.Adam, "step", step)
        model, _ = train_policy(c, 0, True, tasks)
        monkeypatch.setattr(torch.optim.Adam, "step", orig)
        part = model.moe.token_gate.weight if coef == "balance_coef" else model.moe.bilinear_EE
        grads[value] = captured[id(part)]
    if coef == "contrastive_coef":
        assert grads[0.0] is None or float(grads[0.0].abs().sum()) == 0
    assert grads[1.0] is not None and not torch.allclose(grads[0.0] if grads[0.0] is not None else
                                                         torch.zeros_like(grads[1.0]), grads[1.0])


def test_gymnasium_bandit_env():
    gym = pytest.importorskip("gymnasium")
    from gymnasium.utils.env_checker import check_env

    from moekit.apps.t2mir import BanditEnv
    env = BanditEnv(torch.tensor([0.1, 0.9, 0.2]), 0.0)
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    _, r, term, trunc, _ = env.step(1)
    assert r == pytest.approx(0.9) and term and not trunc
    with pytest.raises(ValueError, match="action"):
        env.step(5)
    assert isinstance(env, gym.Env)


def test_policy_is_causal():
    cfg = T2MIRConfig(dim=8, heads=2, horizon=6, eval_horizon=2)
    torch.manual_seed(5)
    m = InContextPolicy(cfg, True).eval()
    a, r = torch.randint(0, cfg.num_arms, (2, 6)), torch.randn(2, 6)
    out = m(a, r)
    a2, r2 = a.clone(), r.clone()
    a2[:, 4:], r2[:, 4:] = 0, 5.0
    torch.testing.assert_close(m(a2, r2)[:, :5], out[:, :5])  # position t sees steps < t only


def test_config_errors():
    with pytest.raises(ConfigError, match="tasks_per_batch"):
        T2MIRConfig(tasks_per_batch=1)
    with pytest.raises(ConfigError, match="moe_layer"):
        T2MIRConfig(moe_layer=3, layers=3)
    with pytest.raises(ConfigError, match="token_experts"):
        T2MIRConfig(token_experts=1, top_k=2)


def test_in_context_policy_beats_random_and_task_routing_clusters():
    """Behaviour: a short pretraining gives much lower online regret than random actions on held-out bandits, and
    the task gate's sequence means identify the training task far above chance."""
    pytest.importorskip("gymnasium")
    cfg = T2MIRConfig(seeds=1, num_tasks=8, steps=250, eval_tasks=12, eval_horizon=16)
    train = make_tasks(cfg.num_tasks, cfg.num_arms, 0)
    test = make_tasks(cfg.eval_tasks, cfg.num_arms, 99)
    model, _ = train_policy(cfg, 0, True, train)
    assert online_regret(model, test, cfg, 0) < 0.7 * online_regret(None, test, cfg, 0)
    assert task_routing_purity(model, train, cfg, 0) > 2 / cfg.num_tasks


def test_missing_gymnasium_one_line_exit_2(capsys, tmp_path, monkeypatch):
    import sys

    from moekit.cli.main import main
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import fails as if not installed
    out = tmp_path / "r"
    assert main(["app", "t2mir", "--out", str(out), "--seeds=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gymnasium" in err[0] and "pip install 'moekit[apps]'" in err[0], err
    assert not out.exists()

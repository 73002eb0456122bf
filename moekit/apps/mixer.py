"""MixER (no spec section; the issue's summary is the spec): a sparse top-1 mixture of expert reconstructors for
hierarchical meta-learning of parametric ODE families, with its gating fitted by K-means and least squares
instead of gradient descent.

Setting (contextual meta-learning): ``N`` environments, each one ODE system with its own parameters, drawn from
several *families* (Lotka–Volterra with varied ``α, β, γ, δ``; Lorenz with varied ``σ, ρ``). Every environment
``e`` owns a learnable context ``ξ_e`` (``[C]``); the ``K`` experts are vector-field MLPs
``f_k(x, ξ) ≈ dx/dt`` shared by all environments. The gate ``g(ξ) = W [ξ; 1]`` (``W``: ``[K, C + 1]``) sends each
environment to one expert, ``k_e = argmax_k g_k(ξ_e)``.

Training (a reconstruction of the method from its abstract; the choices are ours):

- data: trajectories integrated with scipy's ``solve_ivp`` (RK45, tight tolerances) from random initial states;
  the loss is derivative matching, ``mean ||f_{k_e}(x, ξ_e) − ẋ||²`` at the trajectory points (the exact vector
  field, so no solver is differentiated); experts and contexts are trained by Adam.
- MixER gating (:func:`fit_gate`), every ``gate_every`` steps after ``warmup_steps``: K-means (scikit-learn) on the
  contexts ``ξ_e``, clusters matched to experts by the largest overlap with the current routing (Hungarian, scipy),
  then ``W`` by least squares on the one-hot cluster targets, ``min ||[Ξ, 1] Wᵀ − Y||²``. The gate never takes a
  gradient step. During warmup every environment uses expert 0; at its end expert 0 is copied into all experts
  (so every expert starts from the shared model and the contexts already separate the families).
- gradient-gated baseline (``gating="gradient"``): the same model with ``W`` trained by Adam through the Switch
  scaling ``p_{k_e}(ξ_e)·f_{k_e}`` (``p = softmax g``) plus the Switch balance loss
  ``balance_coef · K · Σ_k f_k P_k`` over environments, from the same warmup and copy.

Evaluation on held-out initial states of the same environments: derivative MSE, and the rollout error of the
learned field integrated by RK4 over ``rollout_steps`` steps against the ``solve_ivp`` trajectory; routing
*purity* (the share of environments whose expert is its family's majority expert, over families that get one
expert each) and the number of experts in use.

Scaling: Lorenz states are divided by 10 and time is stretched by 10 (``ẋ`` divided by 100) so both families have
derivatives of order one; Lotka–Volterra is padded with a constant third state 0.

Dims: N environments, C context, K experts, P points, S = 3 state dims, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import AppRun, check_field, median
from .registry import register_app

__all__ = ["MixERConfig", "MixERModel", "fit_gate", "lorenz", "lotka_volterra", "make_environments", "purity",
           "loss_fn", "rk4_rollout", "run", "train", "train_eval"]

_FAMILIES = ("lotka_volterra", "lorenz")


@dataclass(frozen=True, kw_only=True)
class MixERConfig:
    """MixER application settings."""

    seeds: int = 3
    envs_per_family: int = 6
    num_experts: int = 2
    context_dim: int = 4
    hidden: int = 64
    train_trajectories: int = 4
    test_trajectories: int = 2
    points: int = 40
    horizon: float = 4.0
    steps: int = 1500
    warmup_steps: int = 300
    gate_every: int = 100
    lr: float = 3e-3
    balance_coef: float = 0.01
    rollout_steps: int = 20

    def __post_init__(self) -> None:
        n = type(self).__name__
        for f in ("seeds", "envs_per_family", "num_experts", "context_dim", "hidden", "train_trajectories",
                  "test_trajectories", "steps", "gate_every", "rollout_steps"):
            check_field(getattr(self, f) >= 1, n, f, getattr(self, f), ">= 1")
        check_field(self.points >= 2, n, "points", self.points, ">= 2")
        check_field(self.rollout_steps < self.points, n, "rollout_steps", self.rollout_steps,
                    f"< points ({self.points})", "a rollout follows one test trajectory")
        check_field(self.horizon > 0, n, "horizon", self.horizon, "> 0")
        check_field(0 <= self.warmup_steps < self.steps, n, "warmup_steps", self.warmup_steps,
                    f"in [0, steps={self.steps})")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")
        check_field(self.balance_coef >= 0, n, "balance_coef", self.balance_coef, ">= 0")


# ---------------------------------------------------------------- ODE families (scaled, 3 state dims)

def lotka_volterra(params: np.ndarray):
    """``ẋ = αx − βxy``, ``ẏ = δxy − γy`` (third state constant 0); ``params = (α, β, γ, δ)``."""
    a, b, c, d = params

    def f(t, s):
        x, y, _ = s
        return np.array([a * x - b * x * y, d * x * y - c * y, 0.0])
    return f


def lorenz(params: np.ndarray):
    """Lorenz in scaled units ``u = X/10``, ``τ = 10 t``: ``du/dτ = f(10u)/100``; ``params = (σ, ρ, β)``."""
    sig, rho, beta = params

    def f(t, s):
        x, y, z = 10.0 * s
        return np.array([sig * (y - x), x * (rho - z) - y, x * y - beta * z]) / 100.0
    return f


def _draw_env(family: str, rng: np.random.Generator) -> np.ndarray:
    if family == "lotka_volterra":
        return np.array([rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)])
    return np.array([rng.uniform(8.0, 12.0), rng.uniform(20.0, 32.0), 8.0 / 3.0])


def _draw_state(family: str, rng: np.random.Generator) -> np.ndarray:
    if family == "lotka_volterra":
        return np.array([rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), 0.0])
    return np.array([rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0), rng.uniform(1.5, 3.0)])


def make_environments(cfg: MixERConfig, seed: int) -> dict:
    """Trajectories of every environment: ``x`` ``[N, T, P, S]`` and exact ``dx`` for train/test, family ids."""
    from scipy.integrate import solve_ivp
    rng = np.random.default_rng(seed)
    t_eval = np.linspace(0.0, cfg.horizon, cfg.points)
    fams: list[int] = []
    params: list[list[float]] = []
    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for fi, fam in enumerate(_FAMILIES):
        for _ in range(cfg.envs_per_family):
            p = _draw_env(fam, rng)
            f = lotka_volterra(p) if fam == "lotka_volterra" else lorenz(p)
            fams.append(fi)
            params.append(p.tolist())
            for split, count in (("train", cfg.train_trajectories), ("test", cfg.test_trajectories)):
                xs, dxs = [], []
                for _ in range(count):
                    sol = solve_ivp(f, (0.0, cfg.horizon), _draw_state(fam, rng), t_eval=t_eval, rtol=1e-8,
                                    atol=1e-10)
                    x = sol.y.T
                    xs.append(x)
                    dxs.append(np.stack([f(0.0, s) for s in x]))
                out[split][0].append(np.stack(xs))
                out[split][1].append(np.stack(dxs))
    res: dict = {"family": torch.tensor(fams), "params": params, "dt": float(t_eval[1] - t_eval[0])}
    for split, (xs, dxs) in out.items():
        res[f"{split}_x"] = torch.tensor(np.stack(xs), dtype=torch.float32)
        res[f"{split}_dx"] = torch.tensor(np.stack(dxs), dtype=torch.float32)
    return res


# ---------------------------------------------------------------- model

class MixERModel(nn.Module):
    """Contexts ``ξ`` ``[N, C]``, a linear gate ``W`` ``[K, C + 1]`` and ``K`` vector-field MLP experts.

    Experts hold batched weights (``[K, in, out]``) and all ``K`` are evaluated, then one is selected per point:
    a readable top-1 layer whose cost is irrelevant at this size.
    """

    def __init__(self, num_envs: int, num_experts: int, context_dim: int, hidden: int, state_dim: int = 3) -> None:
        super().__init__()
        k, c, h, s = num_experts, context_dim, hidden, state_dim
        self.contexts_NC = nn.Parameter(0.1 * torch.randn(num_envs, c))
        self.gate_KC1 = nn.Parameter(torch.zeros(k, c + 1))
        self.w1 = nn.Parameter(torch.randn(k, s + c, h) / (s + c) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(k, 1, h))
        self.w2 = nn.Parameter(torch.randn(k, h, h) / h ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(k, 1, h))
        self.w3 = nn.Parameter(torch.randn(k, h, s) / h ** 0.5 * 0.1)
        self.b3 = nn.Parameter(torch.zeros(k, 1, s))
        # during warmup every environment uses this expert
        self.forced_expert: int | None = None

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def gate_logits(self) -> torch.Tensor:
        """``g(ξ_e)`` for every environment, ``[N, K]``."""
        ones_N1 = torch.ones(self.contexts_NC.shape[0], 1)
        return torch.cat([self.contexts_NC, ones_N1], -1) @ self.gate_KC1.T

    def assignment(self) -> torch.Tensor:
        """Top-1 expert of every environment, ``[N]``."""
        if self.forced_expert is not None:
            return torch.full((self.contexts_NC.shape[0],), self.forced_expert, dtype=torch.long)
        return self.gate_logits().argmax(-1)

    def experts(self, x_PS: torch.Tensor, xi_PC: torch.Tensor) -> torch.Tensor:
        """Every expert's vector field at every point, ``[K, P, S]``."""
        z = torch.cat([x_PS, xi_PC], -1).expand(self.num_experts, -1, -1)
        h = torch.tanh(z @ self.w1 + self.b1)
        h = torch.tanh(h @ self.w2 + self.b2)
        return h @ self.w3 + self.b3

    def forward(self, x_PS: torch.Tensor, env_P: torch.Tensor, scale_by_gate: bool = False) -> torch.Tensor:
        """``f_{k_e}(x, ξ_e)`` ``[P, S]``; ``scale_by_gate`` multiplies by ``p_{k_e}`` (gradient-gated Switch)."""
        k_N = self.assignment()
        all_KPS = self.experts(x_PS, self.contexts_NC[env_P])
        k_P = k_N[env_P]
        y_PS = all_KPS[k_P, torch.arange(len(env_P))]
        if scale_by_gate:
            p_NK = torch.softmax(self.gate_logits(), -1)
            y_PS = y_PS * p_NK[env_P, k_P][:, None]
        return y_PS

    def balance_loss(self) -> torch.Tensor:
        """Switch balance ``K · Σ_k f_k P_k`` over environments (1 at uniform routing and uniform probs)."""
        p_NK = torch.softmax(self.gate_logits(), -1)
        frac_K = F.one_hot(p_NK.argmax(-1), self.num_experts).float().mean(0)
        return self.num_experts * (frac_K * p_NK.mean(0)).sum()

    @torch.no_grad()
    def copy_expert(self, src: int) -> None:
        for p in (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3):
            p.data[:] = p.data[src:src + 1]


def fit_gate(contexts_NC: torch.Tensor, num_experts: int, current_N: torch.Tensor | None, seed: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """MixER's gating update: ``(W [K, C + 1], cluster-of-environment [N])``.

    K-means (scikit-learn, 10 restarts) on the contexts; clusters are renamed to the experts they overlap most with
    under ``current_N`` (Hungarian matching, scipy); then ``W`` solves the least-squares problem
    ``min ||[Ξ, 1] Wᵀ − onehot(cluster)||²`` (``torch.linalg.lstsq``).
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans
    xi = contexts_NC.detach().double()
    k = min(num_experts, xi.shape[0])
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(xi.numpy())
    labels_N = torch.as_tensor(labels, dtype=torch.long)
    if current_N is not None:
        overlap = np.zeros((k, num_experts))
        for c, e in zip(labels.tolist(), current_N.tolist(), strict=True):
            overlap[c, e] += 1
        rows, cols = linear_sum_assignment(-overlap)
        rename = dict(zip(rows.tolist(), cols.tolist(), strict=True))
        labels_N = torch.tensor([rename[int(c)] for c in labels.tolist()])
    x_NC1 = torch.cat([xi, torch.ones(xi.shape[0], 1, dtype=xi.dtype)], -1)
    y_NK = F.one_hot(labels_N, num_experts).double()
    w_C1K = torch.linalg.lstsq(x_NC1, y_NK, driver="gelsd").solution
    return w_C1K.T.float(), labels_N


def rk4_rollout(field, x0_S: torch.Tensor, dt: float, steps: int) -> torch.Tensor:
    """Classic RK4 of ``ẋ = field(x)`` from ``x0``; states ``[steps + 1, S]``."""
    xs = [x0_S]
    x = x0_S
    for _ in range(steps):
        k1 = field(x)
        k2 = field(x + 0.5 * dt * k1)
        k3 = field(x + 0.5 * dt * k2)
        k4 = field(x + dt * k3)
        x = x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        xs.append(x)
    return torch.stack(xs)


def purity(assign_N: torch.Tensor, family_N: torch.Tensor) -> float:
    """Share of environments routed to their family's majority expert, counting a family's expert only once:
    1.0 means every family has its own expert; two families sharing one expert lose that family's share."""
    taken: set[int] = set()
    good = 0
    for fam in family_N.unique().tolist():
        a = assign_N[family_N == fam]
        counts = torch.bincount(a, minlength=int(assign_N.max()) + 1)
        for e in counts.argsort(descending=True).tolist():
            if e not in taken:
                taken.add(e)
                good += int(counts[e])
                break
    return good / len(assign_N)


def loss_fn(model: MixERModel, x_PS: torch.Tensor, dx_PS: torch.Tensor, env_P: torch.Tensor, gated: bool,
            balance_coef: float) -> torch.Tensor:
    """Derivative-matching MSE; when ``gated`` (gradient gating) Switch scaling plus ``balance_coef`` · balance."""
    loss = F.mse_loss(model(x_PS, env_P, scale_by_gate=gated), dx_PS)
    if gated and balance_coef > 0:
        loss = loss + balance_coef * model.balance_loss()
    return loss


def train(cfg: MixERConfig, gating: str, seed: int, data: dict) -> tuple[MixERModel, int]:
    """Train one model (``gating`` ``"mixer"`` or ``"gradient"``); returns it and the number of gate fits."""
    n = len(data["family"])
    x_NTPS, dx_NTPS = data["train_x"], data["train_dx"]
    x_PS, dx_PS = x_NTPS.reshape(-1, 3), dx_NTPS.reshape(-1, 3)
    env_P = torch.arange(n).repeat_interleave(x_NTPS.shape[1] * x_NTPS.shape[2])
    torch.manual_seed(seed)
    model = MixERModel(n, cfg.num_experts, cfg.context_dim, cfg.hidden)
    params = [p for name, p in model.named_parameters() if name != "gate_KC1"]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gate_opt = torch.optim.Adam([model.gate_KC1], lr=cfg.lr) if gating == "gradient" else None
    model.gate_KC1.requires_grad_(gating == "gradient")
    model.forced_expert = 0 if cfg.warmup_steps > 0 else None
    gate_updates = 0
    for step in range(cfg.steps):
        if step == cfg.warmup_steps:
            model.forced_expert = None
            model.copy_expert(0)
            if gating == "mixer":
                model.gate_KC1.data, _ = fit_gate(model.contexts_NC, cfg.num_experts, None, seed)
                gate_updates += 1
            else:  # gradient gating starts from a random gate (all-zero logits would tie on expert 0)
                model.gate_KC1.data.normal_(0.0, 0.1)
        elif gating == "mixer" and step > cfg.warmup_steps and (step - cfg.warmup_steps) % cfg.gate_every == 0:
            model.gate_KC1.data, _ = fit_gate(model.contexts_NC, cfg.num_experts, model.assignment(), seed)
            gate_updates += 1
        gated = gating == "gradient" and model.forced_expert is None
        loss = loss_fn(model, x_PS, dx_PS, env_P, gated, cfg.balance_coef)
        opt.zero_grad()
        if gate_opt is not None:
            gate_opt.zero_grad()
        loss.backward()
        opt.step()
        if gate_opt is not None and gated:
            gate_opt.step()
    return model, gate_updates


def train_eval(cfg: MixERConfig, gating: str, seed: int, data: dict | None = None) -> dict:
    """Train one model and evaluate it on the held-out trajectories of the same environments."""
    data = data if data is not None else make_environments(cfg, seed)
    model, gate_updates = train(cfg, gating, seed, data)
    return {**evaluate(model, data, cfg, scale_by_gate=gating == "gradient"), "gate_updates": gate_updates}


@torch.no_grad()
def evaluate(model: MixERModel, data: dict, cfg: MixERConfig, scale_by_gate: bool = False) -> dict:
    n = len(data["family"])
    xt, dxt = data["test_x"], data["test_dx"]
    env_P = torch.arange(n).repeat_interleave(xt.shape[1] * xt.shape[2])
    mse = float(F.mse_loss(model(xt.reshape(-1, 3), env_P, scale_by_gate), dxt.reshape(-1, 3)))
    errs = []
    for e in range(n):
        for j in range(xt.shape[1]):
            def field(x_S, e=e):
                return model(x_S[None], torch.tensor([e]), scale_by_gate)[0]
            pred = rk4_rollout(field, xt[e, j, 0], data["dt"], cfg.rollout_steps)
            errs.append(float((pred - xt[e, j, :cfg.rollout_steps + 1]).pow(2).mean()))
    assign = model.assignment()
    return {"test_derivative_mse": mse, "rollout_mse": float(np.mean(errs)),
            "purity": purity(assign, data["family"]), "experts_used": int(assign.unique().numel()),
            "assignment": assign.tolist()}


@register_app("mixer", config=MixERConfig, requires=("scipy", "sklearn"),
              summary="MixER (no spec): top-1 MoE of ODE-reconstructing experts with a K-means + least-squares "
                      "gate, vs a gradient-gated MoE, on Lotka-Volterra and Lorenz families")
def run(config: MixERConfig, out_dir: Path) -> dict:
    rec = AppRun(out_dir, "mixer", config)
    kinds = ("mixer", "gradient")
    res: dict[str, list[dict]] = {k: [] for k in kinds}
    for seed in range(config.seeds):
        data = make_environments(config, seed)
        for kind in kinds:
            m = train_eval(config, kind, seed, data)
            res[kind].append(m)
            rec.log({"seed": seed, "gating": kind, **m})
    fields = ("test_derivative_mse", "rollout_mse", "purity", "experts_used")
    med = {k: {f: median([float(r[f]) for r in rs]) for f in fields} for k, rs in res.items()}

    def draw(fig, ax):
        for i, k in enumerate(kinds):
            ax.scatter([i] * len(res[k]), [r["rollout_mse"] for r in res[k]], color=f"C{i}")
        ax.set_xticks(range(len(kinds)), ["MixER (K-means + LS gate)", "gradient gate"])
        ax.set_yscale("log")
        ax.set_ylabel(f"rollout MSE ({config.rollout_steps} RK4 steps)")
        ax.set_title("Lotka-Volterra + Lorenz families, held-out initial states, one point per seed")
        ax.grid(alpha=0.3)
    rec.plot("rollout_mse", draw)
    return rec.finish({"app": "mixer", "seeds": config.seeds, "median": med,
                       "mixer_wins_rollout": sum(a["rollout_mse"] < b["rollout_mse"]
                                                 for a, b in zip(res["mixer"], res["gradient"], strict=True))})

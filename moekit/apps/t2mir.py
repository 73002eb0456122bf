"""T2MIR (spec §27; NJU-RL/T2MIR): token-wise and task-wise MoE in an in-context RL transformer.

The in-context learner is a small causal transformer in the DPT style (Lee et al. 2023, "supervised pretraining
can learn in-context RL"): its input is a history of (action, reward) steps in one task, and at every position it
predicts the task's optimal action; deployed online, it acts by sampling that prediction on its own growing
history, so it explores and exploits in context without weight updates. Tasks are multi-armed bandits whose arms
have different means (the spec's library demo), exposed as a ``gymnasium`` environment (:class:`BanditEnv`) for the
online evaluation; the offline training histories use uniformly random actions.

T2MIR layer (in ``moe_layer``, the spec's "layer 3" of 3 by default): the FFN is replaced by two parallel MoEs of
output width D/2 each, concatenated to width D and added residually:

- token-wise MoE: E = 6, k = 2, noisy top-k gate (``logits + ε·N(0, 1)`` in training, ε = 0.01), Switch load
  balancing loss (:func:`moekit.routing.losses.load_balancing_loss`) weighted 0.1;
- task-wise MoE: E = 12, k = 2, with a *contrastive router loss*: the batch is two halves with the same tasks in
  the same order (two histories per task); ``q`` is the sequence mean of the online task gate's logits, ``k`` the
  same from an EMA target gate (τ = 0.005) on detached inputs; logits ``q W kᵀ`` with a learnable bilinear
  ``W`` (E × E); InfoNCE with positives on the diagonal, symmetric over the halves (q₁ vs k₂ and q₂ vs k₁);
  weight 0.01. The EMA gate is updated after each optimiser step as ``θ_t ← τ θ + (1 − τ) θ_t``.

Choices: experts are two-layer GELU FFNs (D → 2D → D/2) computed for all experts and combined with the top-k
softmax weights (renormalised over the k chosen); both gates route every token. The dense baseline is the same
transformer with a dense FFN (D → 2D → D) in that layer.

Dims: B histories, S steps, D model dim, E experts, K chosen experts, A arms, H FFN hidden.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..routing.losses import load_balancing_loss
from .common import AppRun, check_field, median
from .registry import register_app, require

__all__ = ["BanditEnv", "ParallelTaskTokenMoE", "T2MIRConfig", "contrastive_router_loss", "run"]


@dataclass(frozen=True, kw_only=True)
class T2MIRConfig:
    """T2MIR settings (defaults: the figures in docs/applications.md)."""

    seeds: int = 3
    num_arms: int = 5
    num_tasks: int = 16
    horizon: int = 24
    reward_std: float = 0.3
    dim: int = 32
    layers: int = 3
    heads: int = 4
    moe_layer: int = 2
    token_experts: int = 6
    task_experts: int = 12
    top_k: int = 2
    gate_noise: float = 0.01
    balance_coef: float = 0.1
    contrastive_coef: float = 0.01
    ema_tau: float = 0.005
    steps: int = 600
    tasks_per_batch: int = 16
    lr: float = 1e-3
    eval_tasks: int = 32
    eval_horizon: int = 24

    def __post_init__(self) -> None:
        n = type(self).__name__
        for f in ("seeds", "num_tasks", "horizon", "dim", "layers", "heads", "steps", "tasks_per_batch",
                  "eval_tasks", "eval_horizon", "top_k"):
            check_field(getattr(self, f) >= 1, n, f, getattr(self, f), ">= 1")
        check_field(self.num_arms >= 2, n, "num_arms", self.num_arms, ">= 2")
        check_field(self.dim % 2 == 0 and self.dim % self.heads == 0, n, "dim", self.dim,
                    f"even and a multiple of heads={self.heads}")
        check_field(0 <= self.moe_layer < self.layers, n, "moe_layer", self.moe_layer, f"in [0, {self.layers - 1}]")
        for f in ("token_experts", "task_experts"):
            check_field(getattr(self, f) >= self.top_k, n, f, getattr(self, f), f">= top_k={self.top_k}")
        check_field(self.tasks_per_batch >= 2, n, "tasks_per_batch", self.tasks_per_batch,
                    ">= 2 (InfoNCE needs negatives)")
        check_field(0 < self.ema_tau <= 1, n, "ema_tau", self.ema_tau, "in (0, 1]")
        for f in ("gate_noise", "balance_coef", "contrastive_coef", "reward_std"):
            check_field(getattr(self, f) >= 0, n, f, getattr(self, f), ">= 0")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")


# ------------------------------------------------------------------------------------------------- environment

def _env_base() -> Any:
    require("gymnasium")
    import gymnasium
    return gymnasium


def BanditEnv(means: torch.Tensor, reward_std: float) -> Any:  # noqa: N802 - a class factory
    """A ``gymnasium.Env``: one multi-armed bandit task (one step per episode; the observation is constant)."""
    gym = _env_base()
    import numpy as np
    from gymnasium import spaces

    class _Bandit(gym.Env):  # type: ignore[name-defined]
        metadata: dict = {"render_modes": []}

        def __init__(self) -> None:
            self.means = [float(m) for m in means]
            self.action_space = spaces.Discrete(len(self.means))
            self.observation_space = spaces.Box(0.0, 0.0, (1,), dtype=np.float32)
            self.reward_std = reward_std

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            super().reset(seed=seed)
            return np.zeros(1, dtype="float32"), {}

        def step(self, action):
            if not self.action_space.contains(action):
                raise ValueError(f"action {action!r} is not in {self.action_space}")
            r = self.means[int(action)] + self.reward_std * float(self.np_random.standard_normal())
            return np.zeros(1, dtype="float32"), r, True, False, {}

    return _Bandit()


def make_tasks(num: int, num_arms: int, seed: int) -> torch.Tensor:
    """``[N, A]`` arm means in [0, 1], each task with a distinct optimal arm where possible."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(num, num_arms, generator=g) * 0.5
    best = torch.arange(num) % num_arms
    means[torch.arange(num), best] = 0.6 + 0.4 * torch.rand(num, generator=g)
    return means


def random_histories(means_NA: torch.Tensor, horizon: int, reward_std: float, gen: torch.Generator):
    """Uniform random actions ``[N, S]`` and their rewards ``[N, S]`` in each task."""
    N, A = means_NA.shape
    a_NS = torch.randint(0, A, (N, horizon), generator=gen)
    r_NS = means_NA.gather(1, a_NS) + reward_std * torch.randn(N, horizon, generator=gen)
    return a_NS, r_NS


# ---------------------------------------------------------------------------------------------------------- MoE

class _Experts(nn.Module):
    """E two-layer GELU FFNs ``D → H → O``, batched weights."""

    def __init__(self, num: int, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.w1_EDH = nn.Parameter(torch.randn(num, dim, hidden) * dim ** -0.5)
        self.b1_EH = nn.Parameter(torch.zeros(num, hidden))
        self.w2_EHO = nn.Parameter(torch.randn(num, hidden, out) * hidden ** -0.5)
        self.b2_EO = nn.Parameter(torch.zeros(num, out))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """All experts on all tokens: ``[T, E, O]``."""
        h_TEH = F.gelu(torch.einsum("td,edh->teh", x_TD, self.w1_EDH) + self.b1_EH)
        return torch.einsum("teh,eho->teo", h_TEH, self.w2_EHO) + self.b2_EO


def topk_combine(logits_TE: torch.Tensor, y_TEO: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_k w_k y_k [T, O], chosen [T, K])`` with ``w`` the softmax over the k largest logits."""
    top_TK = logits_TE.topk(k, dim=-1)
    w_TK = top_TK.values.softmax(-1)
    chosen_TKO = y_TEO.gather(1, top_TK.indices[..., None].expand(-1, -1, y_TEO.shape[-1]))
    return (w_TK[..., None] * chosen_TKO).sum(1), top_TK.indices


class ParallelTaskTokenMoE(nn.Module):
    """T2MIR's FFN replacement: token-wise MoE ‖ task-wise MoE, each of width D/2, concatenated to D."""

    def __init__(self, dim: int, *, token_experts: int = 6, task_experts: int = 12, top_k: int = 2,
                 gate_noise: float = 0.01, ema_tau: float = 0.005) -> None:
        super().__init__()
        self.top_k, self.gate_noise, self.ema_tau = top_k, gate_noise, ema_tau
        half = dim // 2
        self.token_gate = nn.Linear(dim, token_experts, bias=False)
        self.token_experts = _Experts(token_experts, dim, 2 * dim, half)
        self.task_gate = nn.Linear(dim, task_experts, bias=False)
        self.task_experts = _Experts(task_experts, dim, 2 * dim, dim - half)
        self.ema_gate = copy.deepcopy(self.task_gate).requires_grad_(False)
        self.bilinear_EE = nn.Parameter(torch.eye(task_experts))
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        tok_logits_TE = self.token_gate(x_TD)
        if self.training and self.gate_noise > 0:
            tok_logits_TE = tok_logits_TE + self.gate_noise * torch.randn_like(tok_logits_TE)
        tok_TO, tok_ids_TK = topk_combine(tok_logits_TE, self.token_experts(x_TD), self.top_k)
        task_logits_TE = self.task_gate(x_TD)
        task_TO, task_ids_TK = topk_combine(task_logits_TE, self.task_experts(x_TD), self.top_k)
        with torch.no_grad():
            ema_logits_TE = self.ema_gate(x_TD.detach())
        self.last = {"token_probs_TE": tok_logits_TE.softmax(-1), "token_ids_TK": tok_ids_TK,
                     "task_logits_BSE": task_logits_TE.view(B, S, -1), "ema_logits_BSE": ema_logits_TE.view(B, S, -1),
                     "task_ids_TK": task_ids_TK}
        return torch.cat([tok_TO, task_TO], -1).view(B, S, D)

    def balance_loss(self) -> torch.Tensor:
        """The token MoE's load-balancing loss ``E Σ f_i P_i`` of the last forward (unweighted)."""
        return load_balancing_loss(self.last["token_probs_TE"], self.last["token_ids_TK"])

    def contrastive_loss(self) -> torch.Tensor:
        """InfoNCE between the two halves of the last batch (see :func:`contrastive_router_loss`)."""
        return contrastive_router_loss(self.last["task_logits_BSE"].mean(1), self.last["ema_logits_BSE"].mean(1),
                                       self.bilinear_EE)

    @torch.no_grad()
    def update_ema(self) -> None:
        """``θ_t ← τ θ + (1 − τ) θ_t`` for the EMA target gate."""
        for t, p in zip(self.ema_gate.parameters(), self.task_gate.parameters(), strict=True):
            t.mul_(1 - self.ema_tau).add_(p.detach(), alpha=self.ema_tau)


def contrastive_router_loss(q_BE: torch.Tensor, k_BE: torch.Tensor, w_EE: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: rows ``i`` of the first and second halves are the same task (positives on the diagonal).

    ``q``: online gate sequence means, ``k``: EMA gate sequence means (no gradient), ``w``: bilinear ``[E, E]``.
    """
    if q_BE.shape[0] % 2 or q_BE.shape[0] < 4:
        raise ValueError(f"the batch must be two equal halves of >= 2 tasks each, got {q_BE.shape[0]} rows")
    n = q_BE.shape[0] // 2
    q1, q2 = q_BE[:n], q_BE[n:]
    k1, k2 = k_BE[:n].detach(), k_BE[n:].detach()
    labels = torch.arange(n)
    return 0.5 * (F.cross_entropy(q1 @ w_EE @ k2.T, labels) + F.cross_entropy(q2 @ w_EE @ k1.T, labels))


# ------------------------------------------------------------------------------------------------------ model

class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = ffn

    def forward(self, x_BSD: torch.Tensor, mask_SS: torch.Tensor) -> torch.Tensor:
        h = self.n1(x_BSD)
        x_BSD = x_BSD + self.attn(h, h, h, attn_mask=mask_SS, need_weights=False)[0]
        return x_BSD + self.ffn(self.n2(x_BSD))


class InContextPolicy(nn.Module):
    """Causal transformer over (action, reward) steps predicting the optimal arm at every position.

    Position 0 sees an empty-history token; position t sees steps ``< t``, so its prediction is the action at t.
    """

    def __init__(self, cfg: T2MIRConfig, moe: bool) -> None:
        super().__init__()
        d, A = cfg.dim, cfg.num_arms
        self.num_arms = A
        self.step_embed = nn.Linear(A + 1, d)
        self.start = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(cfg.horizon + cfg.eval_horizon + 1, d) * 0.02)
        self.moe: ParallelTaskTokenMoE | None = None
        blocks = []
        for i in range(cfg.layers):
            if moe and i == cfg.moe_layer:
                self.moe = ParallelTaskTokenMoE(d, token_experts=cfg.token_experts, task_experts=cfg.task_experts,
                                                top_k=cfg.top_k, gate_noise=cfg.gate_noise, ema_tau=cfg.ema_tau)
                ffn: nn.Module = self.moe
            else:
                ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            blocks.append(_Block(d, cfg.heads, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, A)

    def forward(self, a_BS: torch.Tensor, r_BS: torch.Tensor) -> torch.Tensor:
        """Optimal-arm logits ``[B, S + 1, A]``: position t from the first t steps."""
        B, S = a_BS.shape
        steps_BSD = self.step_embed(torch.cat([F.one_hot(a_BS, self.num_arms).float(), r_BS[..., None]], -1))
        x = torch.cat([self.start.expand(B, 1, -1), steps_BSD], 1) + self.pos[:S + 1]
        mask_SS = torch.triu(torch.ones(S + 1, S + 1, dtype=torch.bool), 1)
        for blk in self.blocks:
            x = blk(x, mask_SS)
        return self.head(self.norm(x))


def train_policy(cfg: T2MIRConfig, seed: int, moe: bool, tasks_NA: torch.Tensor) -> tuple[InContextPolicy, dict]:
    """Supervised (DPT) pretraining on random histories; batches are two halves with the same tasks."""
    torch.manual_seed(seed)
    model = InContextPolicy(cfg, moe)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed + 1)
    n = min(cfg.tasks_per_batch, len(tasks_NA))
    log = {"balance": 0.0, "contrastive": 0.0}
    for _ in range(cfg.steps):
        idx = torch.randperm(len(tasks_NA), generator=gen)[:n]
        means = torch.cat([tasks_NA[idx], tasks_NA[idx]])  # two halves, same tasks, same order
        a, r = random_histories(means, cfg.horizon, cfg.reward_std, gen)
        logits_BSA = model(a, r)[:, :-1]
        target = means.argmax(-1)[:, None].expand(-1, cfg.horizon)
        loss = F.cross_entropy(logits_BSA.reshape(-1, cfg.num_arms), target.reshape(-1))
        if model.moe is not None:
            bal, con = model.moe.balance_loss(), model.moe.contrastive_loss()
            loss = loss + cfg.balance_coef * bal + cfg.contrastive_coef * con
            log["balance"], log["contrastive"] = float(bal.detach()), float(con.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if model.moe is not None:
            model.moe.update_ema()
    return model.eval(), log


@torch.no_grad()
def online_regret(model: InContextPolicy | None, tasks_NA: torch.Tensor, cfg: T2MIRConfig, seed: int) -> float:
    """Mean cumulative regret over ``eval_horizon`` online steps in each task's :class:`BanditEnv`.

    The policy samples its predicted optimal arm from its own history (``model=None``: uniform random actions).
    """
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for i, means in enumerate(tasks_NA):
        env = BanditEnv(means, cfg.reward_std)
        env.reset(seed=seed * 1000 + i)
        acts: list[int] = []
        rews: list[float] = []
        for _ in range(cfg.eval_horizon):
            if model is None:
                a = int(torch.randint(0, cfg.num_arms, (1,), generator=gen))
            else:
                logits = model(torch.tensor([acts], dtype=torch.long).view(1, -1),
                               torch.tensor([rews], dtype=torch.float).view(1, -1))[0, -1]
                a = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            _, r, _, _, _ = env.step(a)
            acts.append(a)
            rews.append(float(r))
            total += float(means.max() - means[a])
    return total / len(tasks_NA)


@torch.no_grad()
def task_routing_purity(model: InContextPolicy, tasks_NA: torch.Tensor, cfg: T2MIRConfig, seed: int,
                        reps: int = 8) -> float:
    """Nearest-centroid accuracy of task identity from the task gate's sequence-mean logits (chance ``1/N``).

    Histories of each task are split in two: centroids from the first ``reps // 2``, accuracy on the rest.
    """
    assert model.moe is not None
    gen = torch.Generator().manual_seed(seed)
    N = len(tasks_NA)
    means = tasks_NA.repeat(reps, 1)
    a, r = random_histories(means, cfg.horizon, cfg.reward_std, gen)
    model(a, r)
    q_RNE = model.moe.last["task_logits_BSE"].mean(1).view(reps, N, -1)
    cent_NE = q_RNE[:reps // 2].mean(0)
    test_ME = q_RNE[reps // 2:].reshape(-1, q_RNE.shape[-1])
    pred = torch.cdist(test_ME, cent_NE).argmin(-1)
    return float((pred == torch.arange(N).repeat(reps - reps // 2)).float().mean())


@register_app("t2mir", config=T2MIRConfig,
              summary="T2MIR (§27): token-wise + task-wise MoE (contrastive router) in an in-context RL "
                      "transformer on gymnasium bandit tasks, vs the dense transformer and random actions")
def run(config: T2MIRConfig, out_dir: Path) -> dict:
    _env_base()
    rec = AppRun(out_dir, "t2mir", config)
    names = ("random", "dense", "t2mir")
    res: dict[str, list[float]] = {k: [] for k in names}
    purity: list[float] = []
    for seed in range(config.seeds):
        train_tasks = make_tasks(config.num_tasks, config.num_arms, seed)
        test_tasks = make_tasks(config.eval_tasks, config.num_arms, 10_000 + seed)
        dense, _ = train_policy(config, seed, False, train_tasks)
        moe, log = train_policy(config, seed, True, train_tasks)
        row = {"random": online_regret(None, test_tasks, config, seed),
               "dense": online_regret(dense, test_tasks, config, seed),
               "t2mir": online_regret(moe, test_tasks, config, seed)}
        pur = task_routing_purity(moe, train_tasks, config, seed)
        purity.append(pur)
        for k in names:
            res[k].append(row[k])
        rec.log({"seed": seed, **{f"regret_{k}": v for k, v in row.items()}, "task_routing_purity": pur,
                 "final_balance_loss": log["balance"], "final_contrastive_loss": log["contrastive"]})
    med = {k: median(v) for k, v in res.items()}

    def draw(fig, ax):
        for i, k in enumerate(names):
            ax.scatter([i] * len(res[k]), res[k], color=f"C{i}")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(f"cumulative regret over {config.eval_horizon} steps (held-out tasks)")
        ax.set_title("In-context RL on gymnasium bandits, one point per seed")
        ax.grid(alpha=0.3)
    rec.plot("regret", draw)
    return rec.finish({"app": "t2mir", "seeds": config.seeds, "median_regret": med,
                       "t2mir_minus_dense_regret": [a - b for a, b in zip(res["t2mir"], res["dense"], strict=True)],
                       "task_routing_purity": purity, "task_routing_chance": 1 / config.num_tasks})

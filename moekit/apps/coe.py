"""Composition of Experts (spec §25, SambaNova; from the abstract): a category router over several expert models.

Two-step routing (:class:`CompositionOfExperts`): a router (a classifier on the query embedding, trained on
labelled queries) maps a query ``x`` to a category ``c``; the category→expert map ``M(c) = argmax_e
(val_score(e, c) − cost_weight·cost(e))`` (:func:`category_expert_map`) picks one expert model, which alone answers
the query. The router is called once per query batch; only the chosen expert runs on each query.

Data (the spec's library demo): ``C`` synthetic task families. A query of family ``c`` is ``x ~ N(μ_c, I)`` in
``F`` dims; its answer is ``argmax(W_c x)`` over ``Y`` labels, with ``W_c`` drawn per family, so the families
conflict. Experts: one small MLP specialist per family plus one generalist MLP of the same size trained on all
families (the candidate pool); the router is a linear classifier. Baselines: the generalist alone (the same active
parameters as CoE's one expert) and a wide generalist with as many parameters as all experts together. The
serving side of the paper (tiered memory, swapping experts in) is not modelled.

Dims: N queries, F features, C categories, E experts, Y answer labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import AppRun, check_field, median
from .registry import register_app

__all__ = ["COEConfig", "CompositionOfExperts", "build_coe", "category_expert_map", "evaluate", "make_tasks", "run",
           "score_matrix"]


@dataclass(frozen=True, kw_only=True)
class COEConfig:
    """Composition-of-Experts application settings."""

    seeds: int = 3
    categories: int = 4
    features: int = 16
    labels: int = 4
    separation: float = 3.0
    hidden: int = 32
    num_train: int = 1500
    num_val: int = 500
    num_test: int = 2000
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    cost_weight: float = 0.0

    def __post_init__(self) -> None:
        n = type(self).__name__
        for f in ("seeds", "features", "hidden", "epochs", "batch_size"):
            check_field(getattr(self, f) >= 1, n, f, getattr(self, f), ">= 1")
        for f in ("categories", "labels"):
            check_field(getattr(self, f) >= 2, n, f, getattr(self, f), ">= 2")
        for f in ("num_train", "num_val", "num_test"):
            check_field(getattr(self, f) >= 10, n, f, getattr(self, f), ">= 10")
        check_field(self.separation >= 0, n, "separation", self.separation, ">= 0")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")
        check_field(self.cost_weight >= 0, n, "cost_weight", self.cost_weight, ">= 0")


def make_tasks(cfg: COEConfig, seed: int, n: int, split: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_NF, category_N, answer_N)`` for ``n`` queries; the families (``μ_c``, ``W_c``) depend on ``seed`` only."""
    g = torch.Generator().manual_seed(seed)
    mu_CF = cfg.separation * torch.randn(cfg.categories, cfg.features, generator=g)
    w_CYF = torch.randn(cfg.categories, cfg.labels, cfg.features, generator=g)
    g2 = torch.Generator().manual_seed(seed * 1000 + 7 + split)
    c_N = torch.randint(0, cfg.categories, (n,), generator=g2)
    x_NF = mu_CF[c_N] + torch.randn(n, cfg.features, generator=g2)
    y_N = torch.einsum("nyf,nf->ny", w_CYF[c_N], x_NF - mu_CF[c_N]).argmax(-1)
    return x_NF, c_N, y_N


def _mlp(f: int, h: int, y: int) -> nn.Module:
    return nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, y))


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: COEConfig, seed: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def score_matrix(experts: list[nn.Module], x_NF: torch.Tensor, c_N: torch.Tensor, y_N: torch.Tensor,
                 categories: int) -> torch.Tensor:
    """Validation accuracy of every expert on every category ``[E, C]`` (NaN where a category has no query)."""
    out = torch.full((len(experts), categories), float("nan"))
    for e, m in enumerate(experts):
        hit = (m(x_NF).argmax(-1) == y_N).float()
        for c in range(categories):
            if (c_N == c).any():
                out[e, c] = hit[c_N == c].mean()
    return out


def category_expert_map(scores_EC: torch.Tensor, cost_E: torch.Tensor | None = None,
                        cost_weight: float = 0.0) -> torch.Tensor:
    """``M(c) = argmax_e (score[e, c] − cost_weight·cost[e])`` ``[C]``; ties go to the lower expert index."""
    if torch.isnan(scores_EC).any():
        raise ValueError("every category needs a validation score for every expert; "
                         "give more validation queries (num_val)")
    adj = scores_EC if cost_E is None else scores_EC - cost_weight * cost_E[:, None]
    return adj.argmax(0)


class CompositionOfExperts(nn.Module):
    """``router`` (query → category logits), ``experts`` and the map ``M`` (category → expert index)."""

    def __init__(self, router: nn.Module, experts: list[nn.Module], expert_of_category: torch.Tensor) -> None:
        super().__init__()
        self.router, self.experts = router, nn.ModuleList(experts)
        self.expert_of_category: torch.Tensor
        self.register_buffer("expert_of_category", expert_of_category.clone())

    def route(self, x_NF: torch.Tensor) -> torch.Tensor:
        """Expert index per query ``[N]`` (one router call)."""
        return self.expert_of_category[self.router(x_NF).argmax(-1)]

    def forward(self, x_NF: torch.Tensor, category_N: torch.Tensor | None = None) -> torch.Tensor:
        """Answer logits ``[N, Y]``; ``category_N`` given: an oracle router (the router is not called)."""
        e_N = self.route(x_NF) if category_N is None else self.expert_of_category[category_N]
        out: torch.Tensor | None = None
        for e in e_N.unique().tolist():  # only the chosen expert runs on each query
            sel = e_N == e
            y = self.experts[e](x_NF[sel])
            if out is None:
                out = x_NF.new_zeros(len(x_NF), y.shape[-1])
            out[sel] = y
        if out is None:
            raise ValueError("no queries: give at least one query")
        return out


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build_coe(cfg: COEConfig, seed: int) -> tuple[CompositionOfExperts, dict[str, nn.Module]]:
    """Train the specialists, the generalist and the router; choose ``M`` on validation data."""
    x, c, y = make_tasks(cfg, seed, cfg.num_train)
    xv, cv, yv = make_tasks(cfg, seed, cfg.num_val, split=1)
    torch.manual_seed(seed)
    specialists = [_fit(_mlp(cfg.features, cfg.hidden, cfg.labels), x[c == k], y[c == k], cfg, seed + k)
                   for k in range(cfg.categories)]
    generalist = _fit(_mlp(cfg.features, cfg.hidden, cfg.labels), x, y, cfg, seed)
    router = _fit(nn.Linear(cfg.features, cfg.categories), x, c, cfg, seed)
    experts = [*specialists, generalist]
    cost_E = torch.tensor([float(_params(m)) for m in experts])
    m_C = category_expert_map(score_matrix(experts, xv, cv, yv, cfg.categories), cost_E / cost_E.max(),
                              cfg.cost_weight)
    width = cfg.hidden  # the smallest width with at least the parameters of all experts together
    while _params(_mlp(cfg.features, width, cfg.labels)) < sum(_params(m) for m in experts):
        width += 1
    wide = _fit(_mlp(cfg.features, width, cfg.labels), x, y, cfg, seed)
    return CompositionOfExperts(router, experts, m_C), {"generalist": generalist, "wide_generalist": wide}


def evaluate(cfg: COEConfig, seed: int) -> dict:
    """Train everything for ``seed`` and return test accuracies (CoE, oracle router, baselines) and sizes."""
    coe, baselines = build_coe(cfg, seed)
    xt, ct, yt = make_tasks(cfg, seed, cfg.num_test, split=2)

    def acc(logits: torch.Tensor) -> float:
        return float((logits.argmax(-1) == yt).float().mean())
    with torch.no_grad():
        return {"coe": acc(coe(xt)), "coe_oracle_router": acc(coe(xt, ct)),
                "router_accuracy": float((coe.router(xt).argmax(-1) == ct).float().mean()),
                **{k: acc(m(xt)) for k, m in baselines.items()},
                "coe_active_params": _params(coe.experts[0]) + _params(coe.router),
                "wide_generalist_params": _params(baselines["wide_generalist"]),
                "map": coe.expert_of_category.tolist()}


@register_app("coe", config=COEConfig,
              summary="Composition of Experts (§25): a category router over per-family expert models on synthetic "
                      "task families, vs one generalist of the same size and a wide one")
def run(config: COEConfig, out_dir: Path) -> dict:
    rec = AppRun(out_dir, "coe", config)
    res = []
    for seed in range(config.seeds):
        m = evaluate(config, seed)
        res.append(m)
        rec.log({"seed": seed, **m})
    kinds = ("generalist", "wide_generalist", "coe", "coe_oracle_router")
    med = {k: median([float(r[k]) for r in res]) for k in res[0] if k != "map"}

    def draw(fig, ax):
        for i, k in enumerate(kinds):
            ax.scatter([i] * len(res), [r[k] for r in res], color=f"C{i}")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_ylabel("test accuracy")
        ax.set_title("Synthetic task families, one point per seed")
        ax.grid(alpha=0.3)
    rec.plot("accuracy", draw)
    return rec.finish({"app": "coe", "seeds": config.seeds, "median": med})

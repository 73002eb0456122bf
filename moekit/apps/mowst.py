"""Mowst (spec §29; code facebookresearch/mowst-gnn @2e35699): a weak MLP and a strong GNN expert on graphs.

Confidence of the weak expert from its softmax ``p_NK`` (K classes), then ``C ← C^α``:

- ``var``: ``C = Var_k(p) / Var_k(onehot)`` (population variance over the K classes, ``Var(onehot) = (K−1)/K²``);
- ``ent``: ``C = 1 − H(p) / log K``.

(The learnable confidence — an MLP on the dispersion — is not built.) Per-node loss
``L = C·L_MLP + (1−C)·L_GNN`` (NLL). Alternating training: phase 1 updates the MLP with the GNN fixed (the gradient
flows through C as well), phase 2 updates the GNN with the MLP fixed; here one full-batch step of each per epoch
(a choice; the reference alternates blocks of epochs). Inference: ``q ~ U(0, 1)`` per node, the MLP's prediction
if ``q < C``, else the GNN's; accuracy averages ``m = 50`` draws.

Data: a stochastic block model graph generated with torch-geometric (no download), K blocks = classes, where
half of the nodes ("easy") carry features centred on their class and the other half pure noise, so only the
graph can classify the latter (the spec's demo). GNN: a 2-layer GCN; MLP: 2 layers; hidden 64.

Dims: N nodes, F features, K classes, H hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .common import AppRun, check_field, median
from .registry import register_app

__all__ = ["MowstConfig", "confidence", "make_sbm", "mowst_loss", "mowst_predict", "run"]


@dataclass(frozen=True, kw_only=True)
class MowstConfig:
    """Mowst application settings (spec defaults: hidden 64, 2 layers, NLL, m=50 draws)."""

    seeds: int = 3
    num_nodes: int = 600
    num_classes: int = 3
    num_features: int = 16
    p_in: float = 0.02
    p_out: float = 0.01
    easy_fraction: float = 0.5
    hidden: int = 64
    epochs: int = 150
    lr: float = 0.01
    confidence: Literal["var", "ent"] = "var"
    alpha: float = 1.0
    draws: int = 50

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_field(self.seeds >= 1, n, "seeds", self.seeds, ">= 1")
        check_field(self.num_nodes >= 4 * self.num_classes, n, "num_nodes", self.num_nodes,
                    f">= 4 * num_classes = {4 * self.num_classes}")
        check_field(self.num_classes >= 2, n, "num_classes", self.num_classes, ">= 2")
        check_field(self.num_features >= 1, n, "num_features", self.num_features, ">= 1")
        for f in ("p_in", "p_out", "easy_fraction"):
            check_field(0 <= getattr(self, f) <= 1, n, f, getattr(self, f), "a probability in [0, 1]")
        check_field(self.hidden >= 1, n, "hidden", self.hidden, ">= 1")
        check_field(self.epochs >= 1, n, "epochs", self.epochs, ">= 1")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")
        check_field(self.confidence in ("var", "ent"), n, "confidence", self.confidence, "var or ent")
        check_field(self.alpha > 0, n, "alpha", self.alpha, "> 0")
        check_field(self.draws >= 1, n, "draws", self.draws, ">= 1")


def confidence(p_NK: torch.Tensor, kind: str = "var", alpha: float = 1.0) -> torch.Tensor:
    """``C_N`` in [0, 1] from the weak expert's probabilities: 1 for a one-hot, 0 for uniform."""
    k = p_NK.shape[-1]
    if kind == "var":
        c = p_NK.var(dim=-1, unbiased=False) / ((k - 1) / k**2)
    elif kind == "ent":
        h = -(p_NK * p_NK.clamp_min(1e-12).log()).sum(-1)
        c = 1 - h / math.log(k)
    else:
        raise ValueError(f"confidence kind {kind!r} is not var or ent")
    return c.clamp(0, 1) ** alpha


def mowst_loss(mlp_logits_NK: torch.Tensor, gnn_logits_NK: torch.Tensor, y_N: torch.Tensor, kind: str = "var",
               alpha: float = 1.0, c_N: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over nodes of ``C·NLL_MLP + (1−C)·NLL_GNN`` (``c_N`` overrides the computed confidence)."""
    if c_N is None:
        c_N = confidence(torch.softmax(mlp_logits_NK, -1), kind, alpha)
    l_mlp = F.cross_entropy(mlp_logits_NK, y_N, reduction="none")
    l_gnn = F.cross_entropy(gnn_logits_NK, y_N, reduction="none")
    return (c_N * l_mlp + (1 - c_N) * l_gnn).mean()


def mowst_predict(mlp_logits_NK: torch.Tensor, gnn_logits_NK: torch.Tensor, c_N: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One inference draw: (predictions ``[N]``, ``[N]`` bool: the MLP decided)."""
    use_mlp_N = torch.rand(c_N.shape, generator=generator) < c_N
    return torch.where(use_mlp_N, mlp_logits_NK.argmax(-1), gnn_logits_NK.argmax(-1)), use_mlp_N


class _MLP(nn.Module):
    def __init__(self, f: int, h: int, k: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Dropout(0.5), nn.Linear(h, k))

    def forward(self, x_NF: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.net(x_NF)


class _GCN(nn.Module):
    def __init__(self, f: int, h: int, k: int) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv
        self.c1, self.c2 = GCNConv(f, h), GCNConv(h, k)

    def forward(self, x_NF: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.c1(x_NF, edge_index)), 0.5, self.training)
        return self.c2(h, edge_index)


def make_sbm(cfg: MowstConfig, seed: int) -> dict[str, torch.Tensor]:
    """SBM graph + features (half the nodes feature-separable) + a 50/25/25 split, all from ``seed``."""
    from torch_geometric.utils import stochastic_blockmodel_graph
    torch.manual_seed(seed)
    k, n = cfg.num_classes, cfg.num_nodes
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    probs = [[cfg.p_in if i == j else cfg.p_out for j in range(k)] for i in range(k)]
    edge_index = stochastic_blockmodel_graph(sizes, probs, directed=False)
    y = torch.repeat_interleave(torch.arange(k), torch.tensor(sizes))
    centres = torch.randn(k, cfg.num_features) * 1.5
    easy = torch.rand(n) < cfg.easy_fraction
    x = torch.randn(n, cfg.num_features) + easy[:, None] * centres[y]
    perm = torch.randperm(n)
    split = torch.zeros(n, dtype=torch.int64)
    split[perm[n // 2:3 * n // 4]] = 1
    split[perm[3 * n // 4:]] = 2
    return {"x": x, "y": y, "edge_index": edge_index, "easy": easy, "train": split == 0, "test": split == 2}


def _fit_single(model: nn.Module, g: dict, cfg: MowstConfig) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=5e-4)
    for _ in range(cfg.epochs):
        model.train()
        loss = F.cross_entropy(model(g["x"], g["edge_index"])[g["train"]], g["y"][g["train"]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def fit_mowst(g: dict, cfg: MowstConfig) -> tuple[nn.Module, nn.Module]:
    f, k = g["x"].shape[1], int(g["y"].max()) + 1
    mlp, gnn = _MLP(f, cfg.hidden, k), _GCN(f, cfg.hidden, k)
    opt_m = torch.optim.Adam(mlp.parameters(), lr=cfg.lr, weight_decay=5e-4)
    opt_g = torch.optim.Adam(gnn.parameters(), lr=cfg.lr, weight_decay=5e-4)
    tr, y = g["train"], g["y"][g["train"]]
    for _ in range(cfg.epochs):
        for phase in ("mlp", "gnn"):
            mlp.train(phase == "mlp")
            gnn.train(phase == "gnn")
            with torch.set_grad_enabled(True):
                m_out = mlp(g["x"], g["edge_index"])[tr]
                g_out = gnn(g["x"], g["edge_index"])[tr]
                if phase == "mlp":
                    g_out = g_out.detach()
                else:
                    m_out = m_out.detach()
                loss = mowst_loss(m_out, g_out, y, cfg.confidence, cfg.alpha)
            opt = opt_m if phase == "mlp" else opt_g
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mlp.eval(), gnn.eval()


@torch.no_grad()
def evaluate_mowst(mlp: nn.Module, gnn: nn.Module, g: dict, cfg: MowstConfig, seed: int) -> dict:
    te = g["test"]
    m_out, g_out = mlp(g["x"], g["edge_index"])[te], gnn(g["x"], g["edge_index"])[te]
    c = confidence(torch.softmax(m_out, -1), cfg.confidence, cfg.alpha)
    gen = torch.Generator().manual_seed(seed)
    accs, fracs = [], []
    for _ in range(cfg.draws):
        pred, used = mowst_predict(m_out, g_out, c, gen)
        accs.append(float((pred == g["y"][te]).float().mean()))
        fracs.append(float(used.float().mean()))
    easy = g["easy"][te]
    return {"mowst_acc": sum(accs) / len(accs), "mlp_decision_fraction": sum(fracs) / len(fracs),
            "mean_confidence": float(c.mean()), "confidence_easy": float(c[easy].mean()),
            "confidence_hard": float(c[~easy].mean())}


@torch.no_grad()
def _acc(model: nn.Module, g: dict) -> float:
    return float((model(g["x"], g["edge_index"])[g["test"]].argmax(-1) == g["y"][g["test"]]).float().mean())


@register_app("mowst", config=MowstConfig, requires=("torch_geometric",),
              summary="Mowst (§29): confidence-gated weak MLP + strong GCN experts on a generated SBM graph, "
                      "vs MLP and GCN alone")
def run(config: MowstConfig, out_dir: Path) -> dict:
    rec = AppRun(out_dir, "mowst", config)
    rows = []
    for seed in range(config.seeds):
        g = make_sbm(config, seed)
        f, k = g["x"].shape[1], config.num_classes
        torch.manual_seed(seed)
        mlp_acc = _acc(_fit_single(_MLP(f, config.hidden, k), g, config), g)
        gcn_acc = _acc(_fit_single(_GCN(f, config.hidden, k), g, config), g)
        torch.manual_seed(seed)
        m = evaluate_mowst(*fit_mowst(g, config), g, config, seed)
        row = {"seed": seed, "mlp_acc": mlp_acc, "gcn_acc": gcn_acc, **m}
        rows.append(row)
        rec.log(row)
    med = {key: median([r[key] for r in rows]) for key in rows[0] if key != "seed"}

    def draw(fig, ax):
        names = ["mlp_acc", "gcn_acc", "mowst_acc"]
        for i, r in enumerate(rows):
            ax.plot(names, [r[nm] for nm in names], "o-", alpha=0.7, label=f"seed {i}")
        ax.set_ylabel("test accuracy")
        ax.set_title("MLP vs GCN vs Mowst on an SBM graph (half the nodes feature-separable)")
        ax.legend()
        ax.grid(alpha=0.3)
    rec.plot("accuracy", draw)
    gain = [r["mowst_acc"] - max(r["mlp_acc"], r["gcn_acc"]) for r in rows]
    return rec.finish({"app": "mowst", "seeds": config.seeds, "median": med,
                       "mowst_minus_best_single": gain, "mowst_minus_best_single_median": median(gain)})

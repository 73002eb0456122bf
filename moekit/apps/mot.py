"""Mixture of Thoughts (spec §26, partly reconstructed): latent collaboration between heterogeneous frozen models.

M frozen expert models of different architectures (a Transformer encoder, a GRU and a residual 1-D CNN, each
with its own width ``d_m``) are each split into Q stacks. A light router on the query (mean of a small token
embedding → ``Linear`` → M logits) selects the top-K experts; the top-1 is the **primary**. After stack q every
active expert's hidden states ``h_m [B, S, d_m]`` are projected by its own adapter ``P_m^q: d_m → d_lat``; the
primary cross-attends (queries from its projected states, keys/values from the peers' projected states
concatenated along the sequence) and adds ``W_m^q · attn`` back to its own hidden states (``W_m^q: d_lat → d_m``,
zero-initialised so MoT starts as the primary alone). Only the primary's head predicts. Experts not in any row's
top-K run no forward pass; an expert runs only on the rows that selected it.

Trained: the router, the adapters, the cross-attention and the back projections; the backbones are frozen.
Objective: the primary's answer cross-entropy plus ``selection_coef`` × a router-selection cross-entropy whose
target is the expert with the lowest loss alone on that query (choice: the paper's auxiliary terms are not public).

Data (built here): queries are a task token followed by ``seq_len`` digits; the answer is one of 10 classes, from
one of four task families (sum mod 10, max, count of digits > 4, (first + last) mod 10). "Heterogeneous LLMs" are
scaled down to heterogeneous small sequence classifiers; each expert is trained (then frozen) mostly on its own
family, so no single expert is best everywhere. Choice: the answer is one token, so "decoding" is one prediction.

Dims: B queries, S tokens, M experts, K active experts per query, D_m expert width, L latent width, Q stacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import AppRun, check_field, median
from .registry import register_app

__all__ = ["ExpertLM", "MixtureOfThoughts", "MoTConfig", "make_tasks", "run"]

NUM_FAMILIES = 4
NUM_CLASSES = 10
VOCAB = 10 + NUM_FAMILIES


@dataclass(frozen=True, kw_only=True)
class MoTConfig:
    """Mixture of Thoughts settings (defaults: the figures in docs/applications.md)."""

    seeds: int = 3
    seq_len: int = 8
    num_train: int = 4000
    num_test: int = 2000
    specialist_share: float = 0.7
    expert_epochs: int = 6
    top_k: int = 2
    latent_dim: int = 32
    heads: int = 4
    selection_coef: float = 0.5
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3

    def __post_init__(self) -> None:
        n = type(self).__name__
        for f in ("seeds", "expert_epochs", "epochs", "batch_size", "latent_dim", "heads"):
            check_field(getattr(self, f) >= 1, n, f, getattr(self, f), ">= 1")
        check_field(2 <= self.seq_len <= 64, n, "seq_len", self.seq_len, "in [2, 64]")
        check_field(self.num_train >= 16, n, "num_train", self.num_train, ">= 16")
        check_field(self.num_test >= 16, n, "num_test", self.num_test, ">= 16")
        check_field(0 <= self.specialist_share <= 1, n, "specialist_share", self.specialist_share, "in [0, 1]")
        check_field(1 <= self.top_k <= 3, n, "top_k", self.top_k, "in [1, 3] (there are 3 experts)")
        check_field(self.latent_dim % self.heads == 0, n, "latent_dim", self.latent_dim,
                    f"a multiple of heads={self.heads}")
        check_field(self.selection_coef >= 0, n, "selection_coef", self.selection_coef, ">= 0")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")


# ----------------------------------------------------------------------------------------------------------- data

def answer(family_B: torch.Tensor, digits_BS: torch.Tensor) -> torch.Tensor:
    """The class of each query: family 0 sum mod 10, 1 max, 2 count of digits > 4 (mod 10), 3 first + last."""
    out = torch.stack([digits_BS.sum(1) % 10, digits_BS.max(1).values, (digits_BS > 4).sum(1) % 10,
                       (digits_BS[:, 0] + digits_BS[:, -1]) % 10], 1)
    return out.gather(1, family_B[:, None]).squeeze(1)


def make_tasks(n: int, seq_len: int, seed: int, family_probs: torch.Tensor | None = None):
    """``(x_BS, y_B, family_B)``: token 0 is ``10 + family``, then ``seq_len`` digits."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.full((NUM_FAMILIES,), 1 / NUM_FAMILIES) if family_probs is None else family_probs
    fam = torch.multinomial(probs, n, replacement=True, generator=g)
    digits = torch.randint(0, 10, (n, seq_len), generator=g)
    x = torch.cat([(10 + fam)[:, None], digits], 1)
    return x, answer(fam, digits), fam


# ------------------------------------------------------------------------------------------------------- experts

class ExpertLM(nn.Module):
    """A small sequence classifier split into stacks: ``embed → stacks[0] → … → head`` (mean-pooled).

    ``kind``: ``transformer`` (one encoder layer per stack), ``gru`` (one GRU layer per stack) or ``cnn`` (a
    residual kernel-3 convolution per stack).
    """

    def __init__(self, kind: str, dim: int, num_stacks: int = 2) -> None:
        super().__init__()
        self.kind, self.dim = kind, dim
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(65, dim) * 0.1)
        if kind == "transformer":
            self.stacks = nn.ModuleList([nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
                                         for _ in range(num_stacks)])
        elif kind == "gru":
            self.stacks = nn.ModuleList([_GRUStack(dim) for _ in range(num_stacks)])
        elif kind == "cnn":
            self.stacks = nn.ModuleList([_ConvStack(dim) for _ in range(num_stacks)])
        else:
            raise ValueError(f"kind={kind!r} is not one of transformer, gru, cnn")
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, NUM_CLASSES))

    def embed_tokens(self, x_BS: torch.Tensor) -> torch.Tensor:
        return self.embed(x_BS) + self.pos[:x_BS.shape[1]]

    def readout(self, h_BSD: torch.Tensor) -> torch.Tensor:
        return self.head(h_BSD.mean(1))

    def forward(self, x_BS: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(x_BS)
        for s in self.stacks:
            h = s(h)
        return self.readout(h)


class _GRUStack(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, h_BSD: torch.Tensor) -> torch.Tensor:
        return h_BSD + self.gru(h_BSD)[0]


class _ConvStack(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)

    def forward(self, h_BSD: torch.Tensor) -> torch.Tensor:
        return h_BSD + F.relu(self.conv(h_BSD.transpose(1, 2))).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------- MoT

class MixtureOfThoughts(nn.Module):
    """Router + per-expert, per-stack adapters + per-stack cross-attention over frozen :class:`ExpertLM` s."""

    def __init__(self, experts: list[ExpertLM], *, top_k: int = 2, latent_dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k={top_k} must be in [1, {len(experts)}] (the number of experts)")
        num_stacks = len(experts[0].stacks)
        if any(len(e.stacks) != num_stacks for e in experts):
            raise ValueError("every expert must have the same number of stacks")
        self.experts = nn.ModuleList(experts)
        self.experts.requires_grad_(False)
        self.top_k, self.num_stacks = top_k, num_stacks
        self.router_embed = nn.Embedding(VOCAB, 16)
        self.router = nn.Linear(16, len(experts))
        self.adapters = nn.ModuleList([nn.ModuleList([nn.Linear(e.dim, latent_dim) for _ in range(num_stacks)])
                                       for e in experts])
        self.cross = nn.ModuleList([nn.MultiheadAttention(latent_dim, heads, batch_first=True)
                                    for _ in range(num_stacks)])
        self.back = nn.ModuleList([nn.ModuleList([nn.Linear(latent_dim, e.dim) for _ in range(num_stacks)])
                                   for e in experts])
        for lin in self.back.modules():
            if isinstance(lin, nn.Linear):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def router_logits(self, x_BS: torch.Tensor) -> torch.Tensor:
        return self.router(self.router_embed(x_BS).mean(1))

    def forward(self, x_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(answer logits [B, 10], router logits [B, M], selected experts [B, K])``; column 0 is the primary."""
        B = x_BS.shape[0]
        logits_BM = self.router_logits(x_BS)
        sel_BK = logits_BM.topk(self.top_k, dim=-1).indices
        M = len(self.experts)
        experts: list[Any] = list(self.experts)
        adapters: Any = self.adapters
        back: Any = self.back
        cross: Any = self.cross
        # rows each expert runs on, and each row's position inside that expert's sub-batch
        rows = [torch.nonzero((sel_BK == m).any(1)).squeeze(1) for m in range(M)]
        pos_MB = torch.full((M, B), -1, dtype=torch.long)
        for m in range(M):
            pos_MB[m, rows[m]] = torch.arange(len(rows[m]))
        active = [m for m in range(M) if len(rows[m])]
        h = {m: experts[m].embed_tokens(x_BS[rows[m]]) for m in active}
        for q in range(self.num_stacks):
            for m in active:
                h[m] = experts[m].stacks[q](h[m])
            if self.top_k == 1:
                continue
            z = {m: adapters[m][q](h[m]) for m in active}
            for m in active:
                prim_P = torch.nonzero(sel_BK[:, 0] == m).squeeze(1)
                if not len(prim_P):
                    continue
                peers = []
                for j in range(1, self.top_k):
                    peer_P = sel_BK[prim_P, j]
                    kv_PSL = torch.zeros(len(prim_P), x_BS.shape[1], z[m].shape[-1], dtype=z[m].dtype)
                    for p in peer_P.unique().tolist():
                        at = peer_P == p
                        kv_PSL = kv_PSL.index_put((torch.nonzero(at).squeeze(1),), z[p][pos_MB[p, prim_P[at]]])
                    peers.append(kv_PSL)
                kv = torch.cat(peers, 1)
                att_PSL = cross[q](z[m][pos_MB[m, prim_P]], kv, kv, need_weights=False)[0]
                h[m] = h[m].index_add(0, pos_MB[m, prim_P], back[m][q](att_PSL))
        out_BC = torch.zeros(B, NUM_CLASSES, dtype=logits_BM.dtype)
        for m in active:
            prim_P = torch.nonzero(sel_BK[:, 0] == m).squeeze(1)
            if len(prim_P):
                out_BC = out_BC.index_put((prim_P,), experts[m].readout(h[m][pos_MB[m, prim_P]]))
        return out_BC, logits_BM, sel_BK

    def loss(self, x_BS: torch.Tensor, y_B: torch.Tensor, best_B: torch.Tensor, selection_coef: float):
        """``(total, answer CE, selection CE)``: the primary's answer loss plus the weighted router-selection loss."""
        out_BC, logits_BM, _ = self(x_BS)
        task = F.cross_entropy(out_BC, y_B)
        sel = F.cross_entropy(logits_BM, best_B)
        return task + selection_coef * sel, task, sel


# -------------------------------------------------------------------------------------------------------- runs

EXPERT_KINDS = (("transformer", 32), ("gru", 48), ("cnn", 40))


def train_experts(cfg: MoTConfig, seed: int) -> list[ExpertLM]:
    """Three heterogeneous experts, expert m trained mostly (``specialist_share``) on family m, then frozen."""
    experts = []
    for m, (kind, dim) in enumerate(EXPERT_KINDS):
        torch.manual_seed(seed * 10 + m)
        probs = torch.full((NUM_FAMILIES,), (1 - cfg.specialist_share) / (NUM_FAMILIES - 1))
        probs[m] = cfg.specialist_share
        x, y, _ = make_tasks(cfg.num_train, cfg.seq_len, seed * 100 + m, probs)
        e = ExpertLM(kind, dim)
        _fit(e, lambda xb, yb, e=e: F.cross_entropy(e(xb), yb), x, y, cfg.expert_epochs, cfg.batch_size, 3e-3, seed)
        experts.append(e.eval())
    return experts


def _fit(module: nn.Module, loss_fn, x, y, epochs: int, batch_size: int, lr: float, seed: int, extra=None):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        module.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = loss_fn(x[idx], y[idx]) if extra is None else loss_fn(x[idx], y[idx], extra[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    module.eval()


@torch.no_grad()
def best_expert(experts: list[ExpertLM], x_BS: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
    """The expert with the lowest loss alone on each query (the router-selection target)."""
    losses_MB = torch.stack([F.cross_entropy(e(x_BS), y_B, reduction="none") for e in experts])
    return losses_MB.argmin(0)


def train_mot(experts: list[ExpertLM], cfg: MoTConfig, seed: int, top_k: int) -> MixtureOfThoughts:
    torch.manual_seed(seed)
    mot = MixtureOfThoughts(experts, top_k=top_k, latent_dim=cfg.latent_dim, heads=cfg.heads)
    x, y, _ = make_tasks(cfg.num_train, cfg.seq_len, seed * 100 + 50)
    best = best_expert(experts, x, y)
    _fit(mot, lambda xb, yb, bb: mot.loss(xb, yb, bb, cfg.selection_coef)[0], x, y, cfg.epochs, cfg.batch_size,
         cfg.lr, seed, extra=best)
    mot.experts.eval()
    return mot


@torch.no_grad()
def accuracy(logits_BC: torch.Tensor, y_B: torch.Tensor) -> float:
    return float((logits_BC.argmax(-1) == y_B).float().mean())


@register_app("mot", config=MoTConfig,
              summary="Mixture of Thoughts (§26): router + cross-attention between three frozen heterogeneous "
                      "experts on four synthetic task families, vs each expert and the router alone")
def run(config: MoTConfig, out_dir: Path) -> dict:
    rec = AppRun(out_dir, "mot", config)
    names = ("best_single", "router_top1", "mot", "oracle_single")
    res: dict[str, list[float]] = {k: [] for k in names}
    for seed in range(config.seeds):
        experts = train_experts(config, seed)
        xt, yt, ft = make_tasks(config.num_test, config.seq_len, seed * 100 + 99)
        with torch.no_grad():
            single = [accuracy(e(xt), yt) for e in experts]
            correct_MB = torch.stack([e(xt).argmax(-1) == yt for e in experts])
        router = train_mot(experts, config, seed, 1)
        mot = train_mot(experts, config, seed, config.top_k)
        with torch.no_grad():
            r_out, _, _ = router(xt)
            m_out, _, m_sel = mot(xt)
        row = {"best_single": max(single), "router_top1": accuracy(r_out, yt), "mot": accuracy(m_out, yt),
               "oracle_single": float(correct_MB.any(0).float().mean())}
        for k in names:
            res[k].append(row[k])
        primary_by_family = [[int((m_sel[ft == f, 0] == m).sum()) for m in range(len(experts))]
                             for f in range(NUM_FAMILIES)]
        rec.log({"seed": seed, "single": single, **row, "primary_by_family": primary_by_family})
    med = {k: median(v) for k, v in res.items()}

    def draw(fig, ax):
        for i, k in enumerate(names):
            ax.scatter([i] * len(res[k]), res[k], color=f"C{i}")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("test accuracy")
        ax.set_title("Four task families, three frozen heterogeneous experts, one point per seed")
        ax.grid(alpha=0.3)
    rec.plot("accuracy", draw)
    return rec.finish({"app": "mot", "seeds": config.seeds, "median": med,
                       "mot_minus_best_single": [a - b for a, b in zip(res["mot"], res["best_single"], strict=True)],
                       "mot_minus_router_top1": [a - b for a, b in zip(res["mot"], res["router_top1"],
                                                                        strict=True)]})

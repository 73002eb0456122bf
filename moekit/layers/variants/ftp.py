"""FTP: fine-grained token-wise pruning through a learned router (compression-adaptation-serving.md §40; no code
released, loss forms reconstructed).

Dim legend: B batch, S sequence, D model dim, L blocks, H heads, F = 4 router features.

Before block ``b`` a router decides per token whether to process it or skip the block (its hidden state passes
unchanged). The router is a 2-layer MLP on four low-dimensional per-token features, not on the hidden state::

    f_t = (t / (S - 1), a_t, rank(a_t) / (S - 1), s_b)          position, attention score, its rank, sparsity
    keep_t = sigmoid(MLP(f_t))                                   F -> hidden -> 1
    h_t <- h_t + m_t * delta_b(h)_t                              m = keep (training, soft) or keep > 0.5 (eval)

``a_t`` is the attention token ``t`` receives in the previous block (the mean over its heads and over the queries
that can see it, from ``ctx.state["attention.probs"]``; 0 before the first block). ``s_b`` is block ``b``'s
sparsity requirement (``sparsity``: one value for every block or a list per block; a block with ``s_b = 0``
processes every token, so a target of 0 is the dense model exactly). The *static router* (the scheduler's
scorer, our reading of the spec) skips the ``s_b`` fraction of tokens with the lowest attention score.

Training (the training-step hook :meth:`TokenPruner.training_step`): a no-gradient dense pass gives the teacher
logits; the routed pass gives three losses, each weighted: a guide loss (BCE of ``keep`` toward the static
router's decisions), a sparsity loss (``(1 - mean keep - s_b)^2`` averaged over blocks) and a distillation loss
(``KL(teacher || student)`` per token). The LLM stays frozen: the block updates enter the routed pass detached,
so the routers learn through the residual stream only (a first-order substitute for back-propagating through
frozen blocks) and no block parameter receives a gradient; the reported CE is not back-propagated, and the step
names the routers as its only trainable parameters (``StepLoss.trainable``: the head and embedding, which the
distillation loss reaches, stay frozen too).
Blocks run on every token and the decision selects (the result of skipping, not its compute saving). The genetic
search of per-block ratios (the sparsity scheduler) is not implemented: ``sparsity`` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check
from ...types import RoutingContext
from ..attention.registry import ATTENTION_PROBS_KEY
from ..step_hook import Forward, StepLoss, next_token_ce
from ._common import add_extra

__all__ = ["DENSE_KEY", "FTPConfig", "TokenPruner", "attention_received", "router_features", "static_keep"]

P = "model.depth_routing"
DENSE_KEY = "ftp.dense"  # ctx.state: True runs every token through every block (the teacher pass)
KEEP_KEY = "ftp.keep"  # ctx.state: list of [B, S] keep probabilities, one per block
STATIC_KEY = "ftp.static"  # ctx.state: list of [B, S] static-router decisions


@dataclass(frozen=True, kw_only=True, slots=True)
class FTPConfig:
    """Attributes:
        sparsity: skip ratio ``s_b`` of every block (a number) or of each block (a list of ``num_layers``).
        hidden: the router MLP's hidden width.
        guide_coef, sparsity_coef, distill_coef: weights of the three router losses.
        router: ``learned`` (the dynamic router) or ``static`` (the attention-score rule).
    """

    sparsity: float | tuple[float, ...] = 0.25
    hidden: int = 16
    guide_coef: float = 1.0
    sparsity_coef: float = 1.0
    distill_coef: float = 1.0
    router: str = "learned"

    def __post_init__(self) -> None:
        values = self.sparsity if isinstance(self.sparsity, (list, tuple)) else [self.sparsity]
        check(all(0.0 <= float(s) < 1.0 for s in values), f"{P}.sparsity={self.sparsity!r} must be in [0, 1)")
        check(isinstance(self.hidden, int) and self.hidden >= 1, f"{P}.hidden={self.hidden!r} must be >= 1")
        for name in ("guide_coef", "sparsity_coef", "distill_coef"):
            check(getattr(self, name) >= 0, f"{P}.{name}={getattr(self, name)} must be >= 0")
        check(self.router in ("learned", "static"), f"{P}.router={self.router!r} must be 'learned' or 'static'")

    def schedule(self, num_layers: int) -> list[float]:
        if isinstance(self.sparsity, (list, tuple)):
            check(len(self.sparsity) == num_layers, f"{P}.sparsity has {len(self.sparsity)} values but the model "
                                                    f"has {num_layers} blocks; give one per block or a single number")
            return [float(s) for s in self.sparsity]
        return [float(self.sparsity)] * num_layers


def attention_received(probs_BHSS: torch.Tensor | None, B: int, S: int, device) -> torch.Tensor:
    """``[B, S]`` mean attention each key receives from the queries that can see it (0 without probabilities)."""
    if probs_BHSS is None or probs_BHSS.shape[-2:] != (S, S):
        return torch.zeros(B, S, device=device)
    seen_by = torch.arange(S, 0, -1, device=device, dtype=probs_BHSS.dtype)  # key j is visible to S - j queries
    return (probs_BHSS.float().mean(1).sum(1) / seen_by).detach()


def router_features(score_BS: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``[B, S, 4]``: position, attention score, rank of the score (0 = highest), sparsity, each in [0, 1]."""
    B, S = score_BS.shape
    norm = max(S - 1, 1)
    pos = torch.arange(S, device=score_BS.device, dtype=torch.float32).expand(B, S) / norm
    rank = score_BS.argsort(-1, descending=True).argsort(-1).float() / norm
    return torch.stack((pos, score_BS.float(), rank, torch.full_like(pos, sparsity)), dim=-1)


def static_keep(score_BS: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``[B, S]`` 0/1: skip the ``round(sparsity * S)`` tokens of lowest attention score per sequence."""
    S = score_BS.shape[1]
    skip = round(sparsity * S)
    keep = torch.ones_like(score_BS, dtype=torch.float32)
    if skip:
        keep.scatter_(1, score_BS.argsort(-1)[:, :skip], 0.0)
    return keep


class TokenPruner(nn.Module):
    """Per-block token routers: ``forward(x_BSD, deltas, ctx)`` runs the blocks, skipping the pruned tokens."""

    reads_attention = True

    def __init__(self, num_layers: int, config: FTPConfig | None = None, name: str = "ftp") -> None:
        super().__init__()
        self.config, self.name = config or FTPConfig(), name
        self.sparsity = self.config.schedule(num_layers)
        self.routers = nn.ModuleList(nn.Sequential(nn.Linear(4, self.config.hidden), nn.GELU(),
                                                   nn.Linear(self.config.hidden, 1)) for _ in range(num_layers))

    def forward(self, x_BSD: torch.Tensor, deltas: list[Callable[[torch.Tensor, RoutingContext], torch.Tensor]],
                ctx: RoutingContext) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        dense = bool(ctx.state.get(DENSE_KEY, False))
        frozen = self.training and not dense  # the routed training pass: the LLM gets no gradient
        keeps, statics, used = [], [], []
        ctx.state.pop(ATTENTION_PROBS_KEY, None)
        for i, delta in enumerate(deltas):
            s = self.sparsity[i]
            score_BS = attention_received(ctx.state.get(ATTENTION_PROBS_KEY), B, S, x_BSD.device)
            keep_BS = torch.sigmoid(self.routers[i](router_features(score_BS, s)).squeeze(-1))
            static_BS = static_keep(score_BS, s)
            if dense or s == 0.0:
                m_BS = torch.ones_like(keep_BS)
            elif self.config.router == "static":
                m_BS = static_BS
            elif self.training:
                m_BS = keep_BS
            else:
                m_BS = (keep_BS > 0.5).float()
            d_BSD = delta(x_BSD, ctx)
            if frozen:
                d_BSD = d_BSD.detach()
            x_BSD = x_BSD + m_BS[..., None].to(d_BSD.dtype) * d_BSD
            keeps.append(keep_BS)
            statics.append(static_BS)
            used.append(m_BS.detach())
        ctx.state[KEEP_KEY], ctx.state[STATIC_KEY] = keeps, statics
        skipped = 1 - torch.stack(used).mean()
        add_extra(ctx, self.name, token_sparsity=skipped,
                  **{f"skip_ratio_{i}": 1 - u.mean() for i, u in enumerate(used)})
        return x_BSD

    @staticmethod
    def training_step(modules: list[TokenPruner], forward: Forward, targets_BS: torch.Tensor,
                      collect_stats: bool) -> StepLoss:
        """Guide + sparsity + distillation losses for the routers; the LLM stays frozen."""
        self = modules[0]
        c = self.config
        with torch.no_grad():
            teacher = RoutingContext()
            teacher.state[DENSE_KEY] = True
            teacher_BSV, _ = forward(teacher)
        logits_BSV, ctx = forward(RoutingContext(collect_stats=collect_stats))
        ce = next_token_ce(logits_BSV, targets_BS)
        keeps, statics = ctx.state[KEEP_KEY], ctx.state[STATIC_KEY]
        routed = [i for i, s in enumerate(self.sparsity) if s > 0]
        zero = logits_BSV.new_zeros(()).float()
        guide = sum((F.binary_cross_entropy(keeps[i], statics[i]) for i in routed), zero) / max(len(routed), 1)
        sparse = sum(((1 - keeps[i].mean() - self.sparsity[i]) ** 2 for i in routed), zero) / max(len(routed), 1)
        distill = F.kl_div(logits_BSV.float().log_softmax(-1), teacher_BSV.float().log_softmax(-1),
                           log_target=True, reduction="none").sum(-1).mean()
        for name, coef, value in (("ftp_guide_loss", c.guide_coef, guide), ("ftp_sparsity_loss", c.sparsity_coef,
                                  sparse), ("ftp_distill_loss", c.distill_coef, distill)):
            ctx.add_loss(name, coef * value)
        aux = ctx.total_loss()
        assert isinstance(aux, torch.Tensor)
        routers = [p for m in modules for p in m.parameters()]
        return StepLoss(loss=ce.detach() + aux, ce=ce, aux=aux, ctx=ctx, logits_BSV=logits_BSV, trainable=routers)

"""Mixture-of-Depths (MoD; Raposo et al. 2024, arXiv 2404.02258): expert-choice routing over depth.

Dim legend: B batch, S sequence, K = C selected tokens per sequence, D model dim.

A wrapper around a block callable ``block(x_BKD, ctx) -> f_BKD`` (the block's *delta*: attention + MLP without
the residual, computed among the selected tokens only)::

    r_t = w^T x_t                                  (scalar router)
    K = max(1, floor(c * S)) tokens with the largest r per sequence, kept in causal order (floor computed
                                   exactly: c = 0.29, S = 100 keeps 29 tokens)
    x_t <- x_t + r_t * f(X_sel)_t   for selected t;   x_t unchanged otherwise

(c = 12.5 % with MoD every other block, the paper's best setting.) The selected positions are put in
``ctx.state["depth.positions"]`` (``POSITIONS_KEY``, ``[B, K]`` int64; ``None`` when every position runs)
before the block runs, so that the model's block can gather
RoPE positions and build its causal mask over them. Top-k over the sequence is not causal; the router is also
trained with ``mod_router_loss`` (BCE of ``r`` against top-k membership, coefficient ``aux_coef``) and
``eval_mode="threshold"`` selects tokens with ``sigmoid(r) > 0.5`` one by one (computed densely, masked).
Statistics: ``fraction_processed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...routing.selectors import token_count
from ...types import RoutingContext
from ._common import add_extra

__all__ = ["MoDConfig", "MixtureOfDepths", "select_tokens", "POSITIONS_KEY"]

POSITIONS_KEY = "depth.positions"  # shared by every depth router (MoD, MoR): the model reads it
Block = Callable[[torch.Tensor, "RoutingContext | None"], torch.Tensor]


@dataclass(frozen=True, kw_only=True, slots=True)
class MoDConfig:
    """Attributes:
        capacity: c, the fraction of each sequence's tokens the block processes (paper: 0.125).
        aux_coef: coefficient of the BCE router loss that trains the causal inference path; 0 disables.
        eval_mode: ``topk`` (same as training) or ``threshold`` (causal: ``sigmoid(r) > 0.5``).
    """

    capacity: float = 0.125
    aux_coef: float = 0.01
    eval_mode: Literal["topk", "threshold"] = "topk"

    def __post_init__(self) -> None:
        check(0 < self.capacity <= 1, f"variant.capacity={self.capacity} must be in (0, 1] (paper: 0.125)")
        check(self.aux_coef >= 0, f"variant.aux_coef={self.aux_coef} must be >= 0")
        check_choice("variant", "eval_mode", self.eval_mode, ("topk", "threshold"))


def select_tokens(scores_BS: torch.Tensor, k: int, candidates_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence, the positions ``[B, k]`` of the ``k`` best scores (among ``candidates``), in causal order."""
    if candidates_BS is not None:
        scores_BS = scores_BS.masked_fill(~candidates_BS, float("-inf"))
    return scores_BS.detach().topk(k, dim=1).indices.sort(dim=1).values


def gather_BKD(x_BSD: torch.Tensor, pos_BK: torch.Tensor) -> torch.Tensor:
    return x_BSD.gather(1, pos_BK[..., None].expand(-1, -1, x_BSD.shape[-1]))


class MixtureOfDepths(nn.Module):
    """MoD router around a block: ``forward(x_BSD, block, ctx=None) -> x_BSD``."""

    def __init__(self, dim: int, config: MoDConfig | None = None, name: str = "mod") -> None:
        super().__init__()
        self.config, self.name = config or MoDConfig(), name
        self.router = nn.Linear(dim, 1, bias=False)
        nn.init.normal_(self.router.weight, std=dim**-0.5)

    def forward(self, x_BSD: torch.Tensor, block: Block, ctx: RoutingContext | None = None) -> torch.Tensor:
        c = self.config
        B, S, D = x_BSD.shape
        r_BS = F.linear(x_BSD.float(), self.router.weight.float())[..., 0]
        if not self.training and c.eval_mode == "threshold":
            take_BS = r_BS.sigmoid() > 0.5
            if ctx is not None:
                ctx.state[POSITIONS_KEY] = None  # the block runs on every position
            delta_BSD = block(x_BSD, ctx)
            add_extra(ctx, self.name, fraction_processed=take_BS.float().mean())
            return x_BSD + (take_BS * r_BS)[..., None].to(x_BSD.dtype) * delta_BSD
        k = token_count(c.capacity, S)
        pos_BK = select_tokens(r_BS, k)
        if ctx is not None:
            ctx.state[POSITIONS_KEY] = pos_BK
            if c.aux_coef > 0:
                target_BS = torch.zeros_like(r_BS).scatter_(1, pos_BK, 1.0)
                ctx.add_loss("mod_router_loss",
                             c.aux_coef * F.binary_cross_entropy_with_logits(r_BS, target_BS), self.name)
        x_BKD = gather_BKD(x_BSD, pos_BK)
        delta_BKD = block(x_BKD, ctx)
        gate_BK = r_BS.gather(1, pos_BK)[..., None].to(x_BSD.dtype)
        add_extra(ctx, self.name, fraction_processed=k / S)
        return x_BSD.scatter_add(1, pos_BK[..., None].expand(-1, -1, D), gate_BK * delta_BKD)

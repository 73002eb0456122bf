"""Mixture-of-Recursions (MoR; Bae et al. 2025, arXiv 2507.10524, github raymin0223/mixture_of_recursions):
expert-choice routing over recursion depth of one shared block.

Dim legend: B batch, S sequence, K_r tokens selected at step r, D model dim.

A wrapper around a shared block callable ``block(x_BKD, ctx) -> out_BKD`` (the block's *full output hidden state*,
its internal residuals included), applied ``N_r`` times. At step ``r``, on the tokens still active::

    g_t = alpha * sigmoid(theta_r^T H_t / temperature)
    K_r = max(1, floor(capacity_r * S))  best g among the tokens selected at step r-1 (hierarchical filtering;
                                          S is the full sequence length; exact floor), kept in causal order
    H_t <- H_t + g_t * Block(H_sel)_t   for selected t;  unselected tokens are unchanged

As the spec notes, the update adds the block's full output (``H + g Block(H)``), not a delta; reproduced as is.
Capacities default to ``N_r/N_r, (N_r-1)/N_r, ..., 1/N_r``. The selected positions of each step go to
``ctx.state["depth.positions"]`` (``POSITIONS_KEY``, shared with MoD; for the block's RoPE positions and
mask). The causal inference path is trained with
``mor_router_loss``: BCE between router logits and top-k membership over that step's candidates (averaged).
Statistics: ``fraction_processed`` (mean over steps of K_r / S) and ``mean_depth`` (recursions per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check
from ...routing.selectors import token_count
from ...types import RoutingContext
from ._common import add_extra
from .mod import POSITIONS_KEY, Block, gather_BKD, select_tokens

__all__ = ["MoRConfig", "MixtureOfRecursions", "POSITIONS_KEY"]




@dataclass(frozen=True, kw_only=True, slots=True)
class MoRConfig:
    """Attributes:
        num_recursions: N_r (paper: 2-4).
        capacities: per-step fraction of the sequence; empty means ``(N_r - r) / N_r`` for r = 0..N_r-1.
        alpha: gate scale (0.1 assumed, from memory of the code's default; verify).
        temperature: router temperature.
        aux_coef: coefficient of the BCE router loss; 0 disables.
    """

    num_recursions: int = 3
    capacities: tuple[float, ...] = ()
    alpha: float = 0.1
    temperature: float = 1.0
    aux_coef: float = 0.01

    def __post_init__(self) -> None:
        check(self.num_recursions >= 1, f"variant.num_recursions={self.num_recursions} must be >= 1")
        check(not self.capacities or len(self.capacities) == self.num_recursions,
              f"variant.capacities has {len(self.capacities)} entries; give one per recursion "
              f"({self.num_recursions}) or none for the default schedule")
        check(all(0 < c <= 1 for c in self.capacities), f"variant.capacities={self.capacities} must be in (0, 1]")
        check(self.temperature > 0 and self.aux_coef >= 0, "variant.temperature must be > 0, aux_coef >= 0")

    def schedule(self) -> tuple[float | Fraction, ...]:
        """Capacity of each recursion: ``capacities`` or the exact fractions ``(N_r - r) / N_r``."""
        n = self.num_recursions
        return self.capacities or tuple(Fraction(n - r, n) for r in range(n))


class MixtureOfRecursions(nn.Module):
    """``forward(x_BSD, block, ctx=None)``: the shared block applied up to ``N_r`` times per token."""

    def __init__(self, dim: int, config: MoRConfig | None = None, name: str = "mor") -> None:
        super().__init__()
        self.config, self.name = config or MoRConfig(), name
        self.routers = nn.ModuleList(nn.Linear(dim, 1, bias=False) for _ in range(self.config.num_recursions))

    def forward(self, x_BSD: torch.Tensor, block: Block, ctx: RoutingContext | None = None) -> torch.Tensor:
        c = self.config
        B, S, D = x_BSD.shape
        h_BSD = x_BSD
        candidates_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        depth_BS = torch.zeros(B, S, device=x_BSD.device)
        fractions = []
        for router, cap in zip(self.routers, c.schedule()):
            assert isinstance(router, nn.Linear)
            logit_BS = F.linear(h_BSD.float(), router.weight.float())[..., 0] / c.temperature
            k = min(token_count(cap, S), int(candidates_BS.sum(1).min()))
            pos_BK = select_tokens(logit_BS, k, candidates_BS)
            selected_BS = torch.zeros_like(candidates_BS).scatter_(1, pos_BK, True)
            if ctx is not None:
                ctx.state[POSITIONS_KEY] = pos_BK
                if c.aux_coef > 0:
                    bce = F.binary_cross_entropy_with_logits(logit_BS[candidates_BS],
                                                             selected_BS[candidates_BS].float())
                    ctx.add_loss("mor_router_loss", c.aux_coef * bce, self.name)
            gate_BK = (c.alpha * logit_BS.sigmoid()).gather(1, pos_BK)[..., None].to(x_BSD.dtype)
            out_BKD = block(gather_BKD(h_BSD, pos_BK), ctx)
            h_BSD = h_BSD.scatter_add(1, pos_BK[..., None].expand(-1, -1, D), gate_BK * out_BKD)
            candidates_BS, depth_BS = selected_BS, depth_BS + selected_BS
            fractions.append(k / S)
        add_extra(ctx, self.name, fraction_processed=sum(fractions) / len(fractions),
                  mean_depth=depth_BS.mean())
        return h_BSD

"""MoME, Mixture of Matryoshka Experts (spec §22, [abs + summaries], partly reconstructed).

Dim legend: B batch, S sequence, D model dim, T tokens, I input, O output features, E experts, K slots, R rank.

A MoME module sits in parallel with a frozen projection: top-k routed lightweight (LoRA) experts plus a shared
expert every token uses, ``y = W x + shared(x) + sum_k w_k E_k(x)``. **One router serves every compression
scale**: the same module (same router parameters) is applied to the token sequence pooled at each rate, so a
token tends to pick the same experts at every granularity. Training sums the loss over the rates
(:func:`multiscale_loss`); inference runs any single rate. :func:`pool_sequence` is the Matryoshka compression
(average pooling of ``rate`` consecutive tokens) and :func:`cross_scale_agreement` measures how often a pooled
token's top expert equals the top expert of the tokens it pools. Choices made: LoRA experts (rank R) and one
shared LoRA expert; average pooling (not stacking); the losses are averaged over rates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..configs import check
from ..routing import Router, RouterConfig
from ..types import RoutingContext
from .core import LinearAdapter
from .experts import LoRAExperts, dense_weights, record_routing

__all__ = ["MoME", "MoMEConfig", "cross_scale_agreement", "multiscale_loss", "pool_sequence"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MoMEConfig:
    """Attributes: num_experts E, top_k, rank, alpha, num_shared (0 or 1 shared LoRA expert), aux_loss_coef."""

    num_experts: int = 4
    top_k: int = 2
    rank: int = 4
    alpha: float = 8.0
    num_shared: int = 1
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "rank"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"mome.{name}={value!r} must be a positive integer")
        check(self.top_k <= self.num_experts, f"mome.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        check(self.num_shared in (0, 1), f"mome.num_shared={self.num_shared} must be 0 or 1")
        check(self.alpha > 0 and self.aux_loss_coef >= 0, "mome.alpha must be positive, aux_loss_coef >= 0")


class MoME(LinearAdapter):
    """Routed plus shared LoRA experts in parallel with a frozen projection; one router for every scale."""

    def __init__(self, in_features: int, out_features: int, config: MoMEConfig) -> None:
        super().__init__()
        c = self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.router = Router(in_features, c.num_experts, c.top_k, RouterConfig(aux_loss_coef=c.aux_loss_coef))
        self.experts = LoRAExperts(c.num_experts, in_features, out_features, c.rank, c.alpha / c.rank)
        self.shared = LoRAExperts(1, in_features, out_features, c.rank, c.alpha / c.rank) if c.num_shared else None

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "mome") -> torch.Tensor:
        routing = self.router(x_TI, ctx, layer=layer)
        record_routing(ctx, layer, routing)
        y_TO = self.experts(x_TI, dense_weights(routing.expert_ids_TK, routing.weights_TK, self.config.num_experts))
        if self.shared is not None:
            y_TO = y_TO + self.shared(x_TI, torch.ones(x_TI.shape[0], 1, device=x_TI.device))
        return y_TO


def pool_sequence(x_BSD: torch.Tensor, rate: int) -> torch.Tensor:
    """Average-pool ``rate`` consecutive tokens (the last, shorter group is averaged over what it has)."""
    if rate == 1:
        return x_BSD
    return F.avg_pool1d(x_BSD.transpose(1, 2), rate, rate, ceil_mode=True).transpose(1, 2)


def multiscale_loss(forward: Callable[[torch.Tensor, RoutingContext], torch.Tensor], x_BSD: torch.Tensor,
                    rates: Sequence[int], loss_fn: Callable[[torch.Tensor], torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``mean_r loss_fn(forward(pool(x, r)))`` plus each rate's term (and its routing losses)."""
    if not rates:
        raise ValueError("multiscale_loss needs at least one rate, e.g. (1, 2, 4)")
    terms = {}
    for rate in rates:
        ctx = RoutingContext()
        out = forward(pool_sequence(x_BSD, rate), ctx)
        terms[rate] = loss_fn(out) + ctx.total_loss()
    return torch.stack(list(terms.values())).mean(), terms


@torch.no_grad()
def cross_scale_agreement(mome: MoME, x_BSD: torch.Tensor, rate: int) -> float:
    """Share of pooled tokens whose top expert is the most common top expert of the tokens they pool."""
    B, S, D = x_BSD.shape
    fine_BS = mome.router.logits(x_BSD.reshape(-1, D)).argmax(-1).view(B, S)
    coarse_BN = mome.router.logits(pool_sequence(x_BSD, rate).reshape(-1, D)).argmax(-1).view(B, -1)
    pad = (-S) % rate
    fine_BNr = F.pad(fine_BS, (0, pad), value=-1).view(B, -1, rate)
    onehot = F.one_hot(fine_BNr.clamp_min(0), mome.config.num_experts) * (fine_BNr >= 0).unsqueeze(-1)
    majority_BN = onehot.sum(2).argmax(-1)
    return float((majority_BN == coarse_BN).float().mean())

"""FlyLoRA (Zou et al. 2025, code gfyddha/FlyLoRA @91d9e36; spec §18): implicit rank-wise experts.

Dim legend: T tokens, I input features, O output features, R rank, K active ranks per token.

``A_RI`` is frozen (a persistent buffer, saved with the adapter): each row has exactly ``p = round(I * density)``
non-zeros at random positions, drawn from N(0, (1/r)^2); ``density`` defaults to ``k / r``. ``B_OR`` is trainable
and zero-initialised. Per token ``y = A x``; the ranks with the top-k ``|y + d|`` are kept:
``dy = (alpha/r) B (y * mask)``. There are no router parameters: A is the down-projection and the router.

Balancing without gradients: training forwards count assignments per rank ``c``; :meth:`on_step` (called by the
trainer after each optimizer step, or by hand) updates ``d_i += u * sign(mean(c) - c_i)`` and resets the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check
from ..types import Routing, RoutingContext
from .core import LinearAdapter
from .experts import record_routing

__all__ = ["FlyLoRA", "FlyLoRAConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class FlyLoRAConfig:
    """Attributes (MMLU script defaults): rank 32, top_k 8, alpha 64, density (None = top_k/rank),
    bias_update_rate u = 0.001."""

    rank: int = 32
    top_k: int = 8
    alpha: float = 64.0
    density: float | None = None
    bias_update_rate: float = 0.001

    def __post_init__(self) -> None:
        check(isinstance(self.rank, int) and self.rank >= 1, f"flylora.rank={self.rank!r} must be a positive integer")
        check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.rank,
              f"flylora.top_k={self.top_k!r} must be in [1, rank={self.rank}]")
        check(self.alpha > 0, f"flylora.alpha={self.alpha} must be positive")
        check(self.density is None or 0 < self.density <= 1, f"flylora.density={self.density} must be in (0, 1]")
        check(self.bias_update_rate >= 0, f"flylora.bias_update_rate={self.bias_update_rate} must be >= 0")


class FlyLoRA(LinearAdapter):
    """``dy = (alpha/r) B (A x * topk_mask(|A x + d|))`` with a frozen sparse random ``A``."""

    lora_A: torch.Tensor
    rank_bias: torch.Tensor
    pending_counts: torch.Tensor

    def __init__(self, in_features: int, out_features: int, config: FlyLoRAConfig) -> None:
        super().__init__()
        c = self.config = config
        self.in_features, self.out_features, self.scale = in_features, out_features, c.alpha / c.rank
        density = c.density if c.density is not None else c.top_k / c.rank
        self.nonzeros = max(1, min(in_features, round(in_features * density)))
        positions_RP = torch.rand(c.rank, in_features).argsort(-1)[:, :self.nonzeros]
        A_RI = torch.zeros(c.rank, in_features)
        A_RI.scatter_(1, positions_RP, torch.randn(c.rank, self.nonzeros) / c.rank)
        self.register_buffer("lora_A", A_RI)
        self.lora_B = nn.Parameter(torch.zeros(out_features, c.rank))
        self.register_buffer("rank_bias", torch.zeros(c.rank))
        self.register_buffer("pending_counts", torch.zeros(c.rank), persistent=False)

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "flylora") -> torch.Tensor:
        y_TR = F.linear(x_TI.to(self.lora_A.dtype), self.lora_A)
        choice_TR = (y_TR.detach() + self.rank_bias).abs()
        ids_TK = choice_TR.topk(self.config.top_k, dim=-1).indices
        mask_TR = torch.zeros_like(y_TR).scatter(1, ids_TK, 1.0)
        if self.training:
            with torch.no_grad():
                self.pending_counts += torch.bincount(ids_TK.reshape(-1), minlength=self.config.rank).float()
        if ctx is not None and ctx.collect_stats:
            scores_TR = choice_TR / choice_TR.sum(-1, keepdim=True).clamp_min(1e-20)
            record_routing(ctx, layer, Routing(expert_ids_TK=ids_TK, weights_TK=torch.ones_like(ids_TK, dtype=y_TR.dtype),
                                               scores_TE=scores_TR, logits_TE=choice_TR))
        return F.linear(y_TR * mask_TR, self.lora_B) * self.scale

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        """``d_i += u * sign(mean(c) - c_i)`` from the counts since the last call (overloaded ranks go down)."""
        counts_R = self.pending_counts
        if counts_R.sum() > 0:
            self.rank_bias += self.config.bias_update_rate * torch.sign(counts_R.mean() - counts_R)
        counts_R.zero_()

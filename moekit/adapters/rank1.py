"""Little by Little (MoRA): a self-activated sparse mixture of rank-1 experts (spec §24, [abs + review]).

Dim legend: T tokens, I input features, O output features, R rank-1 experts so far, K active ranks.

``dy(x) = alpha * sum_i w_i(x) B_i (A_i x)`` with ``A_i`` a row (key) and ``B_i`` a column (value); there is no
router. Scores ``s_i = A_i x / ||A x||``; ``w = softmax(s / temperature)`` over the top-k ranks, times the mask
``s_i >= threshold`` (rank pruning). ``weighting='uniform'`` uses ``1/R`` for every rank instead (with
``top_k = R`` and ``threshold = -1`` this is LoRA with scale ``alpha / R``). Choices made (the spec does not
fix them): the update is scaled by ``alpha`` (the weights already sum to at most 1); ``threshold = -1`` keeps
every rank by default, since ``s_i`` lies in [-1, 1].

Continual learning: :meth:`add_ranks` freezes every existing rank and appends new trainable ones; old ranks are
still used (reused knowledge) but never updated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check, check_choice
from ..types import Routing, RoutingContext
from .core import LinearAdapter
from .experts import dense_weights, record_routing
from .lora import kaiming_rows

__all__ = ["Rank1Config", "Rank1Experts"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Rank1Config:
    """Attributes: rank (initial rank-1 experts), top_k (activation budget), alpha, temperature, threshold (delta),
    weighting ('softmax' | 'uniform')."""

    rank: int = 8
    top_k: int = 2
    alpha: float = 1.0
    temperature: float = 1.0
    threshold: float = -1.0
    weighting: Literal["softmax", "uniform"] = "softmax"

    def __post_init__(self) -> None:
        check(isinstance(self.rank, int) and self.rank >= 1, f"rank1.rank={self.rank!r} must be a positive integer")
        check(isinstance(self.top_k, int) and self.top_k >= 1, f"rank1.top_k={self.top_k!r} must be a positive integer")
        check(self.alpha > 0 and self.temperature > 0, "rank1.alpha and rank1.temperature must be positive")
        check_choice("rank1", "weighting", self.weighting, ("softmax", "uniform"))


class Rank1Experts(LinearAdapter):
    """Rank-1 experts in chunks (``lora_A.{c}`` ``[R_c, I]``, ``lora_B.{c}`` ``[O, R_c]``); old chunks frozen."""

    def __init__(self, in_features: int, out_features: int, config: Rank1Config) -> None:
        super().__init__()
        self.config, self.in_features, self.out_features = config, in_features, out_features
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
        self._append(config.rank)

    @property
    def num_ranks(self) -> int:
        return sum(a.shape[0] for a in self.lora_A)

    def _append(self, n: int) -> None:
        self.lora_A.append(nn.Parameter(kaiming_rows(n, self.in_features)))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, n)))

    def add_ranks(self, n: int) -> None:
        """Freeze every existing rank-1 expert and append ``n`` new trainable ones (a new task)."""
        check(isinstance(n, int) and n >= 1, f"add_ranks(n={n!r}) needs a positive integer")
        for p in (*self.lora_A, *self.lora_B):
            p.requires_grad_(False)
        self._append(n)
        self.lora_A[-1].data = self.lora_A[-1].data.to(self.lora_A[0].device, self.lora_A[0].dtype)
        self.lora_B[-1].data = self.lora_B[-1].data.to(self.lora_B[0].device, self.lora_B[0].dtype)

    def structure(self) -> dict[str, Any]:
        return {"chunks": [a.shape[0] for a in self.lora_A]}

    def restructure(self, structure: dict[str, Any]) -> None:
        chunks = list(structure.get("chunks", [self.config.rank]))
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
        for n in chunks:
            self._append(int(n))

    def weights(self, s_TR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w_TR, ids_TK, w_TK)`` from the normalised scores."""
        c, R = self.config, s_TR.shape[-1]
        k = min(c.top_k, R)
        ids_TK = s_TR.detach().topk(k, dim=-1).indices
        s_TK = s_TR.gather(1, ids_TK)
        if c.weighting == "uniform":
            w_TK = torch.full_like(s_TK, 1.0 / R)
        else:
            w_TK = (s_TK / c.temperature).softmax(-1)
        w_TK = w_TK * (s_TK >= c.threshold)
        return dense_weights(ids_TK, w_TK, R), ids_TK, w_TK

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "rank1") -> torch.Tensor:
        A_RI, B_OR = torch.cat(list(self.lora_A)), torch.cat(list(self.lora_B), dim=1)
        h_TR = F.linear(x_TI.to(A_RI.dtype), A_RI)
        s_TR = h_TR / h_TR.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        w_TR, ids_TK, w_TK = self.weights(s_TR)
        if ctx is not None and ctx.collect_stats:
            active_TK = torch.where(w_TK.detach() > 0, ids_TK, -1)
            record_routing(ctx, layer, Routing(expert_ids_TK=active_TK, weights_TK=w_TK.detach(),
                                               scores_TE=s_TR.detach().softmax(-1), logits_TE=s_TR.detach()))
        return F.linear(h_TR * w_TR, B_OR) * self.config.alpha

"""The ``reference`` engine: a plain loop over experts, written to be read. The ground truth.

Dim legend: T tokens, D model dim, K slots per token.
"""

from __future__ import annotations

import torch

from ..experts import ExpertBank
from ..types import Routing
from .registry import register_engine

__all__ = ["reference_engine"]


@register_engine("reference", priority=0)
def reference_engine(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """``y_t = sum_k weights_tk * E_{ids_tk}(x_t)``, expert by expert; empty slots (-1) are skipped."""
    y_TD = torch.zeros_like(x_TD)
    ids_TK, weights_TK = routing.expert_ids_TK, routing.weights_TK.to(x_TD.dtype)
    for e in range(bank.num_experts):
        token_idx, slot_idx = torch.nonzero(ids_TK == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        out = bank.expert(x_TD[token_idx], e)
        y_TD = y_TD.index_add(0, token_idx, weights_TK[token_idx, slot_idx, None] * out)
    return y_TD

"""A bank of LoRA experts on one linear map, and the routing helpers the routed adapters share.

Dim legend: T tokens, I input features, O output features, E experts, K slots per token, R rank.

``dy_t = scale * sum_e w_te B_e A_e x_t``. The bank evaluates every expert's rank-R code (``T x E x R``, small
because R is small) and weights it by a dense ``w_TE`` that is exactly zero for experts not selected, so a
non-selected expert receives exactly zero gradient; this equals the sparse per-expert form.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.moe import routing_stats
from ..types import Routing, RoutingContext
from .lora import kaiming_rows

__all__ = ["LoRAExperts", "dense_weights", "record_routing"]


class LoRAExperts(nn.Module):
    """``E`` LoRA pairs: ``lora_A [E, R, I]`` (Kaiming-uniform rows), ``lora_B [E, O, R]`` (zeros)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(kaiming_rows(rank, in_features, num_experts))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))

    def forward(self, x_TI: torch.Tensor, w_TE: torch.Tensor) -> torch.Tensor:
        h_TER = torch.einsum("ti,eri->ter", x_TI.to(self.lora_A.dtype), self.lora_A)
        h_TER = h_TER * w_TE.to(h_TER.dtype).unsqueeze(-1)
        return torch.einsum("ter,eor->to", h_TER, self.lora_B) * self.scale

    def one(self, e: int, x_NI: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``N`` rows: ``scale * B_e A_e x``."""
        return (x_NI.to(self.lora_A.dtype) @ self.lora_A[e].T) @ self.lora_B[e].T * self.scale


def dense_weights(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``w_TE`` from slots (``-1`` slots dropped), differentiable through ``weights_TK``."""
    T = ids_TK.shape[0]
    w_TE1 = torch.zeros(T, num_experts + 1, dtype=weights_TK.dtype, device=weights_TK.device)
    w_TE1 = w_TE1.scatter_add(1, ids_TK + 1, weights_TK)  # empty slots land in column 0, dropped
    return w_TE1[:, 1:]


def record_routing(ctx: RoutingContext | None, layer: str, routing: Routing, **extra: torch.Tensor | float) -> None:
    """Load, entropy and dead experts of an adapter layer, as a MoE layer records them."""
    if ctx is None or not ctx.collect_stats:
        return
    stats = routing_stats(routing)
    for key, value in extra.items():
        stats.extra[key] = value.detach() if isinstance(value, torch.Tensor) else value
    ctx.add_stats(layer, stats)

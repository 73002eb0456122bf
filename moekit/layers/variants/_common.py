"""Helpers shared by the MoE variants: option parsing, flattening, statistics.

Dim legend: T tokens, D model dim, E experts, K slots per token, B batch, S sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...configs import check, from_dict
from ...types import LayerStats, Routing, RoutingContext
from ..moe import routing_stats

if TYPE_CHECKING:
    from ...experts import FeedForward

__all__ = ["parse_options", "require_router", "PLAIN_TOPK", "flatten", "record_stats", "add_extra",
           "make_shared_experts", "run_experts"]


def parse_options(cls, options: dict):
    """The variant's config dataclass from the model's ``variant`` table (errors name ``variant.<key>``)."""
    return from_dict(cls, dict(options or {}), prefix="variant")


# The router settings a variant with its own softmax top-k routing implements (no capacity, bias or groups).
PLAIN_TOPK = dict(score_func="softmax", selector="topk", num_groups=1, bias_update_rate=0.0, capacity_factor=None,
                  eval_capacity_factor=None)


def require_router(router, variant: str, why: str, **expected) -> None:
    """Raise :class:`ConfigError` naming every ``router.<field>`` that differs from what ``variant`` supports."""
    wrong = [f"router.{k}={v!r} (got {getattr(router, k)!r})" for k, v in expected.items() if getattr(router, k) != v]
    check(not wrong, f"{variant} {why}; set {', '.join(wrong)}")


def flatten(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """``[..., D] -> [T, D]`` plus the number of equal sequences (``B`` for ``[B, S, D]`` input)."""
    if x.shape[-1] != dim:
        raise ValueError(f"expected inputs of shape [..., {dim}], got {tuple(x.shape)}; check MoEConfig.dim")
    return x.reshape(-1, dim), (x.shape[0] if x.dim() == 3 else 1)


def record_stats(ctx: RoutingContext | None, layer: str, routing: Routing | None, **extra) -> None:
    """Record a :class:`LayerStats` (when ``ctx.collect_stats``) with variant statistics in ``extra``."""
    if ctx is None or not ctx.collect_stats:
        return
    if routing is not None:
        ctx.add_stats(layer, routing_stats(routing))
    add_extra(ctx, layer, **extra)


def add_extra(ctx: RoutingContext | None, layer: str, **extra) -> None:
    """Add variant statistics to an existing (or a fresh, empty) :class:`LayerStats` of ``layer``."""
    if ctx is None or not ctx.collect_stats:
        return
    if layer not in ctx.stats:
        ctx.add_stats(layer, LayerStats(counts_E=torch.zeros(1), num_slots=0, num_dropped=torch.zeros(()),
                                        token_entropy=torch.zeros(())))
    for key, value in extra.items():
        ctx.stats[layer].extra[key] = value.detach() if isinstance(value, torch.Tensor) else value


def make_shared_experts(moe) -> FeedForward | None:
    """The layer's shared experts, sized as in :class:`~moekit.MoE` (``MoEConfig.shared_size``), or None."""
    from ...experts import FeedForward
    return FeedForward(moe.dim, moe.shared_size, moe.activation) if moe.num_shared_experts > 0 else None


def run_experts(moe, bank, shared, x_TD: torch.Tensor, routing: Routing, ctx: RoutingContext | None,
                layer: str) -> torch.Tensor:
    """Engine over ``bank`` (+ shared experts) for a given routing, recording the layer's statistics."""
    from ...dispatch import resolve_engine
    y_TD = resolve_engine(moe.engine, x_TD, bank)(x_TD, routing, bank)
    if shared is not None:
        y_TD = y_TD + shared(x_TD)
    record_stats(ctx, layer, routing)
    return y_TD

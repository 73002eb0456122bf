"""Shared data types of moekit: the routing decision, the routing context and per-layer statistics.

Dim legend (used across the package):
    T tokens, D model dim, F expert hidden dim, E experts, K slots per token,
    B batch, S sequence, N = T*K assignments, G expert groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Routing", "RoutingContext", "LayerStats", "MODALITY_KEY"]

# ``ctx.state[MODALITY_KEY]``: int64 modality id per token ([B, S] or [T]; 0 = text). The language model
# writes it from the token ids when ``model.modality_starts`` is set (a caller may set it before the forward
# instead); modality-aware layers (MoMa) read it. Absent: every token is modality 0.
MODALITY_KEY = "modality_ids"


@dataclass(frozen=True)
class Routing:
    """The whole routing decision for ``T`` tokens.

    Attributes:
        expert_ids_TK: int64 chosen experts; ``-1`` marks an empty slot (dropped by capacity, or a
            dynamic-k / expert-choice token that got fewer than ``K`` experts).
        weights_TK: combine weights, exactly 0 in empty slots, differentiable w.r.t. the router.
        scores_TE: the scores the selection was made from (softmax probabilities, sigmoid affinities...).
        logits_TE: the raw router logits (for the z-loss and statistics).
        num_dropped: how many slots a capacity limit emptied (a device scalar), the ``drop_rate`` statistic's
            numerator. ``None`` counts every ``-1`` slot as dropped, which is right when a capacity limit is
            the only source of empty slots; routers whose empty slots are by design (expert choice, top-p,
            ReLU-activated experts) set it, to zero when they have no capacity limit.
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor
    num_dropped: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_ids_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.scores_TE.shape[-1]

    def counts_E(self, num_experts: int | None = None) -> torch.Tensor:
        """Assignments per expert (empty slots not counted)."""
        n = self.num_experts if num_experts is None else num_experts
        ids = self.expert_ids_TK.reshape(-1)
        # Shift by one so that empty slots (-1) land in bin 0 and are then dropped: no host sync.
        return torch.bincount(ids + 1, minlength=n + 1)[1 : n + 1]


@dataclass
class LayerStats:
    """Routing statistics of one MoE layer for one forward pass (tensors stay on device until read)."""

    counts_E: torch.Tensor
    num_slots: int
    num_dropped: torch.Tensor
    token_entropy: torch.Tensor
    bias_E: torch.Tensor | None = None
    extra: dict[str, torch.Tensor | float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Plain floats: load CV, max/mean load, normalised entropy, dead experts, drop rate, bias drift."""
        counts = self.counts_E.double()
        num_experts = counts.numel()
        mean = counts.mean()
        cv = (counts.std(unbiased=False) / mean).item() if mean > 0 else 0.0
        share = counts / counts.sum().clamp_min(1)
        load_entropy = -(share * share.clamp_min(1e-30).log()).sum().item()
        out = {
            "tokens": float(counts.sum().item()),
            "load_cv": cv,
            "max_over_mean": (counts.max() / mean).item() if mean > 0 else 0.0,
            "load_entropy": load_entropy / math.log(num_experts) if num_experts > 1 else 1.0,
            "token_entropy": float(self.token_entropy.item()),
            "dead_experts": float((counts == 0).sum().item()),
            "drop_rate": float(self.num_dropped.item()) / max(self.num_slots, 1),
        }
        if self.bias_E is not None:
            out["bias_drift"] = float(self.bias_E.abs().mean().item())
        for key, value in self.extra.items():
            out[key] = float(value.item()) if isinstance(value, torch.Tensor) else float(value)
        return out


class RoutingContext:
    """Created by a model's forward and handed down through its blocks.

    Collects weighted auxiliary losses by name (summed over layers), optional per-layer statistics, and
    state that crosses layers (previous logits, recurrent router state, a pre-computed routing plan, the
    per-token modality ids under :data:`MODALITY_KEY`).
    A layer used alone works without one.

    Args:
        collect_stats: if True, every MoE layer records a :class:`LayerStats` under its name.
    """

    def __init__(self, collect_stats: bool = False) -> None:
        self.collect_stats = collect_stats
        self.losses: dict[str, torch.Tensor] = {}
        self.layer_losses: dict[str, dict[str, torch.Tensor]] = {}
        self.stats: dict[str, LayerStats] = {}
        self.state: dict[str, Any] = {}

    def add_loss(self, name: str, value: torch.Tensor, layer: str | None = None) -> None:
        """Add an already-weighted scalar loss; losses of the same name are summed over layers."""
        self.losses[name] = self.losses[name] + value if name in self.losses else value
        if layer is not None:
            self.layer_losses.setdefault(layer, {})[name] = value

    def total_loss(self) -> torch.Tensor | float:
        """Sum of every weighted auxiliary loss (0.0 when there is none)."""
        if not self.losses:
            return 0.0
        return torch.stack([v.float() for v in self.losses.values()]).sum()

    def add_stats(self, layer: str, stats: LayerStats) -> None:
        self.stats[layer] = stats

    def stats_summary(self) -> dict[str, dict[str, float]]:
        return {name: s.summary() for name, s in self.stats.items()}

    def stats_table(self, columns: tuple[str, ...] = ("load_cv", "max_over_mean", "load_entropy",
                                                        "dead_experts", "drop_rate")) -> str:
        """A small fixed-width text table of the recorded statistics, one row per layer."""
        summary = self.stats_summary()
        if not summary:
            return "(no routing statistics recorded; create RoutingContext(collect_stats=True))"
        extra_cols = sorted({k for row in summary.values() for k in row} - set(columns) - {"tokens"})
        cols = list(columns) + extra_cols
        width = max(len("layer"), *(len(n) for n in summary))
        lines = ["layer".ljust(width) + "".join(f"{c:>15}" for c in cols)]
        for name, row in summary.items():
            lines.append(name.ljust(width) + "".join(
                f"{row[c]:>15.4g}" if c in row else f"{'-':>15}" for c in cols))
        return "\n".join(lines)

"""SMoE-Dropout (Chen et al. 2023, "Sparse MoE as the New Dropout", arXiv 2303.01610,
github VITA-Group/Random-MoE-as-Dropout).

Dim legend: T tokens, D model dim, E experts, K slots per token.

A randomly initialised and **frozen** router; the number of activated experts grows during training:

    z = W_r x + b            (random init, no gradient, never updated)
    S = TopK(z, k(step)),  g = softmax(z_S),  y = sum_{i in S} g_i E_i(x)
    k(step) = clip(round((k_max - k_min) * step / total_steps) + k_min, k_min, k_max)     ("linear")

``schedule="cosine"`` is the code's cosine increase ``k_min + (k_max - k_min)(1 - cos(pi step / total)) / 2``.
The trainer calls :meth:`on_step` after each optimizer step; evaluation uses ``eval_top_k`` ("self-slimmable":
any k; ``k = E`` is dense). No balance loss (a random frozen router is roughly balanced).
Statistics: ``active_k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...configs import check, check_choice
from ...routing.selectors import select_topk
from ...types import Routing, RoutingContext
from ..moe import MoE, MoEConfig
from ..registry import register_ffn
from ._common import add_extra, flatten, parse_options

__all__ = ["SMoEDropoutConfig", "SMoEDropout", "k_schedule"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SMoEDropoutConfig:
    """Attributes:
        k_min / k_max: the schedule's range; 0 means ``moe.top_k`` / ``moe.num_experts`` (enwik8: 8 -> 16 of 16).
        total_steps: steps over which k grows (enwik8: 400k).
        schedule: ``linear`` (paper's main setting) or ``cosine`` increase.
        eval_top_k: k in eval mode; 0 means ``k_max``.
    """

    k_min: int = 0
    k_max: int = 0
    total_steps: int = 10000
    schedule: Literal["linear", "cosine"] = "linear"
    eval_top_k: int = 0

    def __post_init__(self) -> None:
        check_choice("variant", "schedule", self.schedule, ("linear", "cosine"))
        check(self.total_steps >= 1, f"variant.total_steps={self.total_steps} must be >= 1")
        for n in ("k_min", "k_max", "eval_top_k"):
            check(getattr(self, n) >= 0, f"variant.{n}={getattr(self, n)} must be >= 0 (0 means the default)")


def k_schedule(step: int, k_min: int, k_max: int, total_steps: int, schedule: str = "linear") -> int:
    """Experts per token at ``step``."""
    frac = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "cosine":
        frac = (1 - math.cos(math.pi * frac)) / 2
    return int(min(max(round((k_max - k_min) * frac) + k_min, k_min), k_max))


class SMoEDropout(nn.Module):
    """MoE with a frozen random router and a growing number of experts per token."""

    router_bias: torch.Tensor

    def __init__(self, moe: MoEConfig, config: SMoEDropoutConfig | None = None, name: str = "smoe_dropout") -> None:
        super().__init__()
        self.config, self.name = config or SMoEDropoutConfig(), name
        self.moe = MoE(moe, name=name)
        self.moe.router.weight.requires_grad_(False)
        self.register_buffer("router_bias", torch.empty(moe.num_experts).uniform_(-moe.dim**-0.5, moe.dim**-0.5))
        self.k_min = self.config.k_min or moe.top_k
        self.k_max = self.config.k_max or moe.num_experts
        check(1 <= self.k_min <= self.k_max <= moe.num_experts,
              f"SMoE-Dropout needs 1 <= k_min={self.k_min} <= k_max={self.k_max} <= num_experts={moe.num_experts}")
        self.eval_top_k = min(self.config.eval_top_k or self.k_max, moe.num_experts)
        self.train_top_k = self.k_min

    def on_step(self, step: int) -> None:
        """Set k for the next training step (the trainer calls this after each optimizer step)."""
        c = self.config
        self.train_top_k = k_schedule(step, self.k_min, self.k_max, c.total_steps, c.schedule)

    @property
    def top_k(self) -> int:
        return self.train_top_k if self.training else self.eval_top_k

    def route(self, x_TD: torch.Tensor) -> Routing:
        with torch.no_grad():
            logits_TE = self.moe.router.logits(x_TD) + self.router_bias
        # softmax over the selected logits == renormalised full softmax
        ids_TK, weights_TK = select_topk(logits_TE.softmax(-1), self.top_k, normalize=True)
        return Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=logits_TE.softmax(-1),
                       logits_TE=logits_TE)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe.config.dim)
        y_TD = self.moe.combine(x_TD, self.route(x_TD), ctx)
        add_extra(ctx, self.name, active_k=float(self.top_k))
        return y_TD.view(x.shape)


@register_ffn("smoe-dropout")
def build_smoe_dropout(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int,
                       name: str) -> nn.Module:
    return SMoEDropout(moe, parse_options(SMoEDropoutConfig, options), name=name)

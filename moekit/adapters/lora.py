"""Plain LoRA (Hu et al. 2021, arXiv 2106.09685; spec P3): ``y = W0 x + (alpha/r) B A x``.

Dim legend: T tokens, I input features, O output features, R rank.

``A_RI`` is initialised as ``nn.Linear`` initialises its weight (Kaiming-uniform, a = sqrt(5)) and ``B_OR`` to
zero, so at initialisation the adapted model is the base model (the convention of peft, whose outputs this
module reproduces on the same weights; see tests/test_adapters_lora.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check
from ..types import RoutingContext
from .core import LinearAdapter

__all__ = ["LoRA", "LoRAConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LoRAConfig:
    """Attributes:
        rank: r, the rank of ``B A`` (README example of MixLoRA: 8).
        alpha: the update is scaled by ``alpha / rank`` (16).
        dropout: dropout on the adapter's input while training (0.05 in MixLoRA's example); 0 disables.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check(isinstance(self.rank, int) and self.rank >= 1, f"lora.rank={self.rank!r} must be a positive integer")
        check(self.alpha > 0, f"lora.alpha={self.alpha} must be positive (the update is scaled by alpha/rank)")
        check(0 <= self.dropout < 1, f"lora.dropout={self.dropout} must be in [0, 1)")


def kaiming_rows(num_rows: int, fan_in: int, *lead: int) -> torch.Tensor:
    """Rows drawn as ``nn.Linear`` draws its weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Kaiming, a = sqrt(5))."""
    w = torch.empty(*lead, num_rows, fan_in)
    bound = 1.0 / math.sqrt(fan_in)
    return w.uniform_(-bound, bound)


class LoRA(LinearAdapter):
    """``dy = (alpha/r) B_OR A_RI dropout(x)``."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.scale = config.alpha / config.rank
        self.lora_A = nn.Parameter(kaiming_rows(config.rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "lora") -> torch.Tensor:
        x_TI = self.dropout(x_TI.to(self.lora_A.dtype))
        return F.linear(F.linear(x_TI, self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A

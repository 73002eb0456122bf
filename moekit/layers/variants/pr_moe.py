"""Residual-MoE and Pyramid-Residual-MoE (PR-MoE) from DeepSpeed-MoE (Rajbhandari et al. 2022, arXiv 2201.05596).

Dim legend: T tokens, D model dim.

Residual-MoE: every token goes through a fixed dense MLP *and* its routed expert(s) (top-1 in the paper): the
expert acts as an error-correction term, giving top-2 quality at top-1 communication cost.

- ``residual="paper"`` (default): ``y = MLP(x) + MoE(x)`` (the paper's sum).
- ``residual="deepspeed"``: DeepSpeed's ``use_residual=True``: ``c = softmax(W_c x + b_c)`` in R^2,
  ``y = c_0 MoE(x) + c_1 MLP(x)``.

Pyramid: more experts in later layers (PR-MoE-32/64: the last 2 of 12 MoE layers have 64 experts instead of 32).
The builder gives the last ``num_late_layers`` blocks ``late_num_experts`` experts (counted in blocks: with MoE on
every other block, the last two MoE layers are the last four blocks). Losses and statistics come from the inner
:class:`MoE` (``aux_loss`` etc. under the layer's name); ``dense_weight`` (mean ``c_1``) is added in DeepSpeed form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...configs import check, check_choice
from ...experts import FeedForward
from ...types import RoutingContext
from ..moe import MoE, MoEConfig
from ..registry import register_ffn
from ._common import add_extra, parse_options

__all__ = ["ResidualMoEConfig", "ResidualMoE", "pyramid_num_experts"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ResidualMoEConfig:
    """Attributes:
        residual: ``paper`` (MLP + MoE) or ``deepspeed`` (learned 2-way softmax mix).
        dense_hidden_dim: hidden size of the dense MLP; 0 means ``moe.hidden_dim``.
        num_late_layers: pyramid: how many final blocks get ``late_num_experts`` (0: no pyramid).
        late_num_experts: experts in the late blocks; 0 means twice ``moe.num_experts``.
    """

    residual: Literal["paper", "deepspeed"] = "paper"
    dense_hidden_dim: int = 0
    num_late_layers: int = 0
    late_num_experts: int = 0

    def __post_init__(self) -> None:
        check_choice("variant", "residual", self.residual, ("paper", "deepspeed"))
        for n in ("dense_hidden_dim", "num_late_layers", "late_num_experts"):
            check(getattr(self, n) >= 0, f"variant.{n}={getattr(self, n)} must be >= 0 (0 means the default)")


def pyramid_num_experts(moe: MoEConfig, config: ResidualMoEConfig, layer_index: int, num_layers: int) -> int:
    """Experts of block ``layer_index``: ``late_num_experts`` in the last ``num_late_layers`` blocks."""
    if config.num_late_layers and layer_index >= num_layers - config.num_late_layers:
        return config.late_num_experts or 2 * moe.num_experts
    return moe.num_experts


class ResidualMoE(nn.Module):
    """A dense MLP plus an MoE, summed (paper) or mixed by a learned coefficient (DeepSpeed)."""

    def __init__(self, moe: MoEConfig, config: ResidualMoEConfig | None = None, name: str = "residual_moe") -> None:
        super().__init__()
        self.config, self.name = config or ResidualMoEConfig(), name
        self.moe = MoE(moe, name=name)
        self.dense = FeedForward(moe.dim, self.config.dense_hidden_dim or moe.hidden_dim, moe.activation)
        self.coefficient = nn.Linear(moe.dim, 2) if self.config.residual == "deepspeed" else None

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        y_moe, y_mlp = self.moe(x, ctx), self.dense(x)
        if self.coefficient is None:
            return y_moe + y_mlp
        c = self.coefficient(x).softmax(-1)
        add_extra(ctx, self.name, dense_weight=c[..., 1].mean())
        return c[..., :1] * y_moe + c[..., 1:] * y_mlp


def _build(moe: MoEConfig, options: dict, layer_index: int, num_layers: int, name: str) -> nn.Module:
    config = parse_options(ResidualMoEConfig, options)
    num_experts = pyramid_num_experts(moe, config, layer_index, num_layers)
    if num_experts != moe.num_experts:
        moe = dataclasses.replace(moe, num_experts=num_experts)
    return ResidualMoE(moe, config, name=name)


@register_ffn("pr-moe")
def build_pr_moe(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    """Pyramid-Residual-MoE (defaults to two late blocks with twice the experts)."""
    return _build(moe, {"num_late_layers": 2, **options}, layer_index, num_layers, name)


@register_ffn("residual-moe")
def build_residual_moe(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int,
                       name: str) -> nn.Module:
    return _build(moe, options, layer_index, num_layers, name)

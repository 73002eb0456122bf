"""A dense feed-forward network (SwiGLU, GELU or ReLU): shared experts and dense layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check_choice
from .activations import ACTIVATIONS, hidden, is_gated

__all__ = ["FeedForward"]


class FeedForward(nn.Module):
    """``w_down @ act(w_gate @ x, w_up @ x)`` with 2-D weights ``w_gate, w_up: [F, D]``, ``w_down: [D, F]``."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "swiglu") -> None:
        super().__init__()
        check_choice("ffn", "activation", activation, ACTIVATIONS)
        self.dim, self.hidden_dim, self.activation = dim, hidden_dim, activation
        self.w_up = nn.Parameter(torch.randn(hidden_dim, dim) * dim**-0.5)
        self.w_down = nn.Parameter(torch.randn(dim, hidden_dim) * hidden_dim**-0.5)
        if is_gated(activation):
            self.w_gate = nn.Parameter(torch.randn(hidden_dim, dim) * dim**-0.5)
        else:
            self.register_parameter("w_gate", None)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        """``ctx`` is accepted (and unused) so that dense and MoE feed-forwards are interchangeable."""
        h_gate = F.linear(x, self.w_gate) if self.w_gate is not None else None
        return F.linear(hidden(self.activation, h_gate, F.linear(x, self.w_up)), self.w_down)

"""ExpertBank: the routed experts' weights stacked along a leading expert dimension.

Dim legend: E experts, F expert hidden dim, D model dim, T tokens.

Expert ``e`` computes ``w_down[e] @ (act(w_gate[e] @ x) * (w_up[e] @ x))`` for SwiGLU and
``w_down[e] @ act(w_up[e] @ x)`` for GELU / ReLU. With ``use_bias`` every projection adds its own per-expert
bias (``b_gate, b_up: [E, F]``, ``b_down: [E, D]``), as in GPT-OSS or a dense BERT FFN split into experts.
Only banks hold expert parameters; engines decide how the tokens reach them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check, check_choice
from .activations import ACTIVATIONS, hidden, is_gated

__all__ = ["ExpertBank"]


class ExpertBank(nn.Module):
    """Stacked expert FFN weights: ``w_gate, w_up: [E, F, D]``, ``w_down: [E, D, F]``.

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: F.
        activation: ``swiglu`` / ``clamped_swiglu`` (have ``w_gate``), ``gelu`` or ``relu`` (no ``w_gate``).
        use_bias: give every projection a per-expert bias (initialised to zero).
    """

    w_gate: nn.Parameter | None
    w_up: nn.Parameter
    w_down: nn.Parameter
    b_gate: nn.Parameter | None
    b_up: nn.Parameter | None
    b_down: nn.Parameter | None

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "swiglu",
                 use_bias: bool = False) -> None:
        super().__init__()
        check_choice("experts", "activation", activation, ACTIVATIONS)
        check(num_experts >= 1 and dim >= 1 and hidden_dim >= 1,
              f"ExpertBank needs positive sizes, got num_experts={num_experts}, dim={dim}, hidden_dim={hidden_dim}")
        self.num_experts, self.dim, self.hidden_dim, self.activation = num_experts, dim, hidden_dim, activation
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        if is_gated(activation):
            self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        else:
            self.register_parameter("w_gate", None)
        self.use_bias = use_bias
        for name, shape, wanted in (("b_gate", (num_experts, hidden_dim), use_bias and is_gated(activation)),
                                    ("b_up", (num_experts, hidden_dim), use_bias),
                                    ("b_down", (num_experts, dim), use_bias)):
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)) if wanted else None)
        self.reset_parameters()

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def reset_parameters(self, std: float | None = None) -> None:
        """Normal init, std ``D^-0.5`` for the input projections and ``F^-0.5`` for the output one."""
        with torch.no_grad():
            nn.init.normal_(self.w_up, std=std or self.dim**-0.5)
            if self.w_gate is not None:
                nn.init.normal_(self.w_gate, std=std or self.dim**-0.5)
            nn.init.normal_(self.w_down, std=std or self.hidden_dim**-0.5)
            for b in (self.b_gate, self.b_up, self.b_down):
                if b is not None:
                    b.zero_()

    def expert(self, x_TD: torch.Tensor, e: int) -> torch.Tensor:
        """Run expert ``e`` on every row of ``x_TD`` (the readable definition; used by the reference)."""
        def bias(b):
            return None if b is None else b[e]

        h_up = F.linear(x_TD, self.w_up[e], bias(self.b_up))
        h_gate = F.linear(x_TD, self.w_gate[e], bias(self.b_gate)) if self.w_gate is not None else None
        return F.linear(hidden(self.activation, h_gate, h_up), self.w_down[e], bias(self.b_down))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}, use_bias={self.use_bias}")

"""Expert activations and their derivatives (the derivatives serve hand-written backward passes)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["Activation", "ACTIVATIONS", "is_gated", "hidden", "hidden_backward"]

Activation = Literal["swiglu", "gelu", "relu"]
ACTIVATIONS: tuple[str, ...] = ("swiglu", "gelu", "relu")


def is_gated(activation: str) -> bool:
    """Gated activations (SwiGLU) have a ``w_gate`` projection beside ``w_up``."""
    return activation == "swiglu"


def hidden(activation: str, h_gate: torch.Tensor | None, h_up: torch.Tensor) -> torch.Tensor:
    """The expert's hidden activation: ``silu(gate) * up`` for SwiGLU, ``act(up)`` otherwise."""
    if activation == "swiglu":
        return F.silu(h_gate) * h_up
    if activation == "gelu":
        return F.gelu(h_up)
    return F.relu(h_up)


def hidden_backward(
    activation: str, h_gate: torch.Tensor | None, h_up: torch.Tensor, grad_a: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of :func:`hidden` w.r.t. ``(h_gate, h_up)`` given the gradient of its output."""
    if activation == "swiglu":
        sig = torch.sigmoid(h_gate)
        silu = h_gate * sig
        grad_gate = grad_a * h_up * sig * (1 + h_gate * (1 - sig))
        return grad_gate, grad_a * silu
    if activation == "gelu":  # exact (erf) GELU: Phi(x) + x * phi(x)
        cdf = 0.5 * (1.0 + torch.erf(h_up * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h_up * h_up) * (1.0 / math.sqrt(2.0 * math.pi))
        return None, grad_a * (cdf + h_up * pdf)
    return None, grad_a * (h_up > 0).to(grad_a.dtype)

"""Expert activations and their derivatives (the derivatives serve hand-written backward passes)."""

from __future__ import annotations

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
    """Gradients of :func:`hidden` w.r.t. ``(h_gate, h_up)`` given the gradient of its output.

    Uses ATen's fused activation-backward kernels: on CPU these elementwise passes are memory-bound, so
    each avoided temporary counts. ``grad_a`` is consumed (overwritten) to save a buffer.
    """
    if activation == "swiglu":
        grad_up = F.silu(h_gate).mul_(grad_a)
        grad_gate = torch.ops.aten.silu_backward(grad_a.mul_(h_up), h_gate)
        return grad_gate, grad_up
    if activation == "gelu":
        return None, torch.ops.aten.gelu_backward(grad_a, h_up)
    return None, torch.ops.aten.threshold_backward(grad_a, h_up, 0)

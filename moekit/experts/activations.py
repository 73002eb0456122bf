"""Expert activations and their derivatives (the derivatives serve hand-written backward passes).

- ``swiglu``: ``silu(gate) * up`` (Shazeer 2020, arXiv 2002.05202).
- ``clamped_swiglu``: GPT-OSS's gated unit, ``(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g)`` with
  ``g = clamp(gate, max=7)``; the constants are part of its definition (OpenAI gpt-oss model card).
- ``gelu`` (exact, erf form) and ``relu``: ungated, ``act(up)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["Activation", "ACTIVATIONS", "is_gated", "hidden", "hidden_backward"]

Activation = Literal["swiglu", "clamped_swiglu", "gelu", "relu"]
ACTIVATIONS: tuple[str, ...] = ("swiglu", "clamped_swiglu", "gelu", "relu")

CLAMP_LIMIT = 7.0  # clamped_swiglu: inputs are clipped to this magnitude
CLAMP_ALPHA = 1.702  # clamped_swiglu: sigmoid slope (the sigmoid approximation of GELU)


def is_gated(activation: str) -> bool:
    """Gated activations (SwiGLU) have a ``w_gate`` projection beside ``w_up``."""
    return activation in ("swiglu", "clamped_swiglu")


def hidden(activation: str, h_gate: torch.Tensor | None, h_up: torch.Tensor) -> torch.Tensor:
    """The expert's hidden activation: ``silu(gate) * up`` for SwiGLU, ``act(up)`` otherwise."""
    if activation == "swiglu":
        assert h_gate is not None, "swiglu needs the gate projection"
        return F.silu(h_gate) * h_up
    if activation == "clamped_swiglu":
        assert h_gate is not None, "clamped_swiglu needs the gate projection"
        g = h_gate.clamp(max=CLAMP_LIMIT)
        return (h_up.clamp(-CLAMP_LIMIT, CLAMP_LIMIT) + 1) * (g * torch.sigmoid(CLAMP_ALPHA * g))
    if activation == "gelu":
        return F.gelu(h_up)
    if activation == "relu":
        return F.relu(h_up)
    raise ValueError(_unknown(activation))


def hidden_backward(
    activation: str, h_gate: torch.Tensor | None, h_up: torch.Tensor, grad_a: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of :func:`hidden` w.r.t. ``(h_gate, h_up)`` given the gradient of its output.

    Uses ATen's fused activation-backward kernels: on CPU these elementwise passes are memory-bound, so
    each avoided temporary counts. ``grad_a`` is consumed (overwritten) to save a buffer.
    """
    if activation == "swiglu":
        assert h_gate is not None, "swiglu needs the gate projection"
        grad_up = F.silu(h_gate).mul_(grad_a)
        grad_gate = torch.ops.aten.silu_backward(grad_a.mul_(h_up), h_gate)
        return grad_gate, grad_up
    if activation == "clamped_swiglu":
        assert h_gate is not None, "clamped_swiglu needs the gate projection"
        g = h_gate.clamp(max=CLAMP_LIMIT)
        sig = torch.sigmoid(CLAMP_ALPHA * g)
        up = h_up.clamp(-CLAMP_LIMIT, CLAMP_LIMIT)
        # clamp passes the gradient only where it did not clip (torch's convention, bounds inclusive)
        grad_gate = grad_a * (up + 1) * sig * (1 + CLAMP_ALPHA * g * (1 - sig)) * (h_gate <= CLAMP_LIMIT)
        grad_up = grad_a * (g * sig) * (h_up.abs() <= CLAMP_LIMIT)
        return grad_gate, grad_up
    if activation == "gelu":
        return None, torch.ops.aten.gelu_backward(grad_a, h_up)
    if activation == "relu":
        return None, torch.ops.aten.threshold_backward(grad_a, h_up, 0)
    raise ValueError(_unknown(activation))


def _unknown(activation: str) -> str:
    return f"unknown expert activation {activation!r}: use one of {', '.join(ACTIVATIONS)}"

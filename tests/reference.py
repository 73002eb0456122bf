"""Shared oracles for the tests: the dumbest possible implementations, independent of moekit's engines."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def act(activation: str, g: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(g) * u
    return F.gelu(u) if activation == "gelu" else F.relu(u)


def per_token_moe(x_TD, ids_TK, weights_TK, w_gate, w_up, w_down, activation="swiglu"):
    """A per-token, per-slot loop of F.linear (scattermoe-style oracle)."""
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e < 0:
                continue
            u = F.linear(x_TD[t], w_up[e])
            g = F.linear(x_TD[t], w_gate[e]) if w_gate is not None else None
            y = y + weights_TK[t, k] * F.linear(act(activation, g, u), w_down[e])
        rows.append(y)
    return torch.stack(rows)


def dense_ffn(x, w_gate, w_up, w_down, activation="swiglu"):
    g = F.linear(x, w_gate) if w_gate is not None else None
    return F.linear(act(activation, g, F.linear(x, w_up)), w_down)


def assert_close(actual, expected, name="", atol=1e-5, rtol=1e-4):
    diff = (actual - expected).abs()
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol,
        msg=lambda m: f"{name}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}\n{m}")

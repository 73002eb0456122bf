"""Rotary positions (RoPE, Su et al., arXiv 2104.09864 eq. 34), shared by the dense attention and its variants.

Dim legend: B batch, H heads, S positions, Dh head dim, R = Dh / 2 rotation frequencies.

Each pair ``(x_2i, x_2i+1)`` of queries and keys is rotated by ``pos * theta^(-2i/Dh)``, so that attention
scores depend on relative positions only.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "apply_rope_any_width", "rope_tables"]


def rope_tables(context: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[context, head_dim / 2]`` (float32)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSDh: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dimension.

    The tables are ``[S, R]`` (the same positions for every sequence) or ``[B, S, R]`` (per-sequence positions,
    e.g. the tokens a Mixture-of-Depths router selected).
    """
    if cos_SR.dim() == 3:
        cos_SR, sin_SR = cos_SR[:, None], sin_SR[:, None]
    x = x_BHSDh.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((x0 * cos_SR - x1 * sin_SR, x0 * sin_SR + x1 * cos_SR), dim=-1)
    return out.flatten(-2).to(x_BHSDh.dtype)


def apply_rope_any_width(x_BHSDh: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotary positions for a head width that may differ from the model's tables (an attention variant's heads).

    The first ``2 * min(Dh / 2, R)`` dimensions are rotated with the tables' first frequencies and the rest pass
    unchanged: partial rotary (as in GPT-NeoX) when the heads are wider than the model's, the model's highest
    frequencies when they are narrower. With equal widths this is :func:`apply_rope`.
    """
    r = min(x_BHSDh.shape[-1] // 2, cos_SR.shape[-1])
    if 2 * r == x_BHSDh.shape[-1] and r == cos_SR.shape[-1]:
        return apply_rope(x_BHSDh, cos_SR, sin_SR)
    rotated = apply_rope(x_BHSDh[..., : 2 * r], cos_SR[..., :r], sin_SR[..., :r])
    return torch.cat((rotated, x_BHSDh[..., 2 * r:]), dim=-1)

"""Activation quantisation of compressed experts, and the block-Hadamard rotation folded into their weights
(EAQuant's W4A4/W4A8 pipeline, spec §5; MoTE's int8 activations, spec §6).

Dim legend: T tokens, C channels (D model dim for an expert's input, F hidden dim for ``w_down``'s input),
R rows, B rotation block.

*Activation quantisation* is simulated (fake quantisation: quantise, then dequantise, in float32): per token,
symmetric, ``x̂ = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) · s``, ``s = clip · max_c |x_c| / (2^(b-1) - 1)``.
Per-token absmax with ``b = 8`` and ``clip = 1`` is BitNet b1.58's rule that MoTE's QAT uses
(:func:`moekit.compression.mote.act_quant_int8` gives exactly the same values). EAQuant's released code clips
activations at 0.9 of the range (``lac``) and quantises asymmetrically; this library uses the symmetric
quantiser and lets ``act_clip`` set the clipping (our choice: a symmetric grid needs no zero point per token).

*Rotation* (our reading of spec §5's "DuQuant-style block-wise rotation"): a block-diagonal Hadamard matrix
``H = diag(H_B, ..., H_B) / sqrt(B)``, ``B`` the largest power of two dividing ``C``, at most
:data:`MAX_BLOCK`. ``H`` is orthogonal and symmetric, so ``x Wᵀ = (x H)(W H)ᵀ``: the stored expert weights are
``W H`` (the rotation is folded into them before they are quantised) and the expert rotates its input online
(``x H``) before quantising it, both for ``w_gate``/``w_up`` (C = D) and for ``w_down`` (C = F, QuaRot's online
Hadamard before the down projection). A rotation spreads an outlier channel over its block, which is what
makes 4-bit activations usable. DuQuant *learns* its block rotations greedily and adds a zig-zag channel
permutation; neither is done here (a fixed Hadamard is QuaRot's choice and needs no calibration).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["ACT_BITS", "MAX_BLOCK", "act_fake_quant", "hadamard_block", "rotate", "rotation_block"]

ACT_BITS = (0, 4, 8, 16)  # 0 and 16: activations stay float
MAX_BLOCK = 128


def act_fake_quant(x_TC: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Per-token symmetric fake quantisation to ``bits`` bits (``0`` or ``16``: the identity)."""
    if bits in (0, 16):
        return x_TC
    qmax = 2 ** (bits - 1) - 1
    inv_T1 = qmax / (clip * x_TC.abs().amax(dim=-1, keepdim=True)).clamp_min(1e-5)
    return torch.clamp(torch.round(x_TC * inv_T1), -qmax - 1, qmax) / inv_T1


def rotation_block(channels: int) -> int:
    """The Hadamard block size for ``channels``: the largest power of two dividing it, capped at 128."""
    return math.gcd(channels, MAX_BLOCK)


@lru_cache(maxsize=16)
def hadamard_block(size: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix ``[size, size]`` (``size`` a power of two), float32."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {size}")
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


def rotate(x_XC: torch.Tensor) -> torch.Tensor:
    """``x H`` over the last dimension (block-diagonal Hadamard). Applied to a weight ``[R, C]`` it gives the
    folded ``W H``; applied to activations, their online rotation. ``H`` is its own inverse."""
    C = x_XC.shape[-1]
    B = rotation_block(C)
    if B == 1:
        return x_XC
    h = hadamard_block(B).to(device=x_XC.device, dtype=x_XC.dtype)
    return (x_XC.reshape(*x_XC.shape[:-1], C // B, B) @ h).reshape(x_XC.shape)

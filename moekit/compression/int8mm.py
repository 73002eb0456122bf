"""An integer matmul path for ``int`` banks (RTN / GPTQ codes, 2-8 bits) on CPU: ``torch._int_mm``.

Dim legend: T tokens, C input channels, R output channels (rows of the weight).

Activations are quantised on the fly per token, symmetric int8 (``s_T = max|x_T| / 127``,
``xq = clamp(round(x / s_T), -127, 127)``). A weight code ``q ∈ [0, 2^b)`` with per-row scale and zero point
(``w = (q - z_R) s_R``) is shifted by ``c = 2^(b-1)`` so ``q - c`` fits int8 for every ``b <= 8``; then

``y_TR = s_T s_R (Σ_C xq_TC (q_RC - c) + (c - z_R) Σ_C xq_TC) + bias_R``,

with the sum an int32 ``torch._int_mm``. It equals dequantise-then-matmul of the *quantised* activations up to
float rounding (:func:`reference_linear`); against float activations it adds the int8 activation error.
Inference only: integer matmuls have no backward, so the bank takes this path only when no gradient is needed.
:func:`set_matmul` switches every compressed layer of a model (``moekit eval`` / ``sample --matmul int8``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MATMULS", "int8_linear", "quantize_activations", "reference_linear", "set_matmul", "shifted_codes"]

MATMULS = ("dequantize", "int8")


def set_matmul(model: nn.Module, mode: str) -> int:
    """Run every compressed expert bank of ``model`` through ``mode`` (``dequantize``, or ``int8``: ``torch._int_mm``
    on CPU, ``int`` banks only); returns the number of banks switched.

    Raises :class:`~.calibrate.CompressionError` naming what to change for an unknown mode, a model without
    compressed experts, a bank of another format (``int8`` needs RTN / GPTQ / EAQuant codes) or a bank off the CPU.
    """
    from .bank import CompressedBank
    from .calibrate import CompressionError, find_moe_layers
    if mode not in MATMULS:
        raise CompressionError(f"matmul={mode!r} is unknown; choose one of {', '.join(MATMULS)}")
    banks = [(name, moe.experts) for name, moe in find_moe_layers(model) if isinstance(moe.experts, CompressedBank)]
    if not banks:
        raise CompressionError(f"--matmul {mode} applies to runs written by moekit compress, and this run's experts "
                               f"are not compressed; compress it first (e.g. --method rtn --bits 8)")
    for name, bank in banks:
        if mode == "int8" and bank.spec.format != "int":
            raise CompressionError(f"--matmul int8 needs integer-coded experts (format 'int': methods rtn, gptq, "
                                   f"eaquant), but {name} stores format {bank.spec.format!r}; drop --matmul int8 "
                                   f"(these experts dequantise as they run) or compress with --method rtn/gptq")
        if mode == "int8" and bank.slot_to_stored_E.device.type != "cpu":
            raise CompressionError(f"--matmul int8 runs on the CPU (torch._int_mm), but {name} is on "
                                   f"{bank.slot_to_stored_E.device}; add --device cpu")
    for _, bank in banks:
        bank.matmul = mode
    return len(banks)


def quantize_activations(x_TC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: ``(xq_TC int8, s_T float32)``; an all-zero token gets scale 1."""
    s_T = x_TC.abs().amax(dim=1).float() / 127
    s_T = torch.where(s_T > 0, s_T, torch.ones_like(s_T))
    xq = torch.clamp(torch.round(x_TC.float() / s_T[:, None]), -127, 127).to(torch.int8)
    return xq, s_T


def shifted_codes(q_RC: torch.Tensor, bits: int) -> torch.Tensor:
    """``q - 2^(bits-1)`` as int8 (codes ``[R, C]`` in ``[0, 2^bits)``)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"the int8 path takes 1-8 bit codes, not {bits}")
    return (q_RC.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def int8_linear(x_TC: torch.Tensor, w8_RC: torch.Tensor, bits: int, scale_R: torch.Tensor, zero_R: torch.Tensor,
                bias_R: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantise(q).T + bias`` through ``torch._int_mm``; ``w8_RC`` from :func:`shifted_codes`."""
    xq, s_T = quantize_activations(x_TC)
    acc_TR = torch._int_mm(xq, w8_RC.t())  # int32
    rowsum_T = xq.to(torch.int32).sum(dim=1)
    c = 2 ** (bits - 1)
    y = (acc_TR.float() + (c - zero_R.float())[None, :] * rowsum_T.float()[:, None]) * (s_T[:, None] * scale_R.float())
    return (y if bias_R is None else y + bias_R).to(x_TC.dtype)


def reference_linear(x_TC: torch.Tensor, q_RC: torch.Tensor, scale_R: torch.Tensor, zero_R: torch.Tensor,
                     bias_R: torch.Tensor | None = None, *, quantize_x: bool = True) -> torch.Tensor:
    """The readable reference: (optionally int8-quantised) activations times the dequantised weight, in float64."""
    x = x_TC.double()
    if quantize_x:
        xq, s_T = quantize_activations(x_TC)
        x = xq.double() * s_T.double()[:, None]
    w = (q_RC.double() - zero_R.double()[:, None]) * scale_R.double()[:, None]
    y = x @ w.T
    return y if bias_R is None else y + bias_R.double()

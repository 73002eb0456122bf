"""GPTQ (Frantar et al. 2023, arXiv 2210.17323; spec P4), written once for QMoE, EAQuant and D²MoE.

Dim legend: R rows (output channels), C columns (input channels), T calibration tokens.

Quantise ``W_RC`` one column at a time onto a fixed per-row grid, using the Hessian ``H = 2 X Xᵀ`` of the layer's
inputs ``X_CT``. After rounding column ``j`` the error ``(w_j - q_j) / [H⁻¹]_jj`` is spread over the columns not
yet quantised through the upper Cholesky factor of ``H⁻¹``, lazily in blocks of ``blocksize`` columns (128).
``H`` is damped by ``percdamp * mean(diag H)``; columns no input ever reached (``H_jj = 0``) are set to zero, as
in the reference implementation. The grid comes from the whole row (groupsize -1, no act-order: QMoE's settings).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .quant import RowGrid

__all__ = ["gptq", "hessian"]


def hessian(x_TC: torch.Tensor) -> torch.Tensor:
    """``H = 2 X Xᵀ / T`` (float64 accumulation; the ``1/T`` only rescales, it does not change GPTQ's result)."""
    x = x_TC.double()
    return (2.0 / max(x.shape[0], 1)) * (x.T @ x)


def gptq(w_RC: torch.Tensor, h_CC: torch.Tensor, make_grid: Callable[[torch.Tensor], RowGrid], *,
         blocksize: int = 128, percdamp: float = 0.1) -> tuple[torch.Tensor, RowGrid]:
    """GPTQ-quantise ``w_RC`` given its input Hessian ``h_CC``.

    Args:
        make_grid: builds the per-row grid from the (original) weights, e.g. ``lambda w: minmax_grid(w, 4)``.
        blocksize: columns per lazy-update block (128 in GPTQ and QMoE).
        percdamp: damping as a fraction of the mean diagonal of ``H`` (QMoE: 0.1).

    Returns:
        ``(codes_RC, grid)``: integer codes on ``grid``; ``grid.dequantize(codes)`` is the quantised weight.
    """
    if percdamp < 0:
        raise ValueError(f"percdamp={percdamp} must be >= 0 (GPTQ's default is 0.01, QMoE's 0.1)")
    W = w_RC.detach().double().clone()
    H = h_CC.detach().double().clone()
    R, C = W.shape
    if H.shape != (C, C):
        raise ValueError(f"Hessian has shape {tuple(H.shape)} but the weight has {C} columns; build it from "
                         f"the layer's inputs with hessian(x_TC)")
    grid = make_grid(w_RC.float())
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.diag(H).mean() * torch.eye(C, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(R, C, dtype=torch.long)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            w = W1[:, j]
            q = grid.quantize(w[:, None].float())[:, 0]
            Q[:, i1 + j] = q
            err = (w - grid.dequantize(q[:, None]).double()[:, 0]) / Hinv1[j, j]
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
            Err1[:, j] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, grid

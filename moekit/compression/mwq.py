"""D²MoE's matryoshka weight quantisation (MWQ; MobiCom '25; spec §7, the quantiser and format only).

Dim legend: R rows, C columns, N groups per row (``C / group_size``), T calibration tokens, L residual levels.

A weight is stored as a ``b_1``-bit per-group asymmetric base ``Ŵ_1 = (Q_1 - z) s_1`` plus ``L`` binary residual
planes: plane ``k`` holds ``Q_k = sign(W − Ŵ_{k−1}) ∈ {±1}`` with its own per-group scale ``s_k``, and
``Ŵ_k = Ŵ_{k−1} + s_k Q_k``. Any prefix of the planes is therefore a valid lower-bit expert (``b_1 + k − 1``
bits), which the serving side can load base-first.

Scales fit the *output* error ``‖(W − Ŵ) X‖²`` on calibration inputs (``H = X Xᵀ``):
- residual scales by exact least squares, jointly over the groups of a row (so, with ``s = 0`` always feasible,
  the calibration error never grows from one level to the next);
- the base's per-group range by a clipping search *(our choice: the search scores
  ``Σ_c H_cc (w_c − ŵ_c)²``, the diagonal of the output error)*.
Block-level GPTQ error compensation: after each block of 128 columns is quantised (all levels), the top level's
error is spread over the later columns through the Cholesky factor of ``(2XXᵀ + λI)⁻¹``, with no column-level
correction inside the block *(the lower prefixes inherit the compensation computed for the top level)*.
"""

from __future__ import annotations

import torch

__all__ = ["MWQ", "mwq_quantize", "output_error", "residual_scales"]

CLIPS = torch.linspace(0.5, 1.0, 11)


class MWQ:
    """One MWQ-quantised matrix: ``codes_RC`` (base), ``signs_LRC`` (±1), ``scale_RN``, ``zero_RN``, ``rscale_LRN``."""

    def __init__(self, codes_RC, signs_LRC, scale_RN, zero_RN, rscale_LRN, bits: int, group_size: int) -> None:
        self.codes_RC, self.signs_LRC = codes_RC, signs_LRC
        self.scale_RN, self.zero_RN, self.rscale_LRN = scale_RN, zero_RN, rscale_LRN
        self.bits, self.group_size = bits, group_size

    def reconstruct(self, levels: int | None = None) -> torch.Tensor:
        """``Ŵ`` using the base and the first ``levels`` residual planes (all when None)."""
        return reconstruct(self.codes_RC, self.signs_LRC, self.scale_RN, self.zero_RN, self.rscale_LRN,
                           self.group_size, levels)


def _expand(p_RN: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    return p_RN.repeat_interleave(group_size, dim=-1)[..., :cols]


def reconstruct(codes_RC, signs_LRC, scale_RN, zero_RN, rscale_LRN, group_size: int, levels: int | None = None):
    C = codes_RC.shape[1]
    w = (codes_RC.float() - _expand(zero_RN.float(), group_size, C)) * _expand(scale_RN.float(), group_size, C)
    L = signs_LRC.shape[0] if levels is None else levels
    for k in range(L):
        w = w + _expand(rscale_LRN[k].float(), group_size, C) * signs_LRC[k].float()
    return w


def output_error(w_RC: torch.Tensor, w_hat_RC: torch.Tensor, h_CC: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ) = ‖(W − Ŵ) X‖²`` for ``H = X Xᵀ``."""
    d = (w_RC - w_hat_RC).double()
    return float(((d @ h_CC.double()) * d).sum())


def _base(w_RC: torch.Tensor, h_diag_C: torch.Tensor, bits: int, group_size: int):
    R, C = w_RC.shape
    pad = (-C) % group_size
    w = torch.nn.functional.pad(w_RC, (0, pad)).view(R, -1, group_size)
    hd = torch.nn.functional.pad(h_diag_C, (0, pad)).view(1, -1, group_size)
    lo0, hi0 = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    levels = 2 ** bits - 1
    best = torch.full(lo0.shape, float("inf"))
    best_s, best_z = torch.ones_like(lo0), torch.zeros_like(lo0)
    for r in CLIPS.tolist():
        s = torch.where(hi0 - lo0 > 0, (hi0 - lo0) * r / levels, torch.ones_like(lo0))
        z = torch.round(-lo0 * r / s)
        q = torch.clamp(torch.round(w / s[..., None]) + z[..., None], 0, levels)
        err = (hd * ((q - z[..., None]) * s[..., None] - w).square()).sum(-1)
        better = err < best
        best, best_s, best_z = torch.where(better, err, best), torch.where(better, s, best_s), torch.where(better, z, best_z)
    q = torch.clamp(torch.round(w / best_s[..., None]) + best_z[..., None], 0, levels)
    return q.view(R, -1)[:, :C].long(), best_s, best_z


def residual_scales(res_RC: torch.Tensor, signs_RC: torch.Tensor, h_CC: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-row joint least squares over groups: ``s_RN = argmin ‖(res − Σ_g s_g Q_g) X‖²``."""
    R, C = res_RC.shape
    pad = (-C) % group_size
    N = (C + pad) // group_size
    Q = torch.nn.functional.pad(signs_RC.double(), (0, pad)).view(R, N, group_size)
    Hp = torch.nn.functional.pad(h_CC.double(), (0, pad, 0, pad))
    P = torch.einsum("gjhk,rhk->rgjh", Hp.view(N, group_size, N, group_size), Q)
    A = torch.einsum("rgj,rgjh->rgh", Q, P)  # [R, N, N]: the Gram matrix of the groups' output directions
    resH = (torch.nn.functional.pad(res_RC.double(), (0, pad)) @ Hp).view(R, N, group_size)
    b = (Q * resH).sum(-1)
    ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
    A = A + ridge[:, None, None] * torch.eye(N, dtype=A.dtype)
    return torch.linalg.solve(A, b[..., None])[..., 0].float()


def _quantize_block(w_RC, h_CC, bits, levels, group_size):
    codes, s, z = _base(w_RC, torch.diagonal(h_CC).float().clamp_min(1e-8), bits, group_size)
    base = reconstruct(codes, torch.zeros(0, *w_RC.shape), s, z, torch.zeros(0, *s.shape), group_size)
    signs, rscales, cur = [], [], base
    for _ in range(levels):
        res = w_RC - cur
        q = torch.where(res >= 0, 1.0, -1.0)
        sc = residual_scales(res, q, h_CC, group_size)
        cur = cur + _expand(sc, group_size, w_RC.shape[1]) * q
        signs.append(q)
        rscales.append(sc)
    return codes, torch.stack(signs) if signs else torch.zeros(0, *w_RC.shape), s, z, \
        torch.stack(rscales) if rscales else torch.zeros(0, *s.shape), cur


def mwq_quantize(w_RC: torch.Tensor, h_CC: torch.Tensor, *, bits: int = 2, levels: int = 2, group_size: int = 128,
                 blocksize: int = 128, percdamp: float = 0.01) -> MWQ:
    """MWQ of ``w_RC`` (base ``bits`` + ``levels`` residual planes) with block-level error compensation."""
    if blocksize % group_size and group_size % blocksize:
        raise ValueError(f"blocksize={blocksize} and group_size={group_size} must nest")
    W = w_RC.detach().double().clone()
    C = W.shape[1]
    H = h_CC.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += percdamp * torch.diag(H).mean() * torch.eye(C, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    step = max(blocksize, group_size)
    parts = []
    for i1 in range(0, C, step):
        i2 = min(i1 + step, C)
        block = _quantize_block(W[:, i1:i2].float(), h_CC[i1:i2, i1:i2], bits, levels, group_size)
        parts.append(block)
        err = (W[:, i1:i2] - block[5].double())
        # block-level compensation: err_blk · U_blk⁻¹ · U[blk, rest] (GPTQ's lazy update without inner columns)
        E = torch.linalg.solve_triangular(Hinv[i1:i2, i1:i2], err, upper=True, left=False)
        W[:, i2:] -= E @ Hinv[i1:i2, i2:]
    def cat(i: int, d: int) -> torch.Tensor:
        return torch.cat([p[i] for p in parts], dim=d)
    return MWQ(cat(0, 1), cat(1, 2), cat(2, 1), cat(3, 1), cat(4, 2), bits, group_size)

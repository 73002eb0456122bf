"""1.5-entmax (Peters, Niculae, Martins 2019, "Sparse Sequence-to-Sequence Models", arXiv 1905.05702): a
softmax-like map onto the simplex whose outputs are exactly sparse. Used as the gate of μMoE.

Dim legend: T rows, N entries per row.

``entmax15(z)_i = max(z_i / 2 - tau, 0)^2`` with the threshold ``tau`` such that the row sums to 1. ``tau`` is
found exactly by sorting (the paper's Algorithm 2): for a support of the ``k`` largest entries it solves
``sum_{j<=k} (z_j/2 - tau)^2 = 1``; the support is the largest ``k`` whose ``tau`` lies below ``z_k/2``.
The backward is the closed form Jacobian-vector product ``g * s - s * sum(g * s) / sum(s)``, ``s = sqrt(p)``
(an autograd graph through the sort would take ``sqrt`` of zero off the support and return NaN).
"""

from __future__ import annotations

import torch

__all__ = ["entmax15"]


def _threshold(z_TN: torch.Tensor) -> torch.Tensor:
    """``tau`` per row (``[T, 1]``) for ``z`` already halved and shifted so that its max is 0."""
    zs_TN, _ = z_TN.sort(dim=-1, descending=True)
    k_N = torch.arange(1, z_TN.shape[-1] + 1, dtype=z_TN.dtype, device=z_TN.device)
    mean_TN = zs_TN.cumsum(-1) / k_N
    mean_sq_TN = zs_TN.square().cumsum(-1) / k_N
    delta_TN = (1 - k_N * (mean_sq_TN - mean_TN.square())) / k_N
    tau_TN = mean_TN - delta_TN.clamp_min(0).sqrt()
    support_T1 = (tau_TN <= zs_TN).sum(-1, keepdim=True)
    return tau_TN.gather(-1, support_T1 - 1)


class _Entmax15(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        z = z / 2
        z = z - z.amax(-1, keepdim=True)
        p = (z - _threshold(z)).clamp_min(0).square()
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        s = p.sqrt()
        grad_s = grad_p * s
        return grad_s - s * grad_s.sum(-1, keepdim=True) / s.sum(-1, keepdim=True)


def entmax15(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax of ``z`` along ``dim``: non-negative, sums to 1, exactly 0 for low scores."""
    if dim in (-1, z.dim() - 1):
        return _Entmax15.apply(z)
    return _Entmax15.apply(z.transpose(dim, -1)).transpose(dim, -1)

"""Heterogeneous routing pieces of MoE++ (Jin et al. 2024, arXiv 2410.07348): a pool of ``N`` FFN experts plus
``M`` zero-computation (ZC) experts whose capacity and balance weight differ.

Dim legend: T tokens, E experts in the pool (N + M), K slots per token.

- Heterogeneous balance loss (paper eq. 7): ``L_b = sum_i eta_i f_i P_i`` with ``eta_i = 1`` for FFN experts and
  ``tau`` for ZC experts, ``f_i = (1/T) sum_t 1[t selects i]`` (so ``sum f = K``) and ``P_i`` the mean router
  probability. No ``N`` prefactor (as written in the paper).
- Heterogeneous capacity (paper eq. 8): FFN expert ``C = gamma * tau * A / (tau N + M)``, ZC expert
  ``C = gamma * A / (tau N + M)``. The paper writes ``T`` for the token count; we use ``A = T * K`` assignments
  so that the capacities cover the ``K`` choices of a top-K router (identical for ``K = 1``).
"""

from __future__ import annotations

import torch

from .selectors import _ratio

__all__ = ["heterogeneous_balance_loss", "heterogeneous_capacities", "limit_capacity_per_expert"]


def heterogeneous_balance_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor, num_ffn: int, tau: float) -> torch.Tensor:
    """Unweighted MoE++ balance loss ``sum_i eta_i f_i P_i`` (``-1`` slots ignored)."""
    T, E = probs_TE.shape
    counts_E = torch.bincount(ids_TK.reshape(-1) + 1, minlength=E + 1)[1:].to(probs_TE.dtype)
    f_E = counts_E / T
    eta_E = torch.ones(E, dtype=probs_TE.dtype, device=probs_TE.device)
    eta_E[num_ffn:] = tau
    return (eta_E * f_E.detach() * probs_TE.mean(0)).sum()


def heterogeneous_capacities(num_assignments: int, num_ffn: int, num_zc: int, tau: float,
                             capacity_factor: float) -> tuple[int, int]:
    """``(ffn_capacity, zc_capacity)`` per expert (each at least 1)."""
    # exact integer arithmetic (no float rounding across a whole number; traceable by torch.compile):
    # denom = t * num_ffn + num_zc with t = tp / tq, cf = cp / cq
    (cp, cq), (tp, tq) = _ratio(capacity_factor), _ratio(tau)
    denom = tp * num_ffn + num_zc * tq  # times tq
    ffn = max(1, -(-(cp * tp * num_assignments) // (cq * denom)))
    zc = max(1, -(-(cp * tq * num_assignments) // (cq * denom)))
    return ffn, zc


def limit_capacity_per_expert(ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                              capacity_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacity limit with a per-expert capacity; same priority as :func:`limit_capacity` (first choices of
    all tokens before second choices, then sequence order). Dropped slots get id -1 and weight 0."""
    T, K = ids_TK.shape
    E = capacity_E.numel()
    ids_N = ids_TK.t().reshape(-1)
    valid_N = ids_N >= 0
    safe_N = torch.where(valid_N, ids_N, torch.full_like(ids_N, E))  # empty slots into a spare bin
    order_N = torch.argsort(safe_N, stable=True)
    counts = torch.bincount(safe_N, minlength=E + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_N = torch.empty_like(ids_N)
    rank_N[order_N] = torch.arange(ids_N.numel(), device=ids_N.device) - starts[safe_N[order_N]]
    cap_N = torch.cat([capacity_E, capacity_E.new_zeros(1)])[safe_N]
    keep_TK = (valid_N & (rank_N < cap_N)).view(K, T).t()
    return ids_TK.masked_fill(~keep_TK, -1), weights_TK.masked_fill(~keep_TK, 0.0)

"""Balancing losses: pure functions of router outputs, returned unweighted (the router weights them).

Dim legend: T tokens, E experts, K slots per token, B sequences, S tokens per sequence.

- Load-balancing loss (Switch, arXiv 2101.03961 eqs. 4-6): ``E * sum_i f_i * P_i`` where ``f_i`` is the
  fraction of assignments routed to expert ``i`` (no gradient) and ``P_i`` the mean router probability.
  By default ``f`` counts all ``k`` choices of every token (Switch's loss generalised to top-k, as in
  Megatron-LM's and DeepSpeed's top-k gating); ``first_choice=True`` counts each token's first choice only
  (GShard's top-2 loss, arXiv 2006.16668 Algorithm 1). Uniform routing gives exactly 1 in both forms.
  The sequence-level form (DeepSeek-V2/V3 sequence-wise balance loss, V3 eqs. 17-20) computes it per sequence
  and averages; for sigmoid scores the router passes ``P`` normalised over experts (V3's ``s / sum s``).
  The global-batch form (Qwen3, Megatron-Core's ``global_aux_loss``) sums the assignment counts behind ``f``
  over every data-parallel process while ``P`` stays local: each process's loss ``E * sum_i f_i P_i^r``
  averages over processes (through the gradient mean) to ``E * sum_i f_i P_i`` of the whole global batch,
  value and gradient, when processes hold equal token counts.
- Router z-loss (ST-MoE, arXiv 2202.08906 eq. 5): ``mean_t (logsumexp_j z_tj)^2``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["load_balancing_loss", "z_loss"]


def load_balancing_loss(
    probs_TE: torch.Tensor, ids_TK: torch.Tensor, num_sequences: int = 1, *, first_choice: bool = False,
    global_counts: bool = False, process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Load-balancing loss ``E * sum_i f_i * P_i``, unweighted; ``num_sequences > 1`` averages it over sequences.

    Args:
        probs_TE: router probabilities (rows summing to 1) with gradient.
        ids_TK: selected experts before capacity dropping (``-1`` slots ignored).
        num_sequences: ``B`` when the ``T = B*S`` rows are ``B`` sequences laid out one after the other.
        first_choice: ``f`` from slot 0 only (each token's highest-scoring choice; GShard) instead of all slots.
        global_counts: sum the assignment counts over ``process_group`` (default: the world) when
            ``torch.distributed`` is initialised (collective: every process must call it); needs
            ``num_sequences == 1``.
    """
    T, E = probs_TE.shape
    collective = global_counts and dist.is_available() and dist.is_initialized()
    if T == 0 and not collective:  # no tokens: nothing to balance (a mean over none would be NaN); keeps the graph
        return probs_TE.sum() * 0.0
    if T % num_sequences:
        raise ValueError(f"{T} tokens do not split into {num_sequences} equal sequences; "
                         f"use aux_loss_level='batch' for ragged input")
    B = num_sequences
    if first_choice:
        ids_TK = ids_TK[:, :1]
    ids_BN = (ids_TK + 1).reshape(B, -1)  # empty slots (-1) land in column 0, dropped below
    assigned_BE = torch.zeros(B, E + 1, device=probs_TE.device, dtype=probs_TE.dtype)
    assigned_BE = assigned_BE.scatter_add_(1, ids_BN, torch.ones_like(ids_BN, dtype=probs_TE.dtype))[:, 1:]
    if collective:
        if B != 1:
            raise ValueError("global_counts sums whole batches over processes; use num_sequences=1")
        assigned_BE = assigned_BE.detach().contiguous()
        dist.all_reduce(assigned_BE, group=process_group)  # every process takes part, even with no tokens
        if T == 0:
            return probs_TE.sum() * 0.0
    f_BE = assigned_BE / assigned_BE.sum(-1, keepdim=True).clamp_min(1.0)
    P_BE = probs_TE.view(B, T // B, E).mean(1)
    return (E * (f_BE.detach() * P_BE).sum(-1)).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss, unweighted (0 for no tokens, not the NaN of an empty mean)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.float().sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()

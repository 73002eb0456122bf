"""Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts", arXiv 2403.07652,
github ZhenweiAn/Dynamic_MoE).

Dim legend: T tokens, E experts.

Sort each token's probabilities in descending order and keep sorted position ``j`` if ``cumsum_j <= P`` or ``j``
is the first position where ``cumsum_j > P``; equivalently the *exclusive* cumulative sum before ``j`` is
``<= P``. At least one expert is always kept; the weights are the raw probabilities (no renormalisation).
The dynamic loss ``L_dyn = mean_t(-sum_i p_ti log p_ti)`` (entropy minimisation) stops the router from flattening
``p`` to recruit many experts.
"""

from __future__ import annotations

import torch

__all__ = ["select_topp", "router_entropy"]


def select_topp(probs_TE: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p selection. Returns ``(expert_ids_TK, weights_TK)`` in descending probability order, ``K`` = the
    largest set of any token (at most E); slots past each token's set are ``-1`` with weight 0."""
    sorted_TE, order_TE = probs_TE.detach().sort(dim=-1, descending=True)
    before_TE = sorted_TE.cumsum(-1) - sorted_TE  # exclusive cumulative sum
    keep_TE = before_TE <= threshold
    keep_TE[:, 0] = True
    # kept slots are a prefix in sorted order: trim to the widest token (one host sync; engines sync anyway)
    k = int(keep_TE.sum(-1).max())
    keep_TK, order_TK = keep_TE[:, :k], order_TE[:, :k]
    ids_TK = order_TK.masked_fill(~keep_TK, -1)
    weights_TK = probs_TE.gather(1, order_TK).masked_fill(~keep_TK, 0.0)
    return ids_TK, weights_TK


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """``mean_t(-sum_i p_ti log p_ti)`` (unweighted)."""
    return -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1).mean()

"""Selectors: which experts each token uses, and with what weight.

Pure functions of scores; no parameters. Dim legend: T tokens, E experts, K slots per token, G groups.

- top-k (Shazeer 2017, GShard, Switch, Mixtral), optionally group-limited (DeepSeek-V2/V3) and with a
  selection-only bias (DeepSeek-V3 auxiliary-loss-free balancing, arXiv 2412.19437 §2.1.2);
- capacity limit with token dropping (GShard / Switch, arXiv 2101.03961 eq. 3);
- expert choice (Zhou et al. 2022, arXiv 2202.09368): each expert picks its top tokens.
"""

from __future__ import annotations

from fractions import Fraction

import torch

__all__ = ["select_topk", "limit_capacity", "select_expert_choice", "capacity", "token_count"]


def _ratio(value: float | Fraction) -> tuple[int, int]:
    """``value`` as the decimal it is written as, ``(numerator, denominator)`` (``0.29`` is 29/100, not the
    nearest binary float). Plain integer arithmetic, so ``torch.compile`` traces it with symbolic token counts."""
    if isinstance(value, Fraction):
        return value.numerator, value.denominator
    text = repr(float(value))
    if "e" in text or "n" in text:  # 1e-05, inf, nan: rare; exact through Fraction
        exact = Fraction(text)
        return exact.numerator, exact.denominator
    whole, _, decimals = text.partition(".")
    return int(whole + decimals), 10 ** len(decimals)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Switch/GShard expert capacity ``C = ceil(CF * K * T / E)`` (at least 1), computed exactly.

    ``CF`` is read as the decimal it is written as (``1.1`` is 11/10, not the binary float just above it), and
    the product is rational, so ``capacity(100, 10, 1, 1.1) == 11`` where float arithmetic gives 12.
    """
    p, q = _ratio(capacity_factor)
    return max(1, -(-(p * top_k * num_tokens) // (q * num_experts)))


def token_count(fraction: float | Fraction, num_tokens: int) -> int:
    """``max(1, floor(fraction * num_tokens))`` computed exactly: how many of ``num_tokens`` a capacity
    ``fraction`` keeps (Mixture-of-Depths / Mixture-of-Recursions). ``0.29 * 100`` gives 29, not the float's 28."""
    p, q = _ratio(fraction)
    return max(1, (p * num_tokens) // q)


def _group_mask(choice_TE: torch.Tensor, num_groups: int, topk_groups: int, group_score: str) -> torch.Tensor:
    """Mask (True = allowed) keeping each token's ``topk_groups`` best groups of experts."""
    T, E = choice_TE.shape
    grouped_TGe = choice_TE.view(T, num_groups, E // num_groups)
    if group_score == "top2_sum" and grouped_TGe.shape[-1] >= 2:
        group_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
    else:
        group_TG = grouped_TGe.amax(-1)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_TG.topk(topk_groups, dim=-1).indices, True)
    return keep_TG.repeat_interleave(E // num_groups, dim=1)


def select_topk(
    scores_TE: torch.Tensor,
    top_k: int,
    *,
    bias_E: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2_sum",
    normalize: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection.

    The bias only changes *which* experts are chosen; the weights are always gathered from the unbiased
    ``scores_TE`` (DeepSeek-V3). With ``normalize`` the selected weights sum to 1 (Mixtral's softmax over
    the selected logits equals this renormalisation of the full softmax).

    Returns:
        ``(expert_ids_TK, weights_TK)``.
    """
    choice_TE = scores_TE.detach()
    if bias_E is not None:
        choice_TE = choice_TE + bias_E
    if num_groups > 1:
        allowed_TE = _group_mask(choice_TE, num_groups, topk_groups, group_score)
        choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
    ids_TK = choice_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    if scale != 1.0:
        weights_TK = weights_TK * scale
    return ids_TK, weights_TK


def limit_capacity(
    ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity_per_expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop assignments beyond each expert's capacity.

    Priority is deterministic: every token's first choice before any second choice, then sequence order
    (GShard's order). Dropped slots get id ``-1`` and weight exactly 0; the token rides the residual.
    """
    T, K = ids_TK.shape
    ids_N = ids_TK.t().reshape(-1)  # slot-major priority order
    order_N = torch.argsort(ids_N, stable=True)
    counts_E = torch.bincount(ids_N, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.empty_like(ids_N)
    rank_N[order_N] = torch.arange(ids_N.numel(), device=ids_N.device) - starts_E[ids_N[order_N]]
    keep_TK = (rank_N < capacity_per_expert).view(K, T).t()
    return ids_TK.masked_fill(~keep_TK, -1), weights_TK.masked_fill(~keep_TK, 0.0)


def select_expert_choice(
    scores_TE: torch.Tensor, tokens_per_expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert choice: each expert takes its ``tokens_per_expert`` highest-scoring tokens.

    A token may be chosen by 0..E experts, so ``K = E``: slot ``e`` of token ``t`` holds ``e`` if expert
    ``e`` chose the token and ``-1`` otherwise.
    """
    T, E = scores_TE.shape
    c = min(tokens_per_expert, T)
    top_tokens_CE = scores_TE.detach().topk(c, dim=0).indices
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=scores_TE.device)
    chosen_TE.scatter_(0, top_tokens_CE, True)
    experts_TE = torch.arange(E, device=scores_TE.device).expand(T, E)
    ids_TE = torch.where(chosen_TE, experts_TE, torch.full_like(experts_TE, -1))
    weights_TE = scores_TE.masked_fill(~chosen_TE, 0.0)
    return ids_TE, weights_TE

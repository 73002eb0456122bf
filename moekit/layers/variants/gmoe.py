"""Graph-of-tokens routing: Similarity-Aware and Attention-Aware SMoE (Nguyen, Tran, Nguyen, Baraniuk 2025,
"Improving Routing in Sparse Mixture of Experts with Graph of Tokens", arXiv 2505.00792).

Dim legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K slots per token.

A token's expert choice is made from the routing probabilities of the tokens similar to it (a graph of tokens
within each sequence), instead of from its own probabilities alone::

    p_s  = softmax(W_r x_s)                                   (the plain softmax router, float32)
    A    = softmax_row(X W_s X^T / tau)    [B, S, S]          (``similarity="learned"``: Similarity-Aware)
    A    = head-mean attention of the preceding attention layer  (``similarity="attention"``: Attention-Aware)
    p~_t = sum_s A_ts p_s                                     (a distribution: rows of A sum to 1)
    S_t  = TopK(p~_t, K),   g_t = p~_t[S_t] (renormalised per ``moe.router.norm_topk_prob``: unset, when K > 1)
    y_t  = sum_{i in S_t} g_ti E_i(x_t)                       (the layer's engine and bank; + shared experts)

Provenance: the spec (architectures.md §13) has the abstract only; the equations above are *recalled*. Choices
made here, to confirm against the paper before claiming parity:

- ``W_s`` is a full ``D x D`` bilinear form initialised to the identity and ``tau`` defaults to ``sqrt(D)``
  (attention-style scaling): with pre-normalised inputs a token's self-similarity dominates at step 0, so the
  layer starts close to plain softmax routing rather than from a uniform average over the sequence.
- ``causal=True`` (the default, for language models) lets token ``t`` look only at ``s <= t``, so routing never
  depends on future tokens; ``causal=False`` is the encoder / vision form.
- The balance loss is the baseline one, unchanged in form, computed on the probabilities the selection uses
  (``p~``): ``aux_loss`` (``moe.router.aux_loss_coef``, batch or sequence level) and ``z_loss`` on the raw logits.
- Attention-Aware routing reads ``ctx.state["attention.probs"]``: ``[B, S, S]`` (or ``[B, H, S, S]``, averaged
  over heads) attention probabilities written by the preceding attention layer, rows summing to 1. Inside
  :class:`~moekit.models.LanguageModel` the block asks its attention to publish them (``reads_attention``);
  used alone, the caller puts them there. The layer raises if they are missing.

Mixing probabilities is concave in the entropy: ``H(p~_t) >= sum_s A_ts H(p_s)`` (Jensen). The spec's "entropy
of p~ <= max entropy of the mixed p's" is not a theorem (mixing two one-hot rows gives log 2); the tests check
the Jensen bound instead. The ``[B, S, S]`` similarity costs ``O(S^2 D)`` per layer, like one attention head.
Statistics: ``self_weight`` (mean ``A_tt``), ``changed_top1`` (fraction of tokens whose top-1 expert under
``p~`` differs from the one under ``p``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...configs import check, check_choice
from ...routing.losses import load_balancing_loss, z_loss
from ...routing.selectors import select_topk
from ...types import Routing, RoutingContext
from ..attention.registry import ATTENTION_PROBS_KEY
from ..moe import MoE, MoEConfig
from ..registry import register_ffn
from ._common import PLAIN_TOPK, add_extra, flatten, parse_options, require_router

__all__ = ["GMoEConfig", "GraphOfTokensMoE", "ATTENTION_KEY", "mix_probabilities"]

ATTENTION_KEY = ATTENTION_PROBS_KEY  # "attention.probs", written by the block's attention (see registry)


@dataclass(frozen=True, kw_only=True, slots=True)
class GMoEConfig:
    """Attributes:
        similarity: ``learned`` (Similarity-Aware, ``softmax(X W_s X^T / tau)``) or ``attention``
            (Attention-Aware, the preceding attention layer's probabilities from ``ctx.state``).
        temperature: tau of the learned similarity; None is ``sqrt(D)``.
        causal: token ``t`` only mixes the probabilities of tokens ``s <= t`` (language models).
    """

    similarity: Literal["learned", "attention"] = "learned"
    temperature: float | None = None
    causal: bool = True

    def __post_init__(self) -> None:
        check_choice("variant", "similarity", self.similarity, ("learned", "attention"))
        check(self.temperature is None or self.temperature > 0,
              f"variant.temperature={self.temperature} must be positive, or None for sqrt(dim)")


def mix_probabilities(probs_BSE: torch.Tensor, sim_BSS: torch.Tensor) -> torch.Tensor:
    """``p~_t = sum_s A_ts p_s`` per sequence (``[B, S, E]``)."""
    return torch.bmm(sim_BSS, probs_BSE)


class GraphOfTokensMoE(nn.Module):
    """Top-k MoE whose selection uses routing probabilities smoothed over similar tokens of the sequence."""

    def __init__(self, moe: MoEConfig, config: GMoEConfig | None = None, name: str = "gmoe") -> None:
        super().__init__()
        self.config, self.name = config or GMoEConfig(), name
        require_router(moe.router, "graph-of-tokens routing", "mixes softmax probabilities for a dropless top-k",
                       **PLAIN_TOPK)
        self.moe = MoE(moe, name=name)
        if self.config.similarity == "learned":
            self.similarity_weight = nn.Parameter(torch.eye(moe.dim))  # W_s; identity: self-similarity first
        else:
            self.register_parameter("similarity_weight", None)

    @property
    def reads_attention(self) -> bool:
        """Attention-aware mode: the model's block has its attention publish probabilities to the context."""
        return self.config.similarity == "attention"

    def similarity(self, x_BSD: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        """Row-stochastic token graph ``A`` of shape ``[B, S, S]`` (float32)."""
        B, S, D = x_BSD.shape
        if self.config.similarity == "attention":
            return self._attention(ctx, B, S)
        x_BSD = x_BSD.float()
        tau = self.config.temperature or math.sqrt(D)
        scores_BSS = torch.bmm(x_BSD @ self.similarity_weight.float(), x_BSD.transpose(1, 2)) / tau
        if self.config.causal:
            future_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).triu(1)
            scores_BSS = scores_BSS.masked_fill(future_SS, float("-inf"))
        return scores_BSS.softmax(-1)

    def _attention(self, ctx: RoutingContext | None, B: int, S: int) -> torch.Tensor:
        attn = ctx.state.get(ATTENTION_KEY) if ctx is not None else None
        if attn is None:
            raise ValueError(f"{self.name}: similarity='attention' needs the preceding attention layer's "
                             f"probabilities in ctx.state[{ATTENTION_KEY!r}] ([B, S, S] or [B, H, S, S]); "
                             f"have the model's attention store them, or use variant.similarity='learned'")
        if attn.dim() == 4:
            attn = attn.mean(1)
        if tuple(attn.shape) != (B, S, S):
            raise ValueError(f"{self.name}: ctx.state[{ATTENTION_KEY!r}] has shape {tuple(attn.shape)}, expected "
                             f"[{B}, {S}, {S}] for this layer's input")
        return attn.float()

    def route(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> tuple[Routing, torch.Tensor]:
        """``(routing, A_BSS)`` for ``[B, S, D]`` input (``[T, D]`` is one sequence); losses go to ``ctx``."""
        x_BSD = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        B, S, D = x_BSD.shape
        rcfg = self.moe.config.router
        logits_TE = self.moe.router.logits(x_BSD.reshape(-1, D))
        probs_TE = logits_TE.softmax(-1)
        sim_BSS = self.similarity(x_BSD, ctx)
        mixed_TE = mix_probabilities(probs_TE.view(B, S, -1), sim_BSS).reshape(B * S, -1)
        K = self.moe.config.top_k
        ids_TK, weights_TK = select_topk(mixed_TE, K, normalize=rcfg.renormalize(K),
                                         scale=rcfg.routed_scaling_factor)
        if ctx is not None:
            if rcfg.aux_loss_coef > 0:
                b = B if rcfg.aux_loss_level == "sequence" else 1
                aux = load_balancing_loss(mixed_TE, ids_TK, b, first_choice=rcfg.aux_loss_first_choice)
                ctx.add_loss("aux_loss", rcfg.aux_loss_coef * aux, self.name)
            if rcfg.z_loss_coef > 0:
                ctx.add_loss("z_loss", rcfg.z_loss_coef * z_loss(logits_TE), self.name)
        routing = Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=mixed_TE, logits_TE=logits_TE)
        return routing, sim_BSS

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe.config.dim)
        routing, sim_BSS = self.route(x, ctx)
        y_TD = self.moe.combine(x_TD, routing, ctx)
        if ctx is not None and ctx.collect_stats:
            add_extra(ctx, self.name, self_weight=sim_BSS.diagonal(dim1=1, dim2=2).mean(),
                      changed_top1=(routing.logits_TE.argmax(-1) != routing.scores_TE.argmax(-1)).float().mean())
        return y_TD.view(x.shape)

    def extra_repr(self) -> str:
        c = self.config
        return f"similarity={c.similarity}, temperature={c.temperature}, causal={c.causal}"


@register_ffn("gmoe")
def build_gmoe(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return GraphOfTokensMoE(moe, parse_options(GMoEConfig, options), name=name)

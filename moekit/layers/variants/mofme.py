"""MoFME: Mixture of Feature-Modulation Experts with an Uncertainty-aware Router (Zhang et al. 2024, "Efficient
Deweather Mixture-of-Experts with Uncertainty-aware Feature-wise Linear Modulation", AAAI, arXiv 2312.16610).

Dim legend: T tokens, D model dim, F hidden dim, E experts, K slots per token, M Monte-Carlo router samples.

One shared FFN; expert ``i`` is a FiLM modulation of its hidden activation, so ``E`` experts cost about one FFN::

    h    = act(W_gate x, W_up x)                            [T, F]  (the shared FFN's hidden activation)
    h_i  = gamma_i * h + beta_i                             gamma, beta: [E, F]
    y    = W_down sum_{i in S} g_i h_i = W_down( (sum g_i gamma_i) * h + sum g_i beta_i )

The right-hand form (mix the modulations, then one ``W_down``) is the compute path; :meth:`expert` is the
readable per-expert definition the tests use as the oracle. ``gamma = 1, beta = 0`` at init: with renormalised
top-k weights the layer starts as the plain shared FFN (so it can be built from a dense checkpoint).

Uncertainty-aware Router (UaR) — *reconstructed* (spec compression-adaptation-serving.md §33 has the abstract
only; confirm before claiming parity): calibrated routing weights from ``M`` stochastic router passes with
dropout on the router input (MC dropout), ``p_bar = mean_m softmax(W_r dropout_m(x))``; top-k on ``p_bar``; the
weights are ``p_bar`` of the selected experts (renormalised per ``moe.router.norm_topk_prob``: unset, when
K > 1). At init every expert is the shared FFN (``gamma = 1, beta = 0``), so with renormalised weights the task
loss gives the router no gradient until the modulations diverge (after the first step). In eval the router
is deterministic (dropout off, one pass) unless ``mc_in_eval`` keeps sampling (MC-dropout inference).
Losses: ``aux_loss`` (Switch balance loss on ``p_bar``, ``moe.router.aux_loss_coef``), ``z_loss`` (mean over the
``M`` passes' logits, ``moe.router.z_loss_coef``).
Statistics: ``router_mutual_info`` (mean ``H(p_bar) - mean_m H(p_m)``, the epistemic part of the routing
uncertainty; 0 for a deterministic router) besides the usual load statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check
from ...experts import FeedForward, hidden
from ...routing import Router
from ...routing.losses import load_balancing_loss, z_loss
from ...routing.selectors import select_topk
from ...types import Routing, RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ._common import PLAIN_TOPK, flatten, make_shared_experts, parse_options, record_stats, require_router

__all__ = ["MoFMEConfig", "MoFME"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MoFMEConfig:
    """Attributes:
        mc_samples: M, stochastic router passes averaged by the UaR (1 = a plain router with input dropout).
        router_dropout: dropout probability on the router's input in those passes (0 disables the sampling).
        mc_in_eval: keep MC-dropout sampling in eval mode (default: one deterministic pass).
    """

    mc_samples: int = 4
    router_dropout: float = 0.1
    mc_in_eval: bool = False

    def __post_init__(self) -> None:
        check(isinstance(self.mc_samples, int) and self.mc_samples >= 1,
              f"variant.mc_samples={self.mc_samples!r} must be a positive integer (1 disables averaging)")
        check(0 <= self.router_dropout < 1, f"variant.router_dropout={self.router_dropout} must be in [0, 1)")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


class MoFME(nn.Module):
    """Shared FFN with ``E`` FiLM-modulated experts, routed by an MC-dropout-averaged router."""

    def __init__(self, moe: MoEConfig, config: MoFMEConfig | None = None, name: str = "mofme") -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or MoFMEConfig(), name
        require_router(moe.router, "MoFME", "averages softmax probabilities for a dropless top-k", **PLAIN_TOPK)
        self.router = Router(moe.dim, moe.num_experts, moe.top_k, moe.router)
        self.ffn = FeedForward(moe.dim, moe.hidden_dim, moe.activation)
        self.gamma = nn.Parameter(torch.ones(moe.num_experts, moe.hidden_dim))
        self.beta = nn.Parameter(torch.zeros(moe.num_experts, moe.hidden_dim))
        self.shared_experts = make_shared_experts(moe)

    def hidden_activation(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``h = act(W_gate x, W_up x)`` of the shared FFN (before ``W_down``)."""
        f = self.ffn
        return hidden(f.activation, F.linear(x_TD, f.w_gate) if f.w_gate is not None else None,
                      F.linear(x_TD, f.w_up))

    def expert(self, x_TD: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` alone, ``W_down(gamma_e * h + beta_e)`` (the readable definition)."""
        return F.linear(self.gamma[e] * self.hidden_activation(x_TD) + self.beta[e], self.ffn.w_down)

    def route(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None,
              num_sequences: int = 1) -> tuple[Routing, torch.Tensor]:
        """``(routing, mutual_info)``: top-k on the mean of ``M`` MC-dropout router passes."""
        c, rcfg = self.config, self.moe_config.router
        stochastic = c.router_dropout > 0 and (self.training or c.mc_in_eval)
        M = c.mc_samples if stochastic else 1
        logits_MTE = torch.stack([self.router.logits(F.dropout(x_TD, c.router_dropout, training=stochastic))
                                  for _ in range(M)])
        probs_MTE = logits_MTE.softmax(-1)
        probs_TE = probs_MTE.mean(0)
        K = self.moe_config.top_k
        ids_TK, weights_TK = select_topk(probs_TE, K, normalize=rcfg.renormalize(K),
                                         scale=rcfg.routed_scaling_factor)
        if ctx is not None:
            if rcfg.aux_loss_coef > 0:
                b = num_sequences if rcfg.aux_loss_level == "sequence" else 1
                aux = load_balancing_loss(probs_TE, ids_TK, b, first_choice=rcfg.aux_loss_first_choice)
                ctx.add_loss("aux_loss", rcfg.aux_loss_coef * aux, self.name)
            if rcfg.z_loss_coef > 0:
                ctx.add_loss("z_loss", rcfg.z_loss_coef * z_loss(logits_MTE.flatten(0, 1)), self.name)
        mutual_info = (_entropy(probs_TE) - _entropy(probs_MTE).mean(0)).mean().detach()
        routing = Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=probs_TE,
                          logits_TE=logits_MTE.mean(0))
        return routing, mutual_info

    def combine(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``W_down((sum_k w_k gamma_{e_k}) * h + sum_k w_k beta_{e_k})`` for a given routing (empty slots skipped)."""
        ids_TK, w_TK = routing.expert_ids_TK, routing.weights_TK.to(x_TD.dtype)
        safe_TK = ids_TK.clamp_min(0)
        w_TK1 = w_TK.masked_fill(ids_TK < 0, 0.0)[..., None]
        gamma_TF = (w_TK1 * self.gamma[safe_TK].to(x_TD.dtype)).sum(1)
        beta_TF = (w_TK1 * self.beta[safe_TK].to(x_TD.dtype)).sum(1)
        return F.linear(gamma_TF * self.hidden_activation(x_TD) + beta_TF, self.ffn.w_down)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, num_sequences = flatten(x, self.moe_config.dim)
        routing, mutual_info = self.route(x_TD, ctx, num_sequences)
        y_TD = self.combine(x_TD, routing)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        record_stats(ctx, self.name, routing, router_mutual_info=mutual_info)
        return y_TD.view(x.shape)

    def extra_repr(self) -> str:
        c = self.config
        return f"mc_samples={c.mc_samples}, router_dropout={c.router_dropout}, mc_in_eval={c.mc_in_eval}"


@register_ffn("mofme")
def build_mofme(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return MoFME(moe, parse_options(MoFMEConfig, options), name=name)

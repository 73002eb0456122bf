"""Dynamic top-p routing MoE ("Harder Tasks Need More Experts", Huang et al. 2024, arXiv 2403.07652).

Dim legend: T tokens, D model dim, E experts, K slots (the widest token's set; unused ones are -1).

``p = softmax(W_r x)``; each token uses the smallest prefix of its experts sorted by probability whose mass
reaches the threshold ``P`` (:func:`moekit.routing.topp.select_topp`); ``y = sum_{i in S} p_i E_i(x)`` with raw
probabilities. Losses: ``L = L_LM + alpha L_balance + beta L_dyn``: the Switch balance loss over the selected
assignments (``aux_loss``, alpha = ``moe.router.aux_loss_coef``, 1e-2) and the entropy loss
(``topp_entropy_loss``, beta = ``entropy_coef``, 1e-4). Composition: the layer's :class:`MoE` supplies the
router's logits, the bank, shared experts and engine; only the selector differs.
Statistics: ``experts_per_token`` (average activated experts per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...configs import check
from ...routing.losses import load_balancing_loss, z_loss
from ...routing.topp import router_entropy, select_topp
from ...types import Routing, RoutingContext
from ..moe import MoE, MoEConfig
from ..registry import register_ffn
from ._common import add_extra, flatten, parse_options

__all__ = ["TopPConfig", "TopPMoE"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TopPConfig:
    """Attributes:
        threshold: P, the probability mass to reach (code default 0.4); >= 1 activates every expert.
        entropy_coef: beta of the entropy (dynamic) loss (1e-4); 0 disables.
    """

    threshold: float = 0.4
    entropy_coef: float = 1e-4

    def __post_init__(self) -> None:
        check(0 < self.threshold, f"variant.threshold={self.threshold} must be positive (paper: 0.4)")
        check(self.entropy_coef >= 0, f"variant.entropy_coef={self.entropy_coef} must be >= 0")


class TopPMoE(nn.Module):
    """MoE whose tokens use a variable number of experts chosen by cumulative probability."""

    def __init__(self, moe: MoEConfig, config: TopPConfig | None = None, name: str = "topp") -> None:
        super().__init__()
        self.config, self.name = config or TopPConfig(), name
        self.moe = MoE(moe, name=name)

    def route(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None, num_sequences: int = 1) -> Routing:
        router, rcfg = self.moe.router, self.moe.config.router
        logits_TE = router.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        ids_TK, weights_TK = select_topp(probs_TE, self.config.threshold)
        if ctx is not None:
            if rcfg.aux_loss_coef > 0:
                b = num_sequences if rcfg.aux_loss_level == "sequence" else 1
                aux = load_balancing_loss(probs_TE, ids_TK, b, first_choice=rcfg.aux_loss_first_choice)
                ctx.add_loss("aux_loss", rcfg.aux_loss_coef * aux, self.name)
            if self.config.entropy_coef > 0:
                ctx.add_loss("topp_entropy_loss", self.config.entropy_coef * router_entropy(probs_TE), self.name)
            if rcfg.z_loss_coef > 0:
                ctx.add_loss("z_loss", rcfg.z_loss_coef * z_loss(logits_TE), self.name)
        # no capacity limit: the -1 slots pad tokens that chose fewer than K experts, they are not drops
        return Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=probs_TE, logits_TE=logits_TE,
                       num_dropped=ids_TK.new_zeros(()))

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, num_sequences = flatten(x, self.moe.config.dim)
        routing = self.route(x_TD, ctx, num_sequences)
        y_TD = self.moe.combine(x_TD, routing, ctx)
        add_extra(ctx, self.name, experts_per_token=(routing.expert_ids_TK >= 0).sum() / x_TD.shape[0])
        return y_TD.view(x.shape)


@register_ffn("topp")
def build_topp(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return TopPMoE(moe, parse_options(TopPConfig, options), name=name)

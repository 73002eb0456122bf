"""UoME: Union-of-Experts' MLP experts, equivalent slices of one dense MLP (Yang et al. 2025, github
YujiaoYang-work/UoE, language_modeling/model/mlp/UoME_ES.py; architectures.md §5).

Dim legend: T tokens, D model dim, F slice hidden dim, E experts, K slots, B batch, S sequence.

Equitant decomposition: a dense MLP of hidden size ``E * F`` is column-split into ``E`` slices of ``F`` units
(its down projection row-split to match), so that ``MLP(x) = sum_e W2_e act(W1_e x)`` exactly; expert ``e`` is
slice ``e`` (an :class:`~moekit.experts.ExpertBank` of ``E`` experts of hidden ``moe.hidden_dim``). Expert
selection::

    level = "sequence":  g_b = softmax(W_s mean_t x_bt)  -> the top-k slices for every token of sequence b
    level = "token":     g_t = softmax(W_s x_t)          -> the top-k slices of token t
    y_t = sum_{e in TopK(g)} W2_e act(W1_e x_t)

Choices: the released code routes from the flattened fixed-length sequence; here the sequence is mean-pooled so
lengths may vary. Sequence-level routing reads the whole sequence, so it is not causal (an encoder setting):
``moekit`` language models use ``level = "token"`` (the preset). As in the code the gate values do not scale the
output (selection only); they enter as ``g / stopgrad(g)`` (exactly 1) so that the selector still learns, and
the Switch balance loss (``moe.router.aux_loss_coef``) is computed over the selections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...configs import check_choice
from ...experts import ExpertBank
from ...routing.losses import load_balancing_loss
from ...types import Routing, RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ._common import flatten, parse_options, run_experts

__all__ = ["UnionOfMLPExperts", "UoMEConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class UoMEConfig:
    """Attributes:
        level: ``token`` (causal, for language models) or ``sequence`` (the paper's, reads the whole sequence).
    """

    level: Literal["token", "sequence"] = "token"

    def __post_init__(self) -> None:
        check_choice("variant", "level", self.level, ("token", "sequence"))


class UnionOfMLPExperts(nn.Module):
    """UoME: top-k slices of a decomposed dense MLP; ``forward(x, ctx=None)`` keeps the input's shape."""

    def __init__(self, moe: MoEConfig, config: UoMEConfig | None = None, name: str = "uoe") -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or UoMEConfig(), name
        self.selector = nn.Linear(moe.dim, moe.num_experts, bias=False)
        nn.init.normal_(self.selector.weight, std=moe.dim**-0.5)
        self.experts = ExpertBank(moe.num_experts, moe.dim, moe.hidden_dim, moe.activation)

    def route(self, x_BSD: torch.Tensor) -> Routing:
        B, S, _ = x_BSD.shape
        E, K = self.moe_config.num_experts, self.moe_config.top_k
        pooled = x_BSD.mean(1, keepdim=True) if self.config.level == "sequence" else x_BSD
        logits = self.selector(pooled).float().expand(B, S, E).reshape(B * S, E)
        probs = logits.softmax(-1)
        top, ids = probs.topk(K, dim=-1)
        return Routing(expert_ids_TK=ids, weights_TK=top / top.detach(), scores_TE=probs, logits_TE=logits)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe_config.dim)
        x_BSD = x_TD.view(x.shape[0], -1, x.shape[-1]) if x.dim() == 3 else x_TD[None]
        routing = self.route(x_BSD)
        coef = self.moe_config.router.aux_loss_coef
        if ctx is not None and coef > 0:
            ctx.add_loss("aux_loss", coef * load_balancing_loss(routing.scores_TE, routing.expert_ids_TK),
                         layer=self.name)
        y_TD = run_experts(self.moe_config, self.experts, None, x_TD, routing, ctx, self.name)
        return y_TD.view(x.shape)


@register_ffn("uoe")
def build_uoe(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return UnionOfMLPExperts(moe, parse_options(UoMEConfig, options), name=name)

"""MoMa: modality-aware experts for early-fusion pre-training (Lin et al. 2024, arXiv 2407.21770; spec
compression-adaptation-serving.md §30, from the abstract and known details).

Dim legend: T tokens, D model dim, E experts of one group, K slots per token, M modalities, B batch, S sequence.

The ``moe.num_experts`` experts are split into ``M`` equal modality groups (group ``m`` = experts
``m*E .. (m+1)*E - 1``, ``E = num_experts / M``). Attention stays shared (early fusion); in this layer a token of
modality ``m`` is routed **only inside group m**, by that group's own learned router::

    T_m = {t : modality_t = m}
    y_t = sum_{e in group m chosen for t} g_te * Expert_{m,e}(x_t)          t in T_m

Each group is a plain :class:`~moekit.MoE` (its router, engine and bank; shared experts, if
``moe.num_shared_experts`` is set, become one shared FFN per modality). ``routing="expert_choice"`` (the paper):
within group ``m`` each expert takes its ``ceil(capacity_factor * top_k * |T_m| / E)`` highest-scoring tokens of
that modality (``moe.router.capacity_factor``, default 1.0), so the capacity holds per group.

Expert choice looks at the whole batch, so it is not causal. As in the paper *(reconstructed)*, each group has
an auxiliary token-level router, a linear map ``D -> E`` on the **detached** input trained with a binary
cross-entropy towards the expert-choice decisions (``aux_router_coef``, loss ``moma_aux_router``, mean over the
group's tokens and experts, summed over groups). In evaluation (``eval_routing="aux"``) a token goes to the
experts whose auxiliary probability exceeds 0.5, weighted by the main router's scores: a causal decision that
needs no other token. ``eval_routing="expert_choice"`` keeps the training rule (non-causal, for analysis).

Modality ids come from ``ctx.state["modality_ids"]`` (:data:`moekit.types.MODALITY_KEY`), written by the
language model from ``model.modality_starts``; without them every token is modality 0. With one modality the
layer is a plain expert-choice (or top-k) MoE. Statistics per group, under ``{name}.m{m}``: the MoE's (load,
drops) plus ``modality_share`` (the group's share of the layer's tokens) and, in training,
``aux_router_agreement`` (fraction of (token, expert) decisions its auxiliary router reproduces).

Choices (the spec leaves them open): equal group sizes; the auxiliary router's threshold 0.5; its loss weight
0.01; MoD combination not built (a depth router that gathers tokens makes the modality ids mismatch: an error).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...types import MODALITY_KEY, Routing, RoutingContext
from ..moe import MoE, MoEConfig
from ..registry import register_ffn
from ._common import add_extra, flatten, parse_options

__all__ = ["MoMaConfig", "MoMa"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MoMaConfig:
    """Attributes:
        num_modalities: M modality groups (2: text and image); must divide ``moe.num_experts``.
        routing: ``expert_choice`` within each group (the paper) or ``topk`` (tokens choose within the group).
        aux_router_coef: weight of the auxiliary routers' BCE imitation loss (expert choice only; 0: none).
        eval_routing: ``aux`` (causal: the auxiliary routers' decisions) or ``expert_choice`` in evaluation.
    """

    num_modalities: int = 2
    routing: Literal["expert_choice", "topk"] = "expert_choice"
    aux_router_coef: float = 0.01
    eval_routing: Literal["aux", "expert_choice"] = "aux"

    def __post_init__(self) -> None:
        check(isinstance(self.num_modalities, int) and self.num_modalities >= 1,
              f"variant.num_modalities={self.num_modalities!r} must be a positive integer (2: text and image)")
        check_choice("variant", "routing", self.routing, ("expert_choice", "topk"))
        check_choice("variant", "eval_routing", self.eval_routing, ("aux", "expert_choice"))
        check(self.aux_router_coef >= 0, f"variant.aux_router_coef={self.aux_router_coef} must be >= 0 (0: off)")


class MoMa(nn.Module):
    """Modality-grouped MoE; ``forward(x_BSD, ctx) -> y_BSD``. See the module docstring."""

    def __init__(self, moe: MoEConfig, config: MoMaConfig, name: str = "moma") -> None:
        super().__init__()
        M = config.num_modalities
        check(moe.num_experts % M == 0,
              f"moe.num_experts={moe.num_experts} is not divisible by variant.num_modalities={M}; use a multiple "
              f"of {M} experts (e.g. {M * max(1, moe.num_experts // M)}) so every modality gets an equal group")
        per_group = moe.num_experts // M
        check(moe.top_k <= per_group,
              f"moe.top_k={moe.top_k} exceeds the {per_group} experts of one modality group; lower moe.top_k or "
              f"raise moe.num_experts")
        router = dataclasses.replace(moe.router, selector=config.routing)
        if config.routing == "expert_choice":
            router = dataclasses.replace(router, aux_loss_coef=0.0, capacity_factor=router.capacity_factor or 1.0)
        group_cfg = dataclasses.replace(moe, num_experts=per_group, router=router)
        self.config = config
        self.moe_config = moe
        self.name = name
        self.num_modalities = M
        self.groups = nn.ModuleList(MoE(group_cfg, name=f"{name}.m{m}") for m in range(M))
        self.uses_aux = config.routing == "expert_choice"
        self.aux_routers = nn.ModuleList(
            nn.Linear(moe.dim, per_group, bias=False) for _ in range(M if self.uses_aux else 0))
        for m in range(len(self.aux_routers)):
            nn.init.normal_(self._aux(m).weight, std=moe.dim ** -0.5)

    def _group(self, m: int) -> MoE:
        group = self.groups[m]
        assert isinstance(group, MoE)
        return group

    def _aux(self, m: int) -> nn.Linear:
        lin = self.aux_routers[m]
        assert isinstance(lin, nn.Linear)
        return lin

    def active_params(self) -> int:
        """One token uses one group (its router, top-k of its bank) and one auxiliary router."""
        from ...models.count import active_params  # noqa: PLC0415 (count imports layers)
        aux = sum(p.numel() for p in self.aux_routers.parameters()) // max(len(self.aux_routers), 1)
        return active_params(self._group(0)) + (aux if self.uses_aux else 0)

    def modality_ids(self, ctx: RoutingContext | None, T: int, device: torch.device) -> torch.Tensor:
        """``[T]`` int64 modality of each token (0 for all when the context carries none)."""
        ids = None if ctx is None else ctx.state.get(MODALITY_KEY)
        if ids is None:
            return torch.zeros(T, dtype=torch.long, device=device)
        ids_T = ids.reshape(-1).to(device=device, dtype=torch.long)
        if ids_T.numel() != T:
            raise ValueError(f"{self.name}: ctx.state[{MODALITY_KEY!r}] has {ids_T.numel()} entries for {T} tokens; "
                             f"MoMa needs one modality id per token (it cannot follow a depth router that drops "
                             f"tokens: remove model.depth_routing)")
        bad = (ids_T < 0) | (ids_T >= self.num_modalities)
        if bool(bad.any()):
            raise ValueError(f"{self.name}: modality id {int(ids_T[bad][0])} is outside 0..{self.num_modalities - 1}; "
                             f"make model.modality_starts list {self.num_modalities - 1} boundaries ([] for one modality), or set "
                             f"variant.num_modalities to the number of modalities in the data")
        return ids_T

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe_config.dim)
        T = x_TD.shape[0]
        mod_T = self.modality_ids(ctx, T, x_TD.device)
        y_TD = torch.zeros_like(x_TD)
        for m in range(self.num_modalities):
            group = self._group(m)
            idx_T = (mod_T == m).nonzero().squeeze(1)
            if idx_T.numel() == 0:
                continue
            xm_TD = x_TD.index_select(0, idx_T)
            routing = self._route(m, xm_TD, ctx)
            y_TD = y_TD.index_copy(0, idx_T, group.combine(xm_TD, routing, ctx))
            add_extra(ctx, group.name, modality_share=idx_T.numel() / T)
            if self.uses_aux and self.training:
                agree = self._aux_loss(m, xm_TD, routing, ctx)
                add_extra(ctx, group.name, aux_router_agreement=agree / routing.expert_ids_TK.numel())
        return y_TD.view(x.shape)

    def _route(self, m: int, xm_TD: torch.Tensor, ctx: RoutingContext | None) -> Routing:
        group = self._group(m)
        if self.training or not self.uses_aux or self.config.eval_routing == "expert_choice":
            return group.route(xm_TD, ctx)
        # Causal evaluation: a token joins every expert its auxiliary router gives probability > 0.5.
        logits_TE = group.router.logits(xm_TD)
        scores_TE = group.router.scores(logits_TE)
        chosen_TE = self._aux(m)(xm_TD.float()) > 0
        E = scores_TE.shape[1]
        experts_TE = torch.arange(E, device=xm_TD.device).expand_as(chosen_TE)
        ids_TE = torch.where(chosen_TE, experts_TE, torch.full_like(experts_TE, -1))
        return Routing(expert_ids_TK=ids_TE, weights_TK=scores_TE.masked_fill(~chosen_TE, 0.0),
                       scores_TE=scores_TE, logits_TE=logits_TE, num_dropped=ids_TE.new_zeros(()))

    def _aux_loss(self, m: int, xm_TD: torch.Tensor, routing: Routing, ctx: RoutingContext | None) -> torch.Tensor:
        """BCE of the auxiliary router (on the detached input) towards the expert-choice decisions; returns the
        number of (token, expert) decisions it already reproduces."""
        target_TE = (routing.expert_ids_TK >= 0).float()
        logits_TE = self._aux(m)(xm_TD.detach().float())
        if ctx is not None and self.config.aux_router_coef > 0:
            loss = F.binary_cross_entropy_with_logits(logits_TE, target_TE)
            ctx.add_loss("moma_aux_router", self.config.aux_router_coef * loss, self.name)
        return ((logits_TE.detach() > 0).float() == target_TE).sum()


@register_ffn("moma")
def _build_moma(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return MoMa(moe, parse_options(MoMaConfig, options), name=name)

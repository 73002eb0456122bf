"""ProMoE (Wei et al. 2025, "Routing Matters in MoE: Scaling Diffusion Transformers with Explicit Routing
Guidance", arXiv 2510.24711): a two-step router, conditional then prototypical, with a routing contrastive loss.

Dim legend: T tokens, D model dim, E routed experts (+1 unconditional expert at id E), K slots per token.

1. Conditional routing: tokens flagged *unconditional* go, with weight 1, to a dedicated unconditional expert
   (id ``E`` of the bank) and never reach a routed expert or the prototypes.
2. Prototypical routing of the other tokens: ``c_i = cos(x, pi_i)`` against learnable prototypes ``pi`` (``[E, D]``,
   init N(0, 0.02^2)); ``gate="softmax"``: ``w = softmax(c / temperature)`` then top-k (the diffusers port, no
   temperature there, i.e. 1); ``gate="cosine"``: the raw cosines of the top-k experts are the weights (the
   PixelDiT port, top-1). Selected weights follow ``moe.router.norm_topk_prob`` (the ports: not renormalised).
3. Always-on shared experts: ``moe.num_shared_experts`` (the ports: one).

Routing contrastive loss (RCL, ``promoe_rcl_loss``, coefficient ``rcl_coef``): for every expert ``i`` that received
conditional tokens (top-1 by default, or every top-k slot), ``mu_i`` = the mean of its tokens; the logits
``cos(pi_i, mu_j) / rcl_temperature`` over active experts ``j`` and ``L = CE(logits, diag)`` (InfoNCE, prototype
against its own cluster mean; with a single active expert it is 0). ``mu`` is not detached (as in the PixelDiT
port): the loss also pulls the layer's input towards its cluster. Optional balance loss: the Switch loss over
conditional tokens (``moe.router.aux_loss_coef`` on ``softmax(c / temperature)``, batch level).

Provenance: abstract plus two third-party ports (spec architectures.md §16). The training values of both loss
weights are not public (both ports default the balance weight to 0; RCL weight 0 / 1, RCL temperature 0.1 / 0.07).

Language models have no class label and no classifier-free-guidance null sample, so the conditional split is
read from a per-token flag the model (or data pipeline) supplies: ``ctx.state["promoe.unconditional"]``, a bool
``[B, S]`` (or ``[T]``) mask, e.g. the tokens of samples whose conditioning prompt was dropped for CFG training.
Absent flag = every token conditional, and the layer is a prototype-routed MoE with a shared expert. With
``unconditional_expert=false`` no extra expert is built (LMs without a CFG split); a flag then raises.
Statistics: ``uncond_share`` (fraction of unconditional tokens), ``top1_cosine`` (mean best cosine of
conditional tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...experts import ExpertBank
from ...routing.losses import load_balancing_loss
from ...routing.selectors import select_topk
from ...types import Routing, RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ._common import PLAIN_TOPK, add_extra, flatten, make_shared_experts, parse_options, require_router, run_experts

__all__ = ["ProMoEConfig", "ProMoE", "UNCONDITIONAL_KEY", "routing_contrastive_loss"]

UNCONDITIONAL_KEY = "promoe.unconditional"


@dataclass(frozen=True, kw_only=True, slots=True)
class ProMoEConfig:
    """Attributes:
        unconditional_expert: build the dedicated unconditional expert (id ``num_experts``).
        gate: ``softmax`` of the cosines (diffusers port) or the raw ``cosine`` (PixelDiT port).
        temperature: divides the cosines before the routing softmax (ports: 1, i.e. none).
        rcl_coef: routing contrastive loss coefficient; 0 disables (training value unpublished).
        rcl_temperature: tau of the RCL logits (diffusers port 0.1, PixelDiT port 0.07).
        rcl_assignment: cluster tokens by their ``top1`` expert or by every ``topk`` slot.
    """

    unconditional_expert: bool = True
    gate: Literal["softmax", "cosine"] = "softmax"
    temperature: float = 1.0
    rcl_coef: float = 0.0
    rcl_temperature: float = 0.1
    rcl_assignment: Literal["top1", "topk"] = "top1"

    def __post_init__(self) -> None:
        check_choice("variant", "gate", self.gate, ("softmax", "cosine"))
        check_choice("variant", "rcl_assignment", self.rcl_assignment, ("top1", "topk"))
        check(self.temperature > 0, f"variant.temperature={self.temperature} must be positive (ports: 1.0)")
        check(self.rcl_temperature > 0, f"variant.rcl_temperature={self.rcl_temperature} must be positive (0.1)")
        check(self.rcl_coef >= 0, f"variant.rcl_coef={self.rcl_coef} must be >= 0; 0 disables it")


def routing_contrastive_loss(prototypes_ED: torch.Tensor, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """InfoNCE between each active expert's prototype and its tokens' mean (``-1`` slots ignored).

    ``logits_ij = cos(pi_i, mu_j) / temperature`` over the experts with at least one token; the loss is the mean
    over active ``i`` of ``-log softmax_j(logits_i)[i]``. No host sync: inactive experts are masked out.
    """
    E = prototypes_ED.shape[0]
    valid_N = (ids_TK >= 0).reshape(-1)
    onehot_NE = F.one_hot(ids_TK.reshape(-1).clamp_min(0), E).to(x_TD.dtype) * valid_N[:, None]
    x_ND = x_TD.repeat_interleave(ids_TK.shape[1], dim=0)
    counts_E = onehot_NE.sum(0)
    mu_ED = (onehot_NE.t() @ x_ND) / counts_E.clamp_min(1)[:, None]
    logits_EE = F.normalize(prototypes_ED.float(), dim=-1) @ F.normalize(mu_ED.float(), dim=-1).t() / temperature
    active_E = counts_E > 0
    logits_EE = logits_EE.masked_fill(~active_E[None, :], float("-inf"))
    nll_E = -logits_EE.log_softmax(-1).diagonal()
    return torch.where(active_E, nll_E, 0.0).sum() / active_E.sum().clamp_min(1)


class ProMoE(nn.Module):
    """Prototype-routed MoE with an unconditional expert for flagged tokens and always-on shared experts."""

    def __init__(self, moe: MoEConfig, config: ProMoEConfig | None = None, name: str = "promoe") -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or ProMoEConfig(), name
        r = moe.router
        require_router(r, "ProMoE", "routes by cosine to prototypes (dropless top-k; batch-level balance loss over "
                       "conditional tokens)", **{**PLAIN_TOPK, "aux_loss_level": "batch"})
        check(self.config.gate == "softmax" or not r.renormalize(moe.top_k),
              "variant.gate='cosine' uses raw cosines as weights; set router.norm_topk_prob=false")
        self.num_routed = moe.num_experts
        self.prototypes = nn.Parameter(torch.randn(moe.num_experts, moe.dim) * 0.02)
        self.experts = ExpertBank(moe.num_experts + int(self.config.unconditional_expert), moe.dim,
                                  moe.hidden_dim, moe.activation)
        self.shared_experts = make_shared_experts(moe)

    def _unconditional(self, ctx: RoutingContext | None, T: int) -> torch.Tensor | None:
        flag = ctx.state.get(UNCONDITIONAL_KEY) if ctx is not None else None
        if flag is None:
            return None
        if flag.numel() != T:
            raise ValueError(f"{self.name}: ctx.state[{UNCONDITIONAL_KEY!r}] has {flag.numel()} entries for {T} "
                             f"tokens; give one bool per token ([B, S] or [T])")
        if not self.config.unconditional_expert:
            raise ValueError(f"{self.name}: unconditional tokens were flagged but the layer has no unconditional "
                             f"expert; set variant.unconditional_expert=true or drop ctx.state[{UNCONDITIONAL_KEY!r}]")
        return flag.reshape(T).to(torch.bool)

    def route(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        c, rcfg, E = self.config, self.moe_config.router, self.num_routed
        T = x_TD.shape[0]
        cos_TE = F.normalize(x_TD.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).t()
        probs_TE = (cos_TE / c.temperature).softmax(-1)
        ids_TK, weights_TK = select_topk(probs_TE if c.gate == "softmax" else cos_TE, self.moe_config.top_k,
                                         normalize=rcfg.renormalize(self.moe_config.top_k) and c.gate == "softmax",
                                         scale=rcfg.routed_scaling_factor)
        uncond_T = self._unconditional(ctx, T)
        cond_T1 = torch.ones(T, 1, dtype=torch.bool, device=x_TD.device) if uncond_T is None else ~uncond_T[:, None]
        if ctx is not None:
            self._add_losses(ctx, x_TD, probs_TE, ids_TK, cond_T1)
        scores_TE = probs_TE  # ranks experts as the cosines do, and is a distribution for the statistics
        if c.unconditional_expert:  # column E: the unconditional expert's score (1 for flagged tokens)
            scores_TE = torch.cat([probs_TE * cond_T1, (~cond_T1).to(probs_TE.dtype)], dim=1)
            uncond_ids_TK = torch.full_like(ids_TK, -1)
            uncond_ids_TK[:, 0] = E
            ids_TK = torch.where(cond_T1, ids_TK, uncond_ids_TK)
            weights_TK = torch.where(cond_T1, weights_TK, (uncond_ids_TK == E).to(weights_TK.dtype))
        # no capacity limit: the only empty slots pad the unconditional expert's single slot
        return Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=scores_TE, logits_TE=cos_TE,
                       num_dropped=ids_TK.new_zeros(()))

    def _add_losses(self, ctx: RoutingContext, x_TD, probs_TE, ids_TK, cond_T1) -> None:
        c, rcfg = self.config, self.moe_config.router
        cond_ids_TK = ids_TK.masked_fill(~cond_T1, -1)
        if rcfg.aux_loss_coef > 0:
            # P over conditional tokens only, without a host sync: zero the others and rescale the mean.
            scale = x_TD.shape[0] / cond_T1.sum().clamp_min(1)
            loss = load_balancing_loss(probs_TE * cond_T1 * scale, cond_ids_TK)
            ctx.add_loss("aux_loss", rcfg.aux_loss_coef * loss, self.name)
        if c.rcl_coef > 0:
            assign_TK = cond_ids_TK[:, :1] if c.rcl_assignment == "top1" else cond_ids_TK
            loss = routing_contrastive_loss(self.prototypes, x_TD, assign_TK, c.rcl_temperature)
            ctx.add_loss("promoe_rcl_loss", c.rcl_coef * loss, self.name)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe_config.dim)
        routing = self.route(x_TD, ctx)
        y_TD = run_experts(self.moe_config, self.experts, self.shared_experts, x_TD, routing, ctx, self.name)
        if ctx is not None and ctx.collect_stats:
            cond_T = routing.expert_ids_TK[:, 0] < self.num_routed
            add_extra(ctx, self.name, uncond_share=1 - cond_T.float().mean(),
                         top1_cosine=(routing.logits_TE.amax(-1) * cond_T).sum() / cond_T.sum().clamp_min(1))
        return y_TD.view(x.shape)

    def extra_repr(self) -> str:
        c = self.config
        return (f"gate={c.gate}, unconditional_expert={c.unconditional_expert}, rcl_coef={c.rcl_coef}, "
                f"rcl_temperature={c.rcl_temperature}")


@register_ffn("promoe")
def build_promoe(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return ProMoE(moe, parse_options(ProMoEConfig, options), name=name)

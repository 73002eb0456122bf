"""Read-ME pre-gating (Cai et al. 2024, "Read-ME: Refactorizing LLMs as Router-Decoupled Mixture of Experts with
System Co-Design", NeurIPS 2024, github VITA-Group/READ-ME): ONE small router, decoupled from the
backbone, plans the routing of every MoE layer before the blocks run.

Dim legend: B batch, S sequence, T = B*S tokens, D model dim, P planner width, E experts, K slots per token,
L plans (1 when shared by all layers, else one per model layer).

- :class:`ReadMEPlanner`: a small causal transformer (RMSNorm, RoPE, SwiGLU; ``planner_layers`` blocks, paper 2)
  over the token embeddings, then a head of ``L * E`` logits. ``plan = planner(tokens_emb_BSD, ctx)`` returns a
  :class:`RoutingPlan` and writes it to ``ctx.state["readme.plan"]``. Paper: one top-1 decision per token shared
  by every layer (``per_layer=false``), used with no gate value (``weights="hard"``: each of the K slots weighs
  1/K). ``per_layer=true`` plans each layer separately; ``weights="soft"`` uses the planner's probabilities
  (renormalised as ``moe.router.norm_topk_prob`` resolves for K: unset, only when K > 1) so that the LM loss
  also trains the planner (with K = 1 an explicit ``norm_topk_prob=true`` would make every weight 1).
- ``readme`` FFN (:class:`ReadMEMoE`): an :class:`ExpertBank` (+ shared experts: the paper's always-active shared
  neurons) run by the layer's engine on the routing the plan holds for its ``layer_index``; it has no router.
- Losses: the planner adds the Switch balance loss per plan (``moe.router.aux_loss_coef``) and the z-loss under its
  own name (``readme.planner``). :func:`planner_distillation_loss` is the paper's router-training loss against
  per-layer target distributions (``0.75 * CE(label smoothing 0.5, argmax target) + 0.25 * soft-target CE``).
  moekit does not compute those targets: the paper derives them from a dense model's activation masks, and
  :func:`moekit.compression.moefy` (which splits a dense FFN into experts) does not produce them; pass your own.

Model hook (the model, not the layer, owns the planner): build ``ReadMEPlanner(moe, config, num_layers=...)`` once
beside the blocks (``config`` from the same ``variant`` table) and call ``planner(tokens_emb_BSD, ctx)`` after the
token embedding and before the first block, with the ``ctx`` the blocks receive. The planner reads the embedding
output (the paper gives the router its own embedding table initialised from the backbone's) and recomputes the
whole prefix each call: incremental decoding with a planner KV cache is not implemented.
Statistics (layer): ``switch_rate``, the fraction of tokens whose first expert differs from the plan of the
previous layer (0 for a shared plan; what look-ahead expert caching pays for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...experts import ExpertBank, FeedForward
from ...routing.losses import load_balancing_loss, z_loss
from ...routing.selectors import select_topk
from ...types import Routing, RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ._common import PLAIN_TOPK, add_extra, flatten, make_shared_experts, parse_options, require_router, run_experts

__all__ = ["ReadMEConfig", "ReadMEPlanner", "ReadMEMoE", "RoutingPlan", "PLAN_KEY", "planner_distillation_loss"]

PLAN_KEY = "readme.plan"


@dataclass(frozen=True, kw_only=True, slots=True)
class ReadMEConfig:
    """Attributes:
        planner_dim: P, width of the planner transformer.
        planner_layers: its causal blocks (paper: 2).
        planner_heads: attention heads (must divide P, with an even head size for RoPE).
        per_layer: one plan per layer instead of one shared by all (paper: shared).
        weights: ``hard`` (1/K per slot, paper top-1: 1) or ``soft`` (planner probabilities).
    """

    planner_dim: int = 256
    planner_layers: int = 2
    planner_heads: int = 4
    per_layer: bool = False
    weights: Literal["hard", "soft"] = "hard"

    def __post_init__(self) -> None:
        check(self.planner_dim >= 1 and self.planner_layers >= 0 and self.planner_heads >= 1,
              "variant.planner_dim and planner_heads must be positive, planner_layers >= 0")
        check(self.planner_dim % self.planner_heads == 0 and (self.planner_dim // self.planner_heads) % 2 == 0,
              f"variant.planner_heads={self.planner_heads} must divide planner_dim={self.planner_dim} into an even "
              f"head size (RoPE rotates pairs)")
        check_choice("variant", "weights", self.weights, ("hard", "soft"))


@dataclass(frozen=True)
class RoutingPlan:
    """Routing decided ahead of the blocks: ``[L, T, K]`` ids and weights, ``[L, T, E]`` probabilities/logits."""

    expert_ids_LTK: torch.Tensor
    weights_LTK: torch.Tensor
    probs_LTE: torch.Tensor
    logits_LTE: torch.Tensor

    @property
    def num_plans(self) -> int:
        return self.expert_ids_LTK.shape[0]

    def plan_index(self, layer_index: int) -> int:
        if self.num_plans == 1:
            return 0
        if not 0 <= layer_index < self.num_plans:
            raise ValueError(f"the routing plan covers layers 0..{self.num_plans - 1}, not layer {layer_index}; "
                             f"build the planner with num_layers equal to the model's")
        return layer_index

    def routing(self, layer_index: int) -> Routing:
        i = self.plan_index(layer_index)
        return Routing(expert_ids_TK=self.expert_ids_LTK[i], weights_TK=self.weights_LTK[i],
                       scores_TE=self.probs_LTE[i], logits_TE=self.logits_LTE[i])


def _rope(q_BHSd: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (rotate-half form, base 10000) over positions ``0..S-1``."""
    S, d = q_BHSd.shape[-2], q_BHSd.shape[-1]
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=q_BHSd.device, dtype=torch.float32) / d)
    angles_Sd = torch.outer(torch.arange(S, device=q_BHSd.device, dtype=torch.float32), inv_freq).repeat(1, 2)
    first, second = q_BHSd.chunk(2, dim=-1)
    return q_BHSd * angles_Sd.cos() + torch.cat([-second, first], dim=-1) * angles_Sd.sin()


class _PlannerBlock(nn.Module):
    """Pre-norm causal self-attention + SwiGLU block."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = FeedForward(dim, 4 * dim, "swiglu")

    def forward(self, h_BSP: torch.Tensor) -> torch.Tensor:
        B, S, P = h_BSP.shape
        q, k, v = self.qkv(self.attn_norm(h_BSP)).view(B, S, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        a_BHSd = F.scaled_dot_product_attention(_rope(q), _rope(k), v, is_causal=True)
        h_BSP = h_BSP + self.out(a_BHSd.transpose(1, 2).reshape(B, S, P))
        return h_BSP + self.mlp(self.mlp_norm(h_BSP))


class ReadMEPlanner(nn.Module):
    """The pre-gating router: ``forward(tokens_emb_BSD, ctx=None) -> RoutingPlan`` (also put in ``ctx.state``)."""

    def __init__(self, moe: MoEConfig, config: ReadMEConfig | None = None, *, num_layers: int = 1,
                 name: str = "readme.planner") -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or ReadMEConfig(), name
        c = self.config
        check(num_layers >= 1, f"num_layers={num_layers} must be positive")
        require_router(moe.router, "the Read-ME planner", "plans a dropless softmax top-k", **PLAIN_TOPK)
        self.num_plans = num_layers if c.per_layer else 1
        self.proj_in = nn.Linear(moe.dim, c.planner_dim, bias=False)
        self.blocks = nn.ModuleList(_PlannerBlock(c.planner_dim, c.planner_heads) for _ in range(c.planner_layers))
        self.norm = nn.RMSNorm(c.planner_dim)
        self.head = nn.Linear(c.planner_dim, self.num_plans * moe.num_experts, bias=False)
        nn.init.normal_(self.head.weight, std=c.planner_dim**-0.5)

    def forward(self, tokens_emb_BSD: torch.Tensor, ctx: RoutingContext | None = None) -> RoutingPlan:
        x_BSD = tokens_emb_BSD if tokens_emb_BSD.dim() == 3 else tokens_emb_BSD.reshape(1, -1, self.moe_config.dim)
        B, S, _ = x_BSD.shape
        L, E, K = self.num_plans, self.moe_config.num_experts, self.moe_config.top_k
        h_BSP = self.proj_in(x_BSD)
        for block in self.blocks:
            h_BSP = block(h_BSP)
        logits_LTE = self.head(self.norm(h_BSP)).float().view(B * S, L, E).transpose(0, 1)
        probs_LTE = logits_LTE.softmax(-1)
        rcfg = self.moe_config.router
        ids, weights = select_topk(probs_LTE.reshape(L * B * S, E), K, normalize=rcfg.renormalize(K),
                                   scale=rcfg.routed_scaling_factor)
        ids_LTK = ids.view(L, B * S, K)
        weights_LTK = weights.view(L, B * S, K)
        if self.config.weights == "hard":
            weights_LTK = torch.full_like(weights_LTK, rcfg.routed_scaling_factor / K)
        plan = RoutingPlan(expert_ids_LTK=ids_LTK, weights_LTK=weights_LTK, probs_LTE=probs_LTE,
                           logits_LTE=logits_LTE)
        if ctx is not None:
            self._add_losses(ctx, plan, B)
            ctx.state[PLAN_KEY] = plan
        return plan

    def _add_losses(self, ctx: RoutingContext, plan: RoutingPlan, num_sequences: int) -> None:
        rcfg = self.moe_config.router
        if rcfg.aux_loss_coef > 0:
            b = num_sequences if rcfg.aux_loss_level == "sequence" else 1
            loss = torch.stack([load_balancing_loss(p, i, b)
                                for p, i in zip(plan.probs_LTE, plan.expert_ids_LTK)]).sum()
            ctx.add_loss("aux_loss", rcfg.aux_loss_coef * loss / plan.num_plans, self.name)
        if rcfg.z_loss_coef > 0:
            ctx.add_loss("z_loss", rcfg.z_loss_coef * z_loss(plan.logits_LTE.flatten(0, 1)), self.name)


def planner_distillation_loss(logits_TE: torch.Tensor, target_TE: torch.Tensor, hard_weight: float = 0.75,
                              label_smoothing: float = 0.5) -> torch.Tensor:
    """Read-ME's router loss for one layer: ``hard_weight * CE(logits, argmax target; label smoothing)
    + (1 - hard_weight) * CE(logits, target distribution)``; sum it over layers."""
    hard = F.cross_entropy(logits_TE.float(), target_TE.argmax(-1), label_smoothing=label_smoothing)
    soft = F.cross_entropy(logits_TE.float(), target_TE.float())
    return hard_weight * hard + (1 - hard_weight) * soft


class ReadMEMoE(nn.Module):
    """MoE layer without a router: it runs its experts on the plan ``ctx.state["readme.plan"]`` made for it."""

    def __init__(self, moe: MoEConfig, config: ReadMEConfig | None = None, *, layer_index: int = 0,
                 name: str = "readme") -> None:
        super().__init__()
        self.moe_config, self.config, self.layer_index, self.name = moe, config or ReadMEConfig(), layer_index, name
        self.experts = ExpertBank(moe.num_experts, moe.dim, moe.hidden_dim, moe.activation)
        self.shared_experts = make_shared_experts(moe)

    def routing(self, ctx: RoutingContext | None, num_tokens: int) -> Routing:
        plan = ctx.state.get(PLAN_KEY) if ctx is not None else None
        if plan is None:
            raise ValueError(f"{self.name}: no routing plan; the model must call its ReadMEPlanner, "
                             f"planner(tokens_emb, ctx), before the blocks and pass the same ctx to this layer")
        routing = plan.routing(self.layer_index)
        if routing.num_tokens != num_tokens:
            raise ValueError(f"{self.name}: the routing plan holds {routing.num_tokens} tokens, this layer got "
                             f"{num_tokens}; plan the same batch the blocks run on")
        return routing

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe_config.dim)
        routing = self.routing(ctx, x_TD.shape[0])
        y_TD = run_experts(self.moe_config, self.experts, self.shared_experts, x_TD, routing, ctx, self.name)
        if ctx is not None and ctx.collect_stats:
            plan, i = ctx.state[PLAN_KEY], self.layer_index
            switch = (plan.expert_ids_LTK[i, :, 0] != plan.expert_ids_LTK[i - 1, :, 0]).float().mean() \
                if plan.num_plans > 1 and i > 0 else torch.zeros(())
            add_extra(ctx, self.name, switch_rate=switch)
        return y_TD.view(x.shape)


@register_ffn("readme")
def build_readme(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return ReadMEMoE(moe, parse_options(ReadMEConfig, options), layer_index=layer_index, name=name)

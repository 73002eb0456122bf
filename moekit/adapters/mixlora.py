"""MixLoRA (Li et al. 2024, arXiv 2404.15159; spec §15): LoRA experts inside the FFN of a frozen dense model.

Dim legend: T tokens, D model dim, F FFN hidden dim, E experts, K slots per token, R rank.

Expert ``e`` shares the frozen ``W_gate, W_up, W_down`` and adds its own LoRA to each projection::

    proj_e(x) = W0 x + (alpha/r) B_e A_e x,      E_e(x) = down_e(act(gate_e(x), up_e(x)))
    y_t = sum_k w_tk E_{ids_tk}(x_t)

Shared-base trick: ``W_gate x`` and ``W_up x`` are computed once for all tokens and each expert adds only its
LoRA delta on its own tokens (``W_down h`` depends on the expert's ``h`` and is computed per expert).
``naive=True`` computes every expert's projections from scratch (the reference the trick is tested against).

Routing goes through moekit's :class:`~moekit.Router` (float32, initialised N(0, 0.02), optional multiplicative
jitter) and its losses land in the :class:`~moekit.RoutingContext`:

- ``topk`` (``mixlora``): P1 top-k with renormalisation, the P2 load-balancing loss (``aux_loss``).
- ``dynamic`` (``mixlora-dynamic``): top-p (p = 0.8) over the softmax, raw probabilities, ``aux_loss``.
- ``switch`` (``mixlora-switch``): top-1 with a capacity limit and the router z-loss. Choice made here (the spec
  does not say): a token dropped by capacity gets the frozen base FFN's output, so dropping never removes the
  FFN, and the selected expert's weight is renormalised to 1 so that with ``B = 0`` the output is the base's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check, check_choice
from ..routing import Router, RouterConfig
from ..routing.losses import load_balancing_loss, z_loss
from ..routing.topp import select_topp
from ..types import Routing, RoutingContext
from .core import FFNWeights
from .experts import LoRAExperts, record_routing

__all__ = ["MixLoRA", "MixLoRAConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MixLoRAConfig:
    """Attributes (defaults: the MixLoRA README example):
        num_experts: E (8). top_k: k (2; ``switch`` uses 1).
        rank, alpha, dropout: each expert's LoRA (8, 16, 0.05 in the README; dropout default 0 here).
        routing: ``topk`` | ``dynamic`` (top-p) | ``switch`` (top-1 + capacity + z-loss).
        top_p: the probability mass of ``dynamic`` (0.8).
        aux_loss_coef: P2 coefficient (0.01 README; the config default is 0.001).
        z_loss_coef: router z-loss (``switch``: 0.01).
        jitter_eps: multiplicative router-input jitter in training (0; ``switch`` README 0.01).
        router_init_std: router weights ~ N(0, std) (0.02; ``switch`` README 1.0).
        capacity_factor: ``switch`` capacity (None = dropless).
        naive: compute each expert's projections from scratch instead of the shared-base trick.
    """

    num_experts: int = 8
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    routing: Literal["topk", "dynamic", "switch"] = "topk"
    top_p: float = 0.8
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    jitter_eps: float = 0.0
    router_init_std: float = 0.02
    capacity_factor: float | None = None
    naive: bool = False

    def __post_init__(self) -> None:
        check_choice("mixlora", "routing", self.routing, ("topk", "dynamic", "switch"))
        for name in ("num_experts", "top_k", "rank"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"mixlora.{name}={value!r} must be a positive integer")
        check(self.top_k <= self.num_experts,
              f"mixlora.top_k={self.top_k} exceeds num_experts={self.num_experts}; lower top_k")
        check(self.routing != "switch" or self.top_k == 1,
              f"mixlora.routing='switch' routes each token to one expert; set top_k=1 (got {self.top_k})")
        check(0 < self.top_p <= 1, f"mixlora.top_p={self.top_p} must be in (0, 1]")
        check(self.alpha > 0 and self.router_init_std > 0, "mixlora.alpha and router_init_std must be positive")
        check(0 <= self.dropout < 1, f"mixlora.dropout={self.dropout} must be in [0, 1)")
        check(self.capacity_factor is None or self.routing == "switch",
              "mixlora.capacity_factor applies to routing='switch' only; leave it None")
        for name in ("aux_loss_coef", "z_loss_coef", "jitter_eps"):
            check(getattr(self, name) >= 0, f"mixlora.{name}={getattr(self, name)} must be >= 0")


class MixLoRA(nn.Module):
    """The MixLoRA adapter of one gated (or plain) feed-forward of width ``F`` on model dim ``D``."""

    def __init__(self, dim: int, hidden_dim: int, gated: bool, config: MixLoRAConfig) -> None:
        super().__init__()
        c = self.config = config
        scale = c.alpha / c.rank
        self.router = Router(dim, c.num_experts, c.top_k, RouterConfig(
            aux_loss_coef=c.aux_loss_coef if c.routing == "topk" else 0.0, z_loss_coef=c.z_loss_coef,
            jitter_eps=c.jitter_eps, capacity_factor=c.capacity_factor,
            # topk: Mixtral's renormalised top-k (MixLoRA's released code), so the weights sum to 1 and the
            # adapted FFN equals the frozen one at init for every k; switch: Switch's raw top-1 probability.
            norm_topk_prob=True if c.routing == "topk" else None))
        nn.init.normal_(self.router.weight, std=c.router_init_std)
        self.gate = LoRAExperts(c.num_experts, dim, hidden_dim, c.rank, scale) if gated else None
        self.up = LoRAExperts(c.num_experts, dim, hidden_dim, c.rank, scale)
        self.down = LoRAExperts(c.num_experts, hidden_dim, dim, c.rank, scale)
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()

    def route(self, x_TD: torch.Tensor, ctx: RoutingContext | None, layer: str) -> Routing:
        c = self.config
        if c.routing != "dynamic":
            return self.router(x_TD, ctx, layer=layer)
        logits_TE = self.router.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        ids_TK, weights_TK = select_topp(probs_TE, c.top_p)
        if ctx is not None and c.aux_loss_coef > 0:
            ctx.add_loss("aux_loss", c.aux_loss_coef * load_balancing_loss(probs_TE, ids_TK), layer)
        if ctx is not None and c.z_loss_coef > 0:
            ctx.add_loss("z_loss", c.z_loss_coef * z_loss(logits_TE), layer)
        return Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=probs_TE, logits_TE=logits_TE)

    def forward(self, x_TD: torch.Tensor, base: FFNWeights, ctx: RoutingContext | None = None,
                layer: str = "mixlora") -> torch.Tensor:
        routing = self.route(x_TD, ctx, layer)
        ids_TK, weights_TK = routing.expert_ids_TK, routing.weights_TK.to(x_TD.dtype)
        shared = None if self.config.naive else self._base_in(x_TD, base)
        xa_TD = self.dropout(x_TD)
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.config.num_experts):
            tok_N, slot_N = (ids_TK == e).nonzero(as_tuple=True)
            if tok_N.numel() == 0:
                continue
            g0_NF, u0_NF = self._base_in(x_TD[tok_N], base) if shared is None else (
                None if shared[0] is None else shared[0][tok_N], shared[1][tok_N])
            y_TD = y_TD.index_add(0, tok_N, weights_TK[tok_N, slot_N, None] * self._expert(
                e, xa_TD[tok_N], g0_NF, u0_NF, base))
        dropped_T = (ids_TK < 0).all(-1)
        if self.config.routing == "switch" and self.config.capacity_factor is not None:
            g0, u0 = self._base_in(x_TD, base) if shared is None else shared
            base_TD = F.linear(base.act(g0, u0), base.w_down, base.b_down)
            y_TD = torch.where(dropped_T[:, None], base_TD, y_TD)
        record_routing(ctx, layer, routing, dropped_tokens=dropped_T.float().mean())
        return y_TD

    @staticmethod
    def _base_in(x_ND: torch.Tensor, base: FFNWeights) -> tuple[torch.Tensor | None, torch.Tensor]:
        g_NF = None if base.w_gate is None else F.linear(x_ND, base.w_gate, base.b_gate)
        return g_NF, F.linear(x_ND, base.w_up, base.b_up)

    def _expert(self, e: int, x_ND: torch.Tensor, g0_NF: torch.Tensor | None, u0_NF: torch.Tensor,
                base: FFNWeights) -> torch.Tensor:
        """``E_e`` on its ``N`` tokens, given the frozen ``W_gate x`` and ``W_up x``."""
        g_NF = None if self.gate is None or g0_NF is None else g0_NF + self.gate.one(e, x_ND).to(g0_NF.dtype)
        u_NF = u0_NF + self.up.one(e, x_ND).to(u0_NF.dtype)
        h_NF = base.act(g_NF, u_NF)
        return F.linear(h_NF, base.w_down, base.b_down) + self.down.one(e, self.dropout(h_NF)).to(h_NF.dtype)

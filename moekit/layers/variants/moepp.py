"""MoE++ (Jin et al. 2024, arXiv 2410.07348, github SkyworkAI/MoE-plus-plus): zero-computation experts and
gating residuals.

Dim legend: T tokens, D model dim, E = N + M experts in the pool (N FFN, M zero-computation), K slots.

Pool order (as in the released code): FFN experts ``0..N-1``, then constant, copy, zero experts (zero last).

- Zero expert ``E(x) = 0``; copy expert ``E(x) = x``; constant expert ``E(x) = a_1 x + a_2 v`` with
  ``[a_1, a_2] = softmax(W_c x)``, ``W_c`` in R^{2 x D}, ``v`` in R^D (init N(0, 1)). None reaches a matmul with
  the expert bank: the FFN engine only sees slots with ids ``< N``.
- Gating residual (eq. 6): ``z^(l) = W^(l) x + W_g^(l) z^(l-1)``, ``W_g`` square over the whole pool, no bias;
  ``z^(l-1)`` is the previous MoE++ layer's full logits, carried in ``ctx.state["moepp.logits"]``; the first
  layer (empty state) has no term. ``gate="linear"`` is the paper's ``W^(l)``; ``gate="mlp"`` the released code's
  ``D -> 8E -> E`` tanh MLP without biases.
- ``p = softmax(z)``, top-K, ``y = sum_{i in S} g_i E_i(x)``. ``gate_form="paper"`` is the plain gated sum (the
  weights follow ``moe.router.norm_topk_prob``); ``"code"`` sets the zero expert's gate to 0 and renormalises the
  other selected gates (the released code; its "input times k" scaling is not reproduced).
- Heterogeneous balance loss ``beta * sum_i eta_i f_i P_i`` (eq. 7, ``moepp_balance_loss``, beta = 0.01,
  tau = 0.75) and heterogeneous capacity (eq. 8, gamma = 1.1): see :mod:`moekit.routing.heterogeneous`.
Statistics: ``zc_share`` (kept assignments taken by ZC experts), ``ffn_per_token``, ``zero_share``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...dispatch import resolve_engine
from ...experts import ExpertBank, FeedForward
from ...routing.heterogeneous import heterogeneous_balance_loss, heterogeneous_capacities, limit_capacity_per_expert
from ...routing.losses import z_loss
from ...routing.selectors import select_topk
from ...types import Routing, RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ._common import flatten, parse_options, record_stats

__all__ = ["MoEPPConfig", "MoEPlusPlus", "STATE_KEY"]

STATE_KEY = "moepp.logits"


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEPPConfig:
    """Attributes:
        num_zero / num_copy / num_constant: zero-computation experts (paper 1B/7B: 1 / 1 / 2).
        tau: balance weight and capacity share of ZC experts relative to FFN experts (paper: 0.75).
        balance_coef: beta of the heterogeneous balance loss (paper: 0.01); 0 disables.
        capacity_factor: gamma (paper: 1.1); None is dropless.
        gating_residual: add ``W_g z^(l-1)`` from the previous MoE++ layer (paper: on).
        gate: ``linear`` (paper eq. 6) or ``mlp`` (released code, tanh, 8x wide).
        gate_form: ``paper`` (plain gated sum) or ``code`` (zero gate dropped, others renormalised).
    """

    num_zero: int = 1
    num_copy: int = 1
    num_constant: int = 2
    tau: float = 0.75
    balance_coef: float = 0.01
    capacity_factor: float | None = 1.1
    gating_residual: bool = True
    gate: Literal["linear", "mlp"] = "linear"
    gate_form: Literal["paper", "code"] = "paper"

    def __post_init__(self) -> None:
        for n in ("num_zero", "num_copy", "num_constant"):
            check(getattr(self, n) >= 0, f"variant.{n}={getattr(self, n)} must be >= 0")
        check(self.num_zc >= 1, "MoE++ needs at least one zero-computation expert; raise variant.num_zero")
        check(0 < self.tau <= 1, f"variant.tau={self.tau} must be in (0, 1] (paper: 0.75)")
        check(self.balance_coef >= 0, f"variant.balance_coef={self.balance_coef} must be >= 0")
        check(self.capacity_factor is None or self.capacity_factor > 0,
              f"variant.capacity_factor={self.capacity_factor} must be positive or None (dropless)")
        check_choice("variant", "gate", self.gate, ("linear", "mlp"))
        check_choice("variant", "gate_form", self.gate_form, ("paper", "code"))

    @property
    def num_zc(self) -> int:
        return self.num_zero + self.num_copy + self.num_constant


class MoEPlusPlus(nn.Module):
    """MoE++ layer: ``N`` FFN experts (an :class:`ExpertBank`) plus zero/copy/constant experts."""

    # moekit.parallel.shard_experts may split ``experts`` over ranks and set ``moe_config.engine='alltoall'``
    supports_expert_parallel = True

    def __init__(self, moe: MoEConfig, config: MoEPPConfig | None = None, name: str = "moepp") -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or MoEPPConfig(), name
        c, N, D = self.config, moe.num_experts, moe.dim
        self.num_ffn, self.pool = N, N + c.num_zc
        check(moe.top_k <= self.pool, f"top_k={moe.top_k} exceeds the pool of {self.pool} experts")
        self.gate: nn.Module
        if c.gate == "linear":
            self.gate = nn.Linear(D, self.pool, bias=False)
            nn.init.normal_(self.gate.weight, std=D**-0.5)
        else:
            self.gate = nn.Sequential(nn.Linear(D, 8 * self.pool, bias=False), nn.Tanh(),
                                      nn.Linear(8 * self.pool, self.pool, bias=False))
        self.gate_residual = nn.Linear(self.pool, self.pool, bias=False) if c.gating_residual else None
        self.experts = ExpertBank(N, D, moe.hidden_dim, moe.activation)
        self.const_gate = nn.Parameter(torch.zeros(c.num_constant, 2, D))  # W_c per constant expert
        nn.init.normal_(self.const_gate, std=D**-0.5)
        self.const_vector = nn.Parameter(torch.randn(c.num_constant, D))  # v, N(0, 1)
        self.shared_experts = (FeedForward(D, moe.num_shared_experts * moe.hidden_dim, moe.activation)
                               if moe.num_shared_experts > 0 else None)

    # expert ids of the zero-computation experts
    @property
    def constant_ids(self) -> range:
        return range(self.num_ffn, self.num_ffn + self.config.num_constant)

    @property
    def copy_ids(self) -> range:
        start = self.num_ffn + self.config.num_constant
        return range(start, start + self.config.num_copy)

    @property
    def zero_ids(self) -> range:
        return range(self.pool - self.config.num_zero, self.pool)

    def active_params(self) -> int:
        """Parameters one token uses, as if every one of its ``top_k`` slots went to an FFN expert: an upper
        bound, since zero/copy/constant experts cost no matmul (the ``ffn_per_token`` statistic measures how
        many FFN experts tokens really use)."""
        per_expert = sum(p.numel() for p in self.experts.parameters()) // self.num_ffn
        bank = sum(p.numel() for p in self.experts.parameters())
        rest = sum(p.numel() for p in self.parameters()) - bank
        return rest + self.moe_config.top_k * per_expert

    def logits(self, x_TD: torch.Tensor, ctx: RoutingContext | None) -> torch.Tensor:
        """``W x (+ W_g z_prev)`` in float32; stores the result for the next MoE++ layer."""
        if isinstance(self.gate, nn.Linear):  # the router runs in float32 (the code's MLP gate: model dtype)
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        else:
            logits_TE = self.gate(x_TD).float()
        prev = ctx.state.get(STATE_KEY) if ctx is not None else None
        if self.gate_residual is not None and prev is not None:
            if prev.shape != logits_TE.shape:
                raise ValueError(f"MoE++ gating residual: previous layer's logits have shape {tuple(prev.shape)}, "
                                 f"this layer's {tuple(logits_TE.shape)}; every MoE++ layer needs the same pool "
                                 f"(or set variant.gating_residual=false)")
            logits_TE = logits_TE + F.linear(prev, self.gate_residual.weight.float())
        if ctx is not None:
            ctx.state[STATE_KEY] = logits_TE
        return logits_TE

    def route(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None, num_sequences: int = 1) -> Routing:
        c, moe = self.config, self.moe_config
        logits_TE = self.logits(x_TD, ctx)
        probs_TE = logits_TE.softmax(-1)
        ids_TK, weights_TK = select_topk(probs_TE, moe.top_k, normalize=moe.router.renormalize(moe.top_k),
                                         scale=moe.router.routed_scaling_factor)
        if c.gate_form == "code":
            weights_TK = weights_TK.masked_fill(ids_TK >= self.zero_ids.start, 0.0)
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if ctx is not None:
            if c.balance_coef > 0:
                loss = heterogeneous_balance_loss(probs_TE, ids_TK, self.num_ffn, c.tau)
                ctx.add_loss("moepp_balance_loss", c.balance_coef * loss, self.name)
            if moe.router.z_loss_coef > 0:
                ctx.add_loss("z_loss", moe.router.z_loss_coef * z_loss(logits_TE), self.name)
        if c.capacity_factor is not None:
            ffn_cap, zc_cap = heterogeneous_capacities(ids_TK.numel(), self.num_ffn, c.num_zc, c.tau,
                                                       c.capacity_factor)
            cap_E = torch.full((self.pool,), zc_cap, dtype=torch.long, device=ids_TK.device)
            cap_E[: self.num_ffn] = ffn_cap
            ids_TK, weights_TK = limit_capacity_per_expert(ids_TK, weights_TK, cap_E)
        return Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=probs_TE, logits_TE=logits_TE)

    def combine(self, x_TD: torch.Tensor, routing: Routing, ctx: RoutingContext | None = None) -> torch.Tensor:
        """FFN slots through the engine; zero/copy/constant experts as elementwise terms."""
        ids_TK, w_TK = routing.expert_ids_TK, routing.weights_TK.to(x_TD.dtype)
        is_ffn_TK = (ids_TK >= 0) & (ids_TK < self.num_ffn)
        ffn_routing = Routing(expert_ids_TK=ids_TK.masked_fill(~is_ffn_TK, -1),
                              weights_TK=w_TK.masked_fill(~is_ffn_TK, 0.0),
                              scores_TE=routing.scores_TE, logits_TE=routing.logits_TE)
        y_TD = resolve_engine(self.moe_config.engine, x_TD, self.experts)(x_TD, ffn_routing, self.experts)
        copy_T = (w_TK * ((ids_TK >= self.copy_ids.start) & (ids_TK < self.copy_ids.stop))).sum(-1)
        y_TD = y_TD + copy_T[:, None] * x_TD
        if self.config.num_constant:
            const_ids_C = torch.tensor(list(self.constant_ids), device=ids_TK.device)
            w_TC = (w_TK[:, :, None] * (ids_TK[:, :, None] == const_ids_C)).sum(1)
            a_TC2 = torch.einsum("td,cjd->tcj", x_TD, self.const_gate.to(x_TD.dtype)).softmax(-1)
            y_TD = (y_TD + (w_TC * a_TC2[..., 0]).sum(-1, keepdim=True) * x_TD
                    + (w_TC * a_TC2[..., 1]) @ self.const_vector.to(x_TD.dtype))
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        if ctx is not None and ctx.collect_stats:
            kept = (ids_TK >= 0).sum().clamp_min(1)
            zc = (ids_TK >= self.num_ffn).sum()
            record_stats(ctx, self.name, routing, zc_share=zc / kept,
                         ffn_per_token=is_ffn_TK.sum() / ids_TK.shape[0],
                         zero_share=(ids_TK >= self.zero_ids.start).sum() / kept)
        return y_TD

    def constant_expert(self, x_TD: torch.Tensor, j: int) -> torch.Tensor:
        """Constant expert ``j`` alone: ``a_1 x + a_2 v`` (the readable definition)."""
        a_T2 = F.linear(x_TD, self.const_gate[j]).softmax(-1)
        return a_T2[:, :1] * x_TD + a_T2[:, 1:] * self.const_vector[j]

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, num_sequences = flatten(x, self.moe_config.dim)
        return self.combine(x_TD, self.route(x_TD, ctx, num_sequences), ctx).view(x.shape)


@register_ffn("moepp")
def build_moepp(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return MoEPlusPlus(moe, parse_options(MoEPPConfig, options), name=name)

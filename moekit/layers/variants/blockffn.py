"""BlockFFN (Song et al. 2025, arXiv 2507.08771, github thunlp/BlockFFN): a differentiable ReLU + RMSNorm router
(no top-k) with chunk-level sparsity losses.

Dim legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K = E slots (inactive ones are -1).

    l = W_r x,   r = ReLU(l),   A = RMSNorm(r) (learnable scale, init 1),   y = sum_{i: r_i > 0} A_i E_i(x)

Experts with ``r_i = 0`` are empty slots and never run. Losses (router only): ``blockffn_locality_loss``
(coefficient 2e-3, steepness 100) and ``blockffn_chunk_loss`` (chunk length 64, initial coefficient 5e-2);
see :mod:`moekit.routing.blockffn`. With ``adaptive_chunk_coef`` the chunk coefficient follows the code's
feedback rule, applied in :meth:`on_step`: held for ``hold_steps``, then every ``interval`` steps ramped linearly
(over the next interval) to ``coef * mean(last interval) / mean(previous interval)``, the ratio floored at 1.025
when the loss rose, capped at 4x the initial value. Experts use ``moe.activation`` (the paper's experts are
non-gated SiLU FFNs; moekit's bank offers swiglu/gelu/relu, and the preset picks gelu).
Statistics: ``token_sparsity`` (fraction of inactive experts per token), ``chunk_sparsity`` (1 - union of active
experts over a chunk, over E).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...configs import check, check_choice
from ...routing.blockffn import chunk_sparsity_loss, chunk_union_fraction, locality_loss, relu_router_weights
from ...types import Routing, RoutingContext
from ..moe import MoE, MoEConfig
from ..registry import register_ffn
from ._common import add_extra, parse_options

__all__ = ["BlockFFNConfig", "BlockFFN"]


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockFFNConfig:
    """Attributes:
        norm: ``rmsnorm`` (all released training commands) or ``sum`` (``r / sum r``).
        locality_coef: activation-locality loss coefficient (2e-3; 1e-3 in the 0.8B run); 0 disables.
        steepness: sigmoid steepness s of the locality loss (100).
        chunk_coef: initial chunk sparsification coefficient (5e-2); 0 disables.
        chunk_len: training chunk length L (64).
        adaptive_chunk_coef: apply the code's feedback rule to the chunk coefficient in ``on_step``.
        hold_steps / interval / max_scale: that rule's settings (1000 / 100 / 4).
    """

    norm: Literal["rmsnorm", "sum"] = "rmsnorm"
    locality_coef: float = 2e-3
    steepness: float = 100.0
    chunk_coef: float = 5e-2
    chunk_len: int = 64
    adaptive_chunk_coef: bool = True
    hold_steps: int = 1000
    interval: int = 100
    max_scale: float = 4.0

    def __post_init__(self) -> None:
        check_choice("variant", "norm", self.norm, ("rmsnorm", "sum"))
        for n in ("locality_coef", "chunk_coef"):
            check(getattr(self, n) >= 0, f"variant.{n}={getattr(self, n)} must be >= 0; 0 disables it")
        check(self.chunk_len >= 1 and self.interval >= 1, "variant.chunk_len and variant.interval must be >= 1")


class BlockFFN(nn.Module):
    """ReLU-routed MoE: a variable, differentiable set of experts per token."""

    def __init__(self, moe: MoEConfig, config: BlockFFNConfig | None = None, name: str = "blockffn") -> None:
        super().__init__()
        self.config, self.name = config or BlockFFNConfig(), name
        self.moe = MoE(moe, name=name)
        self.router_scale = nn.Parameter(torch.ones(moe.num_experts)) if self.config.norm == "rmsnorm" else None
        self.chunk_coef = self.config.chunk_coef
        self._history: list[torch.Tensor] = []
        self._ramp: tuple[int, float, float] | None = None  # (start step, from, to)

    def route(self, x_BSD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        c = self.config
        x_BSD = x_BSD if x_BSD.dim() == 3 else x_BSD.reshape(1, -1, x_BSD.shape[-1])
        B, S, D = x_BSD.shape
        logits_TE = self.moe.router.logits(x_BSD.reshape(-1, D))
        r_TE, a_TE = relu_router_weights(logits_TE, self.router_scale, c.norm)
        active_TE = r_TE > 0
        E = r_TE.shape[1]
        experts_TE = torch.arange(E, device=r_TE.device).expand_as(r_TE)
        ids_TE = torch.where(active_TE, experts_TE, torch.full_like(experts_TE, -1))
        if ctx is not None:
            if c.locality_coef > 0:
                ctx.add_loss("blockffn_locality_loss",
                             c.locality_coef * locality_loss(logits_TE.view(B, S, E), c.steepness), self.name)
            if self.chunk_coef > 0:
                q_TE = r_TE / r_TE.sum(-1, keepdim=True).clamp_min(1e-20)
                loss = chunk_sparsity_loss(q_TE.view(B, S, E), c.chunk_len)
                if self.training and c.adaptive_chunk_coef:
                    if torch.isfinite(loss):  # a NaN batch must not poison the coefficient schedule
                        self._history.append(loss.detach())
                    del self._history[: -2 * c.interval]
                ctx.add_loss("blockffn_chunk_loss", self.chunk_coef * loss, self.name)
            if ctx.collect_stats:
                add_extra(ctx, self.name, token_sparsity=1 - active_TE.float().mean(),
                          chunk_sparsity=1 - chunk_union_fraction(active_TE.view(B, S, E), c.chunk_len))
        return Routing(expert_ids_TK=ids_TE, weights_TK=a_TE.masked_fill(~active_TE, 0.0), scores_TE=r_TE,
                       logits_TE=logits_TE, num_dropped=ids_TE.new_zeros(()))  # inactive experts are not drops

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, self.moe.config.dim)
        routing = self.route(x, ctx)
        extra = dict(ctx.stats[self.name].extra) if ctx is not None and self.name in ctx.stats else {}
        y_TD = self.moe.combine(x_TD, routing, ctx)
        add_extra(ctx, self.name, **extra)  # combine() replaced the layer's stats record
        return y_TD.view(x.shape)

    def on_step(self, step: int) -> None:
        """Adapt the chunk-loss coefficient (the released code's value scheduler)."""
        c = self.config
        if not c.adaptive_chunk_coef or c.chunk_coef == 0:
            return
        if self._ramp is not None:
            start, lo, hi = self._ramp
            frac = min((step - start) / c.interval, 1.0)
            self.chunk_coef = lo + (hi - lo) * frac
        if step < c.hold_steps or step % c.interval or len(self._history) < 2 * c.interval:
            return
        prev = torch.stack(self._history[: c.interval]).mean()
        last = torch.stack(self._history[c.interval:]).mean()
        ratio = float(last / prev.clamp_min(1e-20))
        if ratio > 1:
            ratio = max(ratio, 1.025)
        target = min(self.chunk_coef * ratio, c.max_scale * c.chunk_coef)
        self._ramp = (step, self.chunk_coef, target)


@register_ffn("blockffn")
def build_blockffn(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return BlockFFN(moe, parse_options(BlockFFNConfig, options), name=name)

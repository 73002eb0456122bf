"""Chain-of-Experts (CoE; Wang et al. 2025, arXiv 2506.18945, github ZihanWang314/CoE).

Dim legend: T tokens, D model dim, E experts, K slots per token.

One MoE layer iterates ``C`` times over ONE expert pool, with an independent router per iteration
(the paper's "igate"); the input is normalised once, before the chain (the block's pre-norm)::

    h_0 = x                                   (x = RMSNorm(residual), given by the block)
    h_t = I_r * h_{t-1} + sum_{i in S_t} g_{t,i} E_i(h_{t-1}) + E_shared(h_{t-1}),   t = 1..C
    out = h_C  (+ the block's residual stream when ``outer_residual``)

``inner_residual`` is ``I_r`` (paper eq. and code default: on). ``outer_residual`` says whether the block's
un-normalised residual is added back (code default: off, so the layer's skip path is ``LN(x)``, not ``x``).
Since a feed-forward cannot add a residual it never sees, the module exposes ``block_residual`` (= the flag):
a model block must compute ``ffn(norm(x))`` instead of ``x + ffn(norm(x))`` when it is False.
Each iteration's router adds its losses (``aux_loss``, ``z_loss``) under ``<name>.iter<t>``; statistics are
recorded per iteration under the same names. Routers follow ``moe.router`` (the CoE preset uses the
DeepSeek-V2 gate: softmax, ``norm_topk_prob=False``, sequence-level aux loss 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...configs import check
from ...experts import ExpertBank
from ...routing import Router
from ...types import RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ._common import flatten, make_shared_experts, parse_options, run_experts

__all__ = ["CoEConfig", "ChainOfExperts"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CoEConfig:
    """Attributes:
        num_iterations: C, iterations over the shared pool (CoE run: 2).
        inner_residual: add ``h_{t-1}`` after each iteration (paper and code: True).
        outer_residual: the block adds its un-normalised residual (code default False; ablation: True ~ plain MoE).
    """

    num_iterations: int = 2
    inner_residual: bool = True
    outer_residual: bool = False

    def __post_init__(self) -> None:
        check(isinstance(self.num_iterations, int) and self.num_iterations >= 1,
              f"variant.num_iterations={self.num_iterations!r} must be a positive integer (CoE uses 2)")


class ChainOfExperts(nn.Module):
    """CoE layer: ``C`` routers over one :class:`ExpertBank` (+ shared experts applied every iteration)."""

    # moekit.parallel.shard_experts may split ``experts`` over ranks and set ``moe_config.engine='alltoall'``
    supports_expert_parallel = True

    def __init__(self, moe: MoEConfig, config: CoEConfig | None = None, name: str = "coe") -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or CoEConfig(), name
        self.routers = nn.ModuleList(
            Router(moe.dim, moe.num_experts, moe.top_k, moe.router) for _ in range(self.config.num_iterations))
        self.experts = ExpertBank(moe.num_experts, moe.dim, moe.hidden_dim, moe.activation)
        self.shared_experts = make_shared_experts(moe)

    def active_params(self) -> int:
        """Parameters applied per token, counted once per application (the FLOPs basis of
        :func:`moekit.models.count`): each of the C iterations uses its router, ``top_k`` experts of the bank
        and the shared experts."""
        per_expert = sum(p.numel() for p in self.experts.parameters()) // self.moe_config.num_experts
        shared = sum(p.numel() for p in self.shared_experts.parameters()) if self.shared_experts is not None else 0
        router = sum(p.numel() for p in self.routers[0].parameters())
        return self.config.num_iterations * (router + self.moe_config.top_k * per_expert + shared)

    @property
    def block_residual(self) -> bool:
        """Whether the model block should add its residual stream to this module's output."""
        return self.config.outer_residual

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        h_TD, num_sequences = flatten(x, self.moe_config.dim)
        for t, router in enumerate(self.routers):
            layer = f"{self.name}.iter{t}"
            routing = router(h_TD, ctx, layer=layer, num_sequences=num_sequences)
            y_TD = run_experts(self.moe_config, self.experts, self.shared_experts, h_TD, routing, ctx, layer)
            h_TD = h_TD + y_TD if self.config.inner_residual else y_TD
        return h_TD.view(x.shape)

    def extra_repr(self) -> str:
        c = self.config
        return f"iterations={c.num_iterations}, inner_residual={c.inner_residual}, outer_residual={c.outer_residual}"


@register_ffn("coe")
def build_coe(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return ChainOfExperts(moe, parse_options(CoEConfig, options), name=name)
